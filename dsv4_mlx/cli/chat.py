"""`dsv4 chat [MODEL]`: a multi-turn REPL.

The conversation's decode state is kept between turns: each new message prefills only the
tokens that are not already in the cache (see `dsv4_mlx.generate.Generator`). Without MODEL
it runs the built-in demo model (random weights: gibberish, but the whole pipeline).

Input: Enter sends; Alt+Enter (Esc then Enter), or a line ending with a backslash, starts a
new line; a message opened with three double quotes continues until they close it. Pasted
multi-line text is kept as is. Ctrl+C stops the reply being generated (a second Ctrl+C while
it winds down stops at once); at the prompt it clears the line. Ctrl+D or /quit leaves.

Line editing and history (in `$DSV4_HOME/chat_history`) come from prompt_toolkit on a colour
terminal. With NO_COLOR, TERM=dumb, --no-color, or when stdin/stdout is not a terminal, the
REPL reads plain lines and writes no escape codes at all.

Exit codes: 0 normal end (/quit, Ctrl+D, end of input); 1 unexpected failure; 2 bad input
(model folder, options); 3 not enough memory for the weights and the decode state at
--max-context; 130 interrupted while loading.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from .generate_cmd import (
    DEMO_NOTICE,
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    MODEL_ARG,
    PrefillProgress,
    StopFlag,
    color_enabled,
    context_warning,
    fail,
    fmt_bytes,
    format_stats,
    make_console,
    open_session,
    sampling_from,
    stream_reply,
)
from .main import app

HELP = """commands:
  /help               this help
  /think              think before answering (Think High)
  /nothink            answer directly (the default)
  /think-max          Think Max: the longest reasoning
  /system TEXT        set the system prompt (/system alone removes it)
  /read FILE [TEXT]   send the contents of FILE (then TEXT) as your message
  /clear              forget the conversation and its decode state
  /stats              speed, context and memory: last reply and session
  /set KEY VALUE      temp, top_p, top_k, min_p, seed, max_tokens, repetition_penalty
                      (/set alone shows them; VALUE 'none' unsets seed / repetition_penalty)
  /quit               leave (also /exit, Ctrl+D)
input: Enter sends; Alt+Enter or a trailing \\ starts a new line; \"\"\" opens a block until \"\"\".
Ctrl+C stops a reply; at the prompt it clears the line. Start a message with // to send a
line that begins with /."""

SET_KEYS = {
    "temp": "temperature", "temperature": "temperature", "top_p": "top_p", "top-p": "top_p",
    "top_k": "top_k", "top-k": "top_k", "min_p": "min_p", "min-p": "min_p", "seed": "seed",
    "max_tokens": "max_tokens", "max-tokens": "max_tokens",
    "repetition_penalty": "repetition_penalty", "repetition-penalty": "repetition_penalty",
}


# ---------------------------------------------------------------------------
# Multi-line input rules (shared by both readers)
# ---------------------------------------------------------------------------


def _open_block(text: str) -> bool:
    return text.lstrip().startswith('"""') and text.count('"""') % 2 == 1


def _finish(text: str) -> str:
    t = text.strip()
    if t.startswith('"""'):
        t = t[3:]
        if t.endswith('"""'):
            t = t[:-3]
        t = t.strip("\n")
    return t


class PlainReader:
    """Plain lines from stdin; no escape codes. A prompt is shown only on a terminal."""

    def __init__(self, out):
        self.out = out
        self.show_prompt = sys.stdin.isatty()

    def read(self) -> Optional[str]:
        buf: Optional[str] = None
        while True:
            if self.show_prompt:
                self.out.write("> " if buf is None else "... ")
                self.out.flush()
            line = sys.stdin.readline()
            if line == "":
                if self.show_prompt:
                    self.out.write("\n")
                return None if buf is None else _finish(buf)
            line = line.rstrip("\r\n")
            buf = line if buf is None else buf + "\n" + line
            if buf.endswith("\\"):
                buf = buf[:-1]
                continue
            if _open_block(buf):
                continue
            return _finish(buf)


class PromptReader:
    """prompt_toolkit: line editing, history, multi-line input."""

    def __init__(self, history_path: Path):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        kb = KeyBindings()

        @kb.add("enter")
        def _enter(event):
            b = event.current_buffer
            if b.document.is_cursor_at_the_end and b.text.endswith("\\"):
                b.delete_before_cursor(1)
                b.insert_text("\n")
            elif _open_block(b.text):
                b.insert_text("\n")
            else:
                b.validate_and_handle()

        @kb.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        try:
            history_path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(history_path))
            history_path.touch()
        except OSError:
            history = InMemoryHistory()
        self.session = PromptSession(history=history, key_bindings=kb, multiline=True,
                                     prompt_continuation="... ")

    def read(self) -> Optional[str]:
        try:
            return _finish(self.session.prompt("> "))
        except EOFError:
            return None


# ---------------------------------------------------------------------------
# The REPL
# ---------------------------------------------------------------------------


class ChatREPL:
    def __init__(self, session, gen, conv, sampling, max_tokens: int, color: bool):
        self.s, self.gen, self.conv, self.sampling = session, gen, conv, sampling
        self.max_tokens = max_tokens
        self.color = color
        self.out = make_console(False, color)
        self.err = make_console(True, color)
        self.turns = 0

    # -- output helpers ------------------------------------------------------------------------
    def say(self, text: str, style: Optional[str] = None):
        self.out.print(text, markup=False, style=style, soft_wrap=True)

    def settings(self) -> str:
        s = self.sampling
        return (f"temp {s.temperature:g} · top_p {s.top_p:g} · top_k {s.top_k} · min_p {s.min_p:g} · "
                f"seed {s.seed if s.seed is not None else 'none'} · max_tokens {self.max_tokens} · "
                f"repetition_penalty {s.repetition_penalty if s.repetition_penalty else 'none'}")

    def banner(self):
        self.say(f"dsv4 chat · {self.s.folder} · mode {self.conv.mode} · "
                 f"context {self.s.max_context:,} tokens", style="bold")
        self.say(self.settings(), style="dim")
        if self.s.demo:
            self.say(f"note: {DEMO_NOTICE}.", style="yellow")
        self.say("/help for commands · Enter sends · Ctrl+C stops a reply · /quit or Ctrl+D leaves",
                 style="dim")

    # -- commands ------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = line.partition(" ")
        name, rest = name.lower(), rest.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name in ("/help", "/?"):
            self.say(HELP)
        elif name == "/think":
            self.conv.thinking, self.conv.max_effort = True, False
            self.say("mode: think (reasoning, then the answer)", style="dim")
        elif name in ("/nothink", "/no-think", "/chat"):
            self.conv.thinking, self.conv.max_effort = False, False
            self.say("mode: chat (no reasoning)", style="dim")
        elif name == "/think-max":
            self.conv.thinking, self.conv.max_effort = True, True
            self.say("mode: think-max (the longest reasoning; the model card advises a context >= 384K)",
                     style="dim")
        elif name == "/system":
            self.conv.system = rest or None
            self.say("system prompt set" if rest else "system prompt removed", style="dim")
        elif name == "/clear":
            self.conv.clear()
            self.gen.reset()
            self.say("conversation cleared", style="dim")
        elif name == "/stats":
            self.stats()
        elif name == "/set":
            self.set(rest)
        elif name == "/read":
            self.read_file(rest)
        else:
            self.say(f"unknown command {name}; /help lists them", style="red")
        return True

    def stats(self):
        used = len(self.gen.tokens)
        lim = self.s.max_context
        self.say(f"model {self.s.folder}" + (" (demo: random weights)" if self.s.demo else ""))
        self.say(f"mode {self.conv.mode} · {self.settings()}")
        self.say(f"context {used:,}/{lim:,} tokens ({100 * used / lim:.1f}%) · {self.turns} turns · "
                 f"prefilled {self.gen.total_prefill_tokens:,} tokens · generated "
                 f"{self.gen.total_generation_tokens:,} tokens")
        import mlx.core as mx

        self.say(f"memory: active {fmt_bytes(mx.get_active_memory())} · peak {fmt_bytes(mx.get_peak_memory())}")
        if self.gen.last_stats is not None:
            self.say("last reply: " + format_stats(self.gen.last_stats))

    def set(self, rest: str):
        parts = rest.split()
        if not parts:
            self.say(self.settings())
            return
        if len(parts) != 2 or parts[0].lower() not in SET_KEYS:
            self.say(f"usage: /set KEY VALUE with KEY one of {', '.join(sorted(set(SET_KEYS.values())))}",
                     style="red")
            return
        key, raw = SET_KEYS[parts[0].lower()], parts[1]
        s = self.sampling
        try:
            if key in ("seed", "repetition_penalty") and raw.lower() in ("none", "off"):
                setattr(s, key, None)
            elif key == "seed":
                s.seed = int(raw)
            elif key == "max_tokens":
                v = int(raw)
                if v < 1:
                    raise ValueError("must be positive")
                self.max_tokens = v
            elif key == "top_k":
                v = int(raw)
                if v < 0:
                    raise ValueError("must be >= 0")
                s.top_k = v
            else:
                v = float(raw)
                if key == "temperature" and v < 0:
                    raise ValueError("must be >= 0")
                if key == "top_p" and not 0 < v <= 1:
                    raise ValueError("must be in (0, 1]")
                if key == "min_p" and not 0 <= v <= 1:
                    raise ValueError("must be in [0, 1]")
                if key == "repetition_penalty" and v <= 0:
                    raise ValueError("must be positive")
                setattr(s, key, v)
        except ValueError as e:
            self.say(f"bad value {raw!r} for {key}: {e}", style="red")
            return
        self.say(self.settings(), style="dim")

    def read_file(self, rest: str):
        try:
            args = shlex.split(rest)
        except ValueError as e:
            self.say(f"/read: {e}", style="red")
            return
        if not args:
            self.say("usage: /read FILE [TEXT]", style="red")
            return
        path = Path(args[0]).expanduser()
        try:
            content = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            self.say(f"cannot read {path}: {e.strerror or e}", style="red")
            return
        extra = " ".join(args[1:])
        self.say(f"read {path} ({len(content):,} characters)", style="dim")
        self.ask(content.rstrip("\n") + ("\n\n" + extra if extra else ""))

    # -- one turn ------------------------------------------------------------------------------
    def ask(self, text: str):
        from ..generate import encode_prompt

        ids = encode_prompt(self.s.tokenizer, self.conv.encode(text))
        if len(ids) >= self.s.max_context:
            self.say(f"this message makes the conversation {len(ids):,} tokens, more than the context "
                     f"of {self.s.max_context:,}: /clear to start over, or restart with a larger "
                     "--max-context", style="red")
            return
        shown = {"reasoning": False, "any": False}
        out = self.out

        def reasoning_out(t):
            shown["reasoning"] = shown["any"] = True
            out.print(t, end="", style="dim italic", markup=False, soft_wrap=True)
            out.file.flush()

        def answer_out(t):
            shown["any"] = True
            out.print(t, end="", markup=False, soft_wrap=True)
            out.file.flush()

        def answer_start():
            if shown["reasoning"]:
                out.print("\n", end="", markup=False)

        flag = StopFlag()
        try:
            with flag:
                r = stream_reply(self.gen, ids, sampling=self.sampling, max_tokens=self.max_tokens,
                                 answer_out=answer_out, reasoning_out=reasoning_out,
                                 on_answer_start=answer_start, should_stop=flag,
                                 progress=PrefillProgress(self.err, self.color, self.s.prefill_step))
        except KeyboardInterrupt:
            out.print("", markup=False)
            self.say("[stopped at once; this turn was not kept]", style="yellow")
            return
        if shown["any"]:
            out.print("", markup=False)
        st = r.stats
        if st.finish_reason == "interrupted":
            if st.generation_tokens == 0:
                self.say("[stopped before the reply began; this message was not kept]", style="yellow")
                return
            self.say("[stopped]", style="yellow")
        self.conv.add_turn(text, r)
        self.turns += 1
        self.say(format_stats(st), style="dim")
        w = context_warning(st)
        if w:
            self.say(f"warning: {w}" + ("; /clear to start over" if st.finish_reason != "context" else ""),
                     style="yellow")

    # -- loop ----------------------------------------------------------------------------------
    def run(self, reader):
        self.banner()
        while True:
            try:
                line = reader.read()
            except KeyboardInterrupt:
                continue
            if line is None:
                return
            if not line.strip():
                continue
            if line.startswith("//"):
                self.ask(line[1:])
            elif line.startswith("/"):
                if not self.command(line.strip()):
                    return
            else:
                self.ask(line)


@app.command("chat", epilog=EXIT_CODES_HELP)
def chat(
    model: Optional[Path] = MODEL_ARG,
    think: bool = typer.Option(False, "--think/--no-think", help="Start in Think High mode (/think, /nothink switch)."),
    think_max: bool = typer.Option(False, "--think-max", help="Start in Think Max mode."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", help="Most tokens per reply (default 8192; 100 for the demo model)."),
    temp: Optional[float] = typer.Option(None, "--temp", help="Sampling temperature, 0 = greedy (default: the model's generation_config.json, else 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling (default: generation_config.json, else 1.0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (each reply starts from it)."),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Context limit in tokens for the whole conversation (default: the model's max_position_embeddings)."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="mlx-lm repetition penalty (off by default)."),
    prefill_step: int = typer.Option(2048, "--prefill-step", help="Prompt tokens per prefill chunk."),
    no_color: bool = typer.Option(False, "--no-color", help="No colors or escape codes, plain line input (also NO_COLOR, TERM=dumb)."),
    no_memory_check: bool = typer.Option(False, "--no-memory-check", help="Run even if the memory preflight says it will not fit."),
):
    """Chat with a model: multi-turn, the decode state reused across turns."""
    from ..generate import DEFAULT_MAX_TOKENS, DEMO_MAX_TOKENS, Conversation, dsv4_home

    color = color_enabled(no_color)
    err = make_console(True, color)
    if max_tokens is not None and max_tokens < 1:
        fail(f"--max-tokens must be positive (got {max_tokens})")
    try:
        s = open_session(model, max_context, prefill_step, err)
        sampling = sampling_from(s.folder, temp, top_p, seed, repetition_penalty)
        s.preflight(state_copies=2, skip=no_memory_check)  # the live state and the turn checkpoint
        s.load()
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    gen = s.generator(keep_checkpoint=True)
    conv = Conversation(system=system, thinking=think or think_max, max_effort=think_max)
    if max_tokens is None:
        max_tokens = DEMO_MAX_TOKENS if s.demo else DEFAULT_MAX_TOKENS
    repl = ChatREPL(s, gen, conv, sampling, max_tokens, color)
    interactive = color and sys.stdin.isatty() and sys.stdout.isatty()
    reader = PromptReader(dsv4_home() / "chat_history") if interactive else PlainReader(sys.stdout)
    repl.run(reader)
