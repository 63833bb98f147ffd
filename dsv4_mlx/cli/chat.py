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

Sessions (docs/SESSIONS.md). `--session NAME` keeps the conversation on disk: a new NAME is
created at the first reply, an existing one is resumed - fingerprints and segment hashes are
checked before the model is loaded, then the decode state, transcript, think mode and sampler
settings are restored with no prefill at all (options given on the command line override the
stored settings). After every turn one segment is appended: the state every next prompt starts
from (see `dsv4_mlx.sessions.runtime.turn_state`), O(new tokens). Without MODEL, a resumed
session runs on the model it was made with. In the REPL: /save [NAME], /load NAME, /fork NAME,
/sessions. With prefix reuse on (`--reuse-prefix`, the default when the sessions folder exists)
a prompt that starts like any stored session resumes from its longest valid boundary.

Exit codes: 0 normal end (/quit, Ctrl+D, end of input); 1 unexpected failure; 2 bad input
(model folder, options); 3 not enough memory for the weights and the decode state at
--max-context; 4 session error (bad name, disk full); 5 the session was made with another
model, tokenizer, encoding or state format; 6 the session has no intact segment; 130
interrupted while loading.
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
    check_kv_format,
    fail,
    fmt_bytes,
    format_stats,
    make_console,
    open_session,
    reuse_enabled,
    reuse_line,
    sampling_from,
    session_fail,
    session_model,
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
  /save [NAME]        save the conversation now (as NAME, then keep saving there)
  /load NAME          resume session NAME (replaces this conversation)
  /fork NAME          copy the conversation to session NAME (copy-on-write); stay here
  /sessions           list the stored sessions
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
    def __init__(self, session, gen, conv, sampling, max_tokens: int, color: bool,
                 store=None, rt=None, name: Optional[str] = None, kv_format: str = "fp8"):
        self.s, self.gen, self.conv, self.sampling = session, gen, conv, sampling
        self.max_tokens = max_tokens
        self.color = color
        self.out = make_console(False, color)
        self.err = make_console(True, color)
        self.turns = 0
        # on-disk sessions: the store, the runtime (created on first use), the attached session
        self.store, self.rt, self.name, self.kv_format = store, rt, name, kv_format
        self.notices = []  # said after the banner (resume, damaged sessions)

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
        for text, style in self.notices:
            self.say(text, style=style)
        self.notices = []
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
            if self.name:
                self.say(f"(session '{self.name}' will hold the new conversation from the next reply; "
                         "/fork NAME first to keep the old one)", style="dim")
        elif name == "/save":
            self.save_as(rest or None)
        elif name == "/load":
            self.load(rest)
        elif name == "/fork":
            self.fork(rest)
        elif name == "/sessions":
            self.list_sessions()
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
        if self.name:
            self.say(f"session '{self.name}' in {self.store.root}")
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

    # -- sessions ------------------------------------------------------------------------------
    def runtime(self):
        """The session runtime (fingerprints computed on first use)."""
        if self.rt is None:
            from ..sessions import SessionStore
            from ..sessions.runtime import SessionRuntime

            self.store = self.store or SessionStore()
            self.rt = SessionRuntime(self.store, self.s.fingerprints(self.kv_format),
                                     warn=lambda t: self.say(f"warning: {t}", style="yellow"))
            self.gen.prefix_source = self.rt
            self.gen.track_logits = True
        return self.rt

    def settings_dict(self) -> dict:
        from ..sessions.runtime import make_settings

        return make_settings("chat", self.s.folder, self.conv, self.sampling, self.max_tokens)

    def _save(self, name: str):
        """Save the conversation as `name`; returns the manifest, None when there is nothing
        to save yet. SessionError passes."""
        from ..sessions.runtime import conversation_messages, stable_prefix

        rt = self.runtime()
        history = stable_prefix(self.s.tokenizer, self.conv)
        return rt.save_turn(name, self.gen, history, conversation_messages(self.conv), self.settings_dict())

    def autosave(self):
        from ..sessions import SessionError

        try:
            self._save(self.name)
        except SessionError as e:
            self.say(f"warning: {e}", style="yellow")

    def _new_name(self, name: str) -> bool:
        from ..sessions import SessionError

        self.runtime()
        try:
            self.store.path(name)
        except SessionError as e:
            self.say(str(e), style="red")
            return False
        if self.store.exists(name):
            self.say(f"session '{name}' already exists: /load it, or pick another name", style="red")
            return False
        return True

    def _copy_to(self, name: str):
        """Make session `name` hold this conversation (a copy-on-write fork when attached)."""
        if self.name and self.store.exists(self.name):
            self.rt.fork_from(self.name, name)
        m = self._save(name)
        if m is None and self.store.exists(name):
            m = self.store.manifest(name)
        return m

    def _said(self, what: str, name: str, m):
        size = sum(x["bytes"] for x in m["segments"])
        self.say(f"{what} session '{name}': {len(m['tokens']):,} tokens, {len(m['segments'])} segments, "
                 f"{fmt_bytes(size)}", style="dim")

    def save_as(self, name: Optional[str]):
        from ..sessions import SessionError

        if name is None or name == self.name:
            if not self.name:
                self.say("usage: /save NAME (this conversation has no session yet)", style="red")
                return
            name = self.name
        elif not self._new_name(name):
            return
        try:
            m = self._copy_to(name) if name != self.name else self._save(name)
        except SessionError as e:
            self.say(str(e), style="red")
            return
        if m is None:
            self.say("nothing to save yet: send a message first", style="red")
            return
        self.name = name
        self.rt.own = name
        self._said("saved", name, m)

    def fork(self, name: str):
        from ..sessions import SessionError

        if not name:
            self.say("usage: /fork NAME", style="red")
            return
        if not self._new_name(name):
            return
        try:
            m = self._copy_to(name)
        except SessionError as e:
            self.say(str(e), style="red")
            return
        if m is None:
            self.say("nothing to fork yet: send a message first", style="red")
            return
        self._said("forked to", name, m)
        self.say(f"still in {'session ' + repr(self.name) if self.name else 'this conversation'}; "
                 f"/load {name} switches", style="dim")

    def load(self, name: str):
        from ..sessions import SessionError

        if not name:
            self.say("usage: /load NAME", style="red")
            return
        import copy

        from ..generate import Conversation

        rt = self.runtime()
        conv, sampling = Conversation(), copy.copy(self.sampling)
        try:
            m = self.store.manifest(name)
            self.store._check(m, rt.fp, name)
            turns = restore_conversation(m, conv, sampling)
            state = load_state(rt, name, self.s.tokenizer, conv, self.s.max_context)
        except SessionError as e:
            self.say(str(e), style="red")
            return
        self.conv.system, self.conv.messages = conv.system, conv.messages
        self.conv.thinking, self.conv.max_effort = conv.thinking, conv.max_effort
        self.sampling.__dict__.update(sampling.__dict__)
        self.turns = turns
        st_max = (m.get("settings") or {}).get("max_tokens")
        if isinstance(st_max, int) and st_max > 0:
            self.max_tokens = st_max
        if state is not None:
            self.gen.install(state)
        else:
            self.gen.reset()
        self.name = name
        rt.own = name
        self.say(f"loaded session '{name}': {len(self.gen.tokens):,} tokens restored (no prefill), "
                 f"{self.turns} turns, mode {self.conv.mode}", style="dim")
        self.show_last()

    def show_last(self):
        for msg in self.conv.messages[-2:]:
            text = (msg.get("content") or "").strip().replace("\n", " ")
            if len(text) > 200:
                text = text[:200] + "…"
            self.say(f"  {msg.get('role')}: {text}", style="dim")

    def list_sessions(self):
        from ..sessions import SessionStore

        store = self.store or SessionStore()
        rows = store.list()
        if not rows:
            self.say(f"no sessions in {store.root}", style="dim")
            return
        for r in rows:
            mark = "*" if r["name"] == self.name else " "
            self.say(f"{mark} {r['name']:<24} {r['tokens']:>9,} tokens {r['segments']:>4} segments "
                     f"{fmt_bytes(r['bytes']):>9}", style=None)

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
        if st.reused_from:
            self.say(reuse_line(st, st.prompt_tokens), style="dim")
        self.say(format_stats(st), style="dim")
        if self.name:
            self.autosave()
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
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="Start in Think High mode (/think, /nothink switch; default: no thinking, or the session's mode)."),
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
    session: Optional[str] = typer.Option(None, "--session", help="Keep the conversation on disk as session NAME: created at the first reply, resumed if it exists (no prefill)."),
    kv_format: Optional[str] = typer.Option(None, "--kv-format", help="Decode-state storage: fp8 (default) or bf16 (default for a resumed session: its own)."),
    reuse_prefix: Optional[bool] = typer.Option(None, "--reuse-prefix/--no-reuse-prefix", help="Start prompts from the longest prefix any stored session holds (default: on when the sessions folder exists)."),
):
    """Chat with a model: multi-turn, the decode state reused across turns."""
    from ..generate import DEFAULT_MAX_TOKENS, DEMO_MAX_TOKENS, Conversation, dsv4_home
    from ..sessions import SessionError, SessionStore

    color = color_enabled(no_color)
    err = make_console(True, color)
    if max_tokens is not None and max_tokens < 1:
        fail(f"--max-tokens must be positive (got {max_tokens})")
    kv = check_kv_format(kv_format)
    max_tokens_opt = max_tokens
    store = SessionStore()
    manifest = None
    if session is not None:
        try:
            store.path(session)
            manifest = store.manifest(session) if store.exists(session) else None
        except SessionError as e:
            session_fail(e)
        if manifest is not None:
            model = session_model(model, manifest)
            kv = kv or manifest["fingerprints"]["state_format"].rsplit("-", 1)[0]
    kv = kv or "fp8"
    reuse = reuse_enabled(reuse_prefix, store)
    notices = []

    def warn(text):
        notices.append((f"warning: {text}", "yellow"))

    try:
        s = open_session(model, max_context, prefill_step, err)
        sampling = sampling_from(s.folder, temp, top_p, seed, repetition_penalty)
        conv = Conversation(system=system, thinking=bool(think) or think_max, max_effort=think_max)
        if max_tokens is None:
            max_tokens = DEMO_MAX_TOKENS if s.demo else DEFAULT_MAX_TOKENS
        rt = state = None
        if session is not None or reuse:
            from ..sessions.runtime import SessionRuntime

            rt = SessionRuntime(store, s.fingerprints(kv), own=session, search_all=reuse, warn=warn)
        turns = 0
        if manifest is not None:
            # fingerprints and hashes are checked here, before the model is loaded
            try:
                store._check(manifest, rt.fp, session)
                given = [k for k, v in (("temperature", temp), ("top_p", top_p), ("seed", seed),
                                        ("repetition_penalty", repetition_penalty)) if v is not None]
                turns = restore_conversation(manifest, conv, sampling, given=given,
                                             keep_system=system is not None,
                                             keep_mode=think is not None or think_max)
                st_max = (manifest.get("settings") or {}).get("max_tokens")
                if max_tokens_opt is None and isinstance(st_max, int) and st_max > 0:
                    max_tokens = st_max
                state = load_state(rt, session, s.tokenizer, conv, s.max_context)
            except SessionError as e:
                session_fail(e)
        s.preflight(state_copies=2, skip=no_memory_check)  # the live state and the turn checkpoint
        s.load(kv)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    gen = s.generator(keep_checkpoint=True, track_logits=True)  # /save needs the logits (last position only: cheap)
    if rt is not None:
        gen.prefix_source = rt
    if state is not None:
        gen.install(state)
    repl = ChatREPL(s, gen, conv, sampling, max_tokens, color, store=store, rt=rt, name=session, kv_format=kv)
    repl.turns = turns
    if manifest is not None:
        load = rt.loads[-1] if rt.loads else None
        took = f" from {fmt_bytes(load.bytes)} in {load.seconds:.2f}s" if load else ""
        stored, have = len(manifest["tokens"]), len(gen.tokens)
        rest = ("(no prefill)" if have >= stored else
                f"of {stored:,}; the other {stored - have:,} are prefilled with your next message")
        repl.notices.append((f"resumed session '{session}': {have:,} tokens restored{took} {rest}, "
                             f"{turns} turns", "bold"))
    elif session is not None:
        repl.notices.append((f"new session '{session}': saved in {store.root} after every reply", "dim"))
    repl.notices = notices + repl.notices
    if rt is not None:
        rt.warn = lambda text: repl.say(f"warning: {text}", style="yellow")
    interactive = color and sys.stdin.isatty() and sys.stdout.isatty()
    reader = PromptReader(dsv4_home() / "chat_history") if interactive else PlainReader(sys.stdout)
    repl.run(reader)


def restore_conversation(manifest, conv, sampling, given=(), keep_system=False,
                         keep_mode=False) -> int:
    """Transcript, think mode and sampler settings of a stored session into `conv` and
    `sampling` (except those `given` on the command line); returns the number of turns."""
    from ..sessions.runtime import apply_mode, apply_sampler, split_messages

    settings = manifest.get("settings") or {}
    system, messages = split_messages(manifest.get("messages", []))
    if not keep_system:
        conv.system = system
    conv.messages = messages
    if not keep_mode:
        apply_mode(conv, settings.get("mode"))
    apply_sampler(sampling, settings, given)
    return sum(1 for m in messages if m.get("role") == "assistant")


def load_state(rt, name: str, tokenizer, conv, max_context: int):
    """The stored state of session `name` that every next prompt of `conv` starts with (its
    longest such boundary), loaded and hash-checked; None when it holds none."""
    from ..sessions import SessionError
    from ..sessions.runtime import stable_prefix

    history = stable_prefix(tokenizer, conv)
    saved = rt.own, rt.search_all
    rt.own, rt.search_all = name, False
    try:
        found = rt.best(history)
    finally:
        rt.own, rt.search_all = saved
    if found is None:
        return None
    if found[1] >= max_context:
        raise SessionError(f"session '{name}' holds {found[1]:,} tokens, more than the context of "
                           f"{max_context:,} (--max-context)")
    return rt.state_of(rt.load(found[0], upto=found[1]), found[0])
