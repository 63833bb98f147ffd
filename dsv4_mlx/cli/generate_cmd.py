"""`dsv4 generate` and `dsv4 demo`, and the pieces `dsv4 chat` shares with them: model
resolution (the embedded demo model when MODEL is omitted), memory preflight and loading,
the prefill progress bar, streamed output, the stats line, Ctrl+C handling.

`dsv4 generate [MODEL] -p TEXT | --file F | < stdin` prints the answer on stdout and the
reasoning (thinking modes), notices and stats on stderr, so stdout stays clean when piped.

Output honours `NO_COLOR`, `TERM=dumb` and `--no-color`: no escape codes at all (no colors,
no styles, no live progress bar; long prefills report plain lines on stderr instead).

Sessions (docs/SESSIONS.md). With `--reuse-prefix` (the default when the sessions folder,
`$DSV4_SESSIONS` or `~/.cache/dsv4-mlx/sessions`, exists) a prompt that starts like a stored
snapshot resumes from its longest valid boundary and prefills only the rest; a prompt of at
least `--auto-snapshot-min` tokens is saved as an automatic snapshot `auto-<hash>` (boundaries
every 16,384 tokens, so an interrupted prefill resumes too), and automatic snapshots are kept
under `--sessions-budget` (`$DSV4_SESSIONS_BUDGET`, default 20G) by evicting the least recently
used. How many prompt tokens were reused and prefilled goes to stderr. `--doc FILE` sends
documents first, framed as `dsv4 doc` frames them, so `generate --doc F -p Q` and
`doc F --session S` + `ask --session S Q` see the same conversation.

`DSV4_COMPUTE_DTYPE=float32|bfloat16|float16` overrides the compute dtype (tests, debugging:
in float32 results do not depend on how a prompt is split into chunks).

Exit codes (generate, demo and chat):

* 0   success (also when a reply stops at --max-tokens or at the end of the context)
* 1   unexpected failure
* 2   bad input: missing or invalid model folder, bad option, no prompt, or a prompt longer
      than the context (--max-context)
* 3   not enough memory for the weights and the decode state at --max-context
* 4   session error (not found, bad name, disk full), 5 incompatible session (another model,
      tokenizer, encoding, state format or format version), 6 corrupt session
* 130 interrupted with Ctrl+C (generate, demo; in chat Ctrl+C stops the reply only)
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console

from .main import app, fail

EXIT_MEMORY = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 unexpected failure; 2 bad input (model folder, options, no prompt, "
    "prompt longer than the context); 3 not enough memory; 4 session error (not found, bad name, "
    "disk full); 5 incompatible session; 6 corrupt session; 130 interrupted."
)
KV_FORMATS = ("fp8", "bf16")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

DEMO_NOTICE = ("this is the built-in demo model: a tiny DeepSeek-V4 with random weights, so its "
               "output is gibberish; pass a converted model folder (dsv4 convert) for real answers")


# ---------------------------------------------------------------------------
# Terminal conventions
# ---------------------------------------------------------------------------


def color_enabled(no_color: bool = False) -> bool:
    """False with --no-color, NO_COLOR (any value) or TERM=dumb."""
    return not (no_color or "NO_COLOR" in os.environ and os.environ["NO_COLOR"] != ""
                or os.environ.get("TERM") == "dumb")


def make_console(stderr: bool, color: bool) -> Console:
    """A rich console that writes no escape code at all when `color` is off."""
    if color:
        return Console(stderr=stderr, highlight=False, emoji=False, soft_wrap=True)
    return Console(stderr=stderr, highlight=False, emoji=False, soft_wrap=True, color_system=None,
                   force_terminal=False, force_interactive=False)


class StopFlag:
    """While active, the first Ctrl+C sets `.stopped` (the reply stops between two tokens);
    a second one raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.stopped = False
        self._old = None

    def __call__(self) -> bool:
        return self.stopped

    def _handle(self, signum, frame):
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True

    def __enter__(self):
        self.stopped = False
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# ---------------------------------------------------------------------------
# Model resolution and loading
# ---------------------------------------------------------------------------


def resolve_model(model: Optional[Path], err: Console):
    """MODEL -> (folder, config, is_random_demo). No MODEL: the demo model, built on first use."""
    from ..generate import ensure_demo_model, is_random_demo

    if model is None:
        try:
            folder = ensure_demo_model(console=err)
        except OSError as e:
            fail(f"could not build the demo model in {e.filename or 'the cache folder'} ({e.strerror or e}); "
                 "set DSV4_HOME to a writable folder")
        except RuntimeError as e:  # e.g. the tokenizer package is not installed
            fail(f"could not build the demo model: {e}")
    else:
        folder = Path(model).expanduser()
        if not folder.exists():
            fail(f"{folder} does not exist")
        if not folder.is_dir():
            fail(f"{folder} is not a folder; pass a model folder written by `dsv4 convert`")
    path = folder / "config.json"
    if not path.is_file():
        fail(f"{folder} has no config.json; pass a model folder written by `dsv4 convert`")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(f"{path} is not valid JSON ({e})")
    if not isinstance(cfg, dict) or cfg.get("model_type") != "deepseek_v4":
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        fail(f"{folder} is not a DeepSeek-V4 model (model_type {kind!r})")
    if not any(folder.glob("*.safetensors")):
        fail(f"{folder} has no weights (*.safetensors)")
    if "quantization" not in cfg and (cfg.get("quantization_config") or {}).get("quant_method") == "fp8" \
            and not (folder / ".dsv4-convert.json").exists():
        fail(f"{folder} is a published FP8/FP4 checkpoint; convert it first: dsv4 convert {folder} OUT")
    return folder, cfg, is_random_demo(cfg)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@functools.lru_cache(maxsize=2)
def _tokenizer(folder: str, eos: tuple, _mtime: int):
    """The tokenizer of a folder, loaded once per process (it takes a second or two; the
    streaming detokenizer is copied for each use, so sharing the wrapper is safe)."""
    from ..loader import load_tokenizer

    return load_tokenizer(Path(folder), list(eos))


class Session:
    """A resolved model: config, args, tokenizer (loaded first, cheap) and model (on demand)."""

    def __init__(self, folder: Path, cfg: dict, demo: bool, max_context: Optional[int],
                 prefill_step: int, err: Console):
        from ..model import ConfigError, ModelArgs

        self.folder, self.cfg, self.demo, self.err = folder, cfg, demo, err
        try:
            self.args = ModelArgs.from_dict(cfg)
        except (ConfigError, TypeError, ValueError) as e:
            fail(f"{folder} is not a usable DeepSeek-V4 config: {e}")
        limit = int(self.args.max_position_embeddings)
        if max_context is None:
            max_context = limit
        if max_context < 2:
            fail(f"--max-context must be at least 2 (got {max_context})")
        if max_context > limit:
            fail(f"--max-context {max_context:,} is more than the model's {limit:,} positions")
        if prefill_step < 1:
            fail(f"--prefill-step must be positive (got {prefill_step})")
        self.max_context = int(max_context)
        self.prefill_step = int(prefill_step)
        self.model = None
        try:
            eos = self.args.eos_token_id
            self.tokenizer = _tokenizer(str(folder.resolve()), (eos,) if isinstance(eos, int) else tuple(eos),
                                        _mtime(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - any tokenizer problem is a bad model folder
            fail(f"{folder} has no usable tokenizer ({type(e).__name__}: {e})")

    def preflight(self, state_copies: int = 1, skip: bool = False):
        from ..generate import memory_preflight

        recipe = None
        try:
            recipe = json.loads((self.folder / ".dsv4-convert.json").read_text()).get("recipe")
        except (OSError, ValueError, AttributeError):
            pass
        chk = memory_preflight(self.folder, self.args, self.max_context, self.prefill_step,
                               state_copies=state_copies, recipe=recipe)
        if not chk.fits:
            if skip:
                self.err.print(f"warning: {chk.message} (continuing: --no-memory-check)", markup=False)
            else:
                fail(chk.message + " (--no-memory-check runs anyway)", EXIT_MEMORY)
        return chk

    def load(self, kv_format: Optional[str] = None):
        from ..generate import set_wired_limit
        from ..loader import load_model

        dtype = os.environ.get("DSV4_COMPUTE_DTYPE")
        if dtype and dtype not in COMPUTE_DTYPES:
            fail(f"DSV4_COMPUTE_DTYPE must be one of {', '.join(COMPUTE_DTYPES)}, not {dtype!r}")
        set_wired_limit()
        try:
            self.model = load_model(self.folder)
        except (ValueError, KeyError, OSError) as e:
            fail(f"could not load the weights of {self.folder}: {e}")
        if dtype:
            import mlx.core as mx

            self.model.set_dtype(getattr(mx, dtype))
        if kv_format:
            self.model.kv_format = kv_format
        return self.model

    def fingerprints(self, kv_format: str):
        """The session fingerprints of this model; a DSV4_COMPUTE_DTYPE override computes other
        states, so it makes another model fingerprint."""
        import hashlib

        from ..sessions import Fingerprints

        fp = Fingerprints.of(self.folder, kv_format)
        dtype = os.environ.get("DSV4_COMPUTE_DTYPE")
        if dtype:
            fp.model = hashlib.sha256(f"{fp.model}:{dtype}".encode()).hexdigest()[:32]
        return fp

    def generator(self, keep_checkpoint: bool, track_logits: bool = False):
        from ..generate import Generator

        return Generator(self.model, self.tokenizer, max_context=self.max_context,
                         prefill_step_size=self.prefill_step, keep_checkpoint=keep_checkpoint,
                         track_logits=track_logits)


def open_session(model: Optional[Path], max_context: Optional[int], prefill_step: int, err: Console) -> Session:
    folder, cfg, demo = resolve_model(model, err)
    return Session(folder, cfg, demo, max_context, prefill_step, err)


def check_kv_format(kv_format: Optional[str]) -> Optional[str]:
    if kv_format is not None and kv_format not in KV_FORMATS:
        fail(f"--kv-format must be fp8 or bf16, not {kv_format!r}")
    return kv_format


def session_fail(e) -> None:
    """A SessionError as one sentence, with its exit code (4, 5 or 6)."""
    fail(str(e), getattr(e, "exit_code", 4))


def session_model(model: Optional[Path], manifest) -> Optional[Path]:
    """MODEL, else the folder a stored session was made with (None: the demo model)."""
    if model is not None or manifest is None:
        return model
    stored = (manifest.get("settings") or {}).get("model")
    if stored and (Path(stored) / "config.json").is_file():
        return Path(stored)
    if stored and not Path(stored).name.startswith("demo-"):
        fail(f"the session was made with {stored}, which is gone; pass the model folder")
    return None


def sessions_budget(text: Optional[str]) -> int:
    from ..sessions.runtime import DEFAULT_BUDGET
    from .main import _size

    return _size(text or os.environ.get("DSV4_SESSIONS_BUDGET") or DEFAULT_BUDGET)


def reuse_enabled(flag: Optional[bool], store) -> bool:
    """--reuse-prefix / --no-reuse-prefix; by default on when the sessions folder exists."""
    return store.root.is_dir() if flag is None else bool(flag)


def reuse_line(st, prompt_tokens: int) -> str:
    src = f" from session '{st.reused_from}'" if st.reused_from else (" from this process's cache"
                                                                       if st.reused_tokens else "")
    return (f"prompt {prompt_tokens:,} tokens: {st.reused_tokens:,} reused{src}, "
            f"{st.prefill_tokens:,} prefilled")


def sampling_from(folder: Path, temp, top_p, seed, repetition_penalty=None, demo=False):
    from ..generate import generation_defaults

    s = generation_defaults(folder)
    if temp is not None:
        if temp < 0:
            fail(f"--temp must be >= 0 (got {temp})")
        s.temperature = float(temp)
    if top_p is not None:
        if not 0 < top_p <= 1:
            fail(f"--top-p must be in (0, 1] (got {top_p})")
        s.top_p = float(top_p)
    if repetition_penalty is not None:
        if repetition_penalty <= 0:
            fail(f"--repetition-penalty must be positive (got {repetition_penalty})")
        s.repetition_penalty = float(repetition_penalty)
    s.seed = seed
    return s


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def format_stats(st) -> str:
    prompt = f"prompt {st.prefill_tokens:,} tok at {st.prompt_tps:,.1f} tok/s"
    if st.reused_tokens:
        prompt += f" (+{st.reused_tokens:,} cached)"
    parts = [
        f"first token {st.time_to_first_token:.2f}s",
        prompt,
        f"reply {st.generation_tokens:,} tok at {st.generation_tps:,.1f} tok/s",
        f"context {st.context_used:,}/{st.context_limit:,}",
        f"peak memory {fmt_bytes(st.peak_memory)}",
    ]
    why = {"stop": "", "length": "max tokens", "context": "context full", "interrupted": "interrupted"}
    tail = why.get(st.finish_reason, st.finish_reason)
    return " · ".join(parts) + (f" · stopped: {tail}" if tail else "")


def context_warning(st) -> Optional[str]:
    from ..generate import WARN_CONTEXT_FRACTION

    if st.finish_reason == "context":
        return (f"the context is full ({st.context_limit:,} tokens) and the reply was cut there; "
                "start over or use a larger --max-context")
    if st.context_used >= WARN_CONTEXT_FRACTION * st.context_limit:
        return (f"the context is {100 * st.context_used / st.context_limit:.0f}% full "
                f"({st.context_used:,} of {st.context_limit:,} tokens)")
    return None


class PrefillProgress:
    """The prefill progress callback: a rich bar (tokens done/total, tok/s, ETA) on a colour
    terminal, plain lines otherwise; shown only for prompts longer than one chunk."""

    def __init__(self, err: Console, color: bool, threshold: int):
        self.err, self.color, self.threshold = err, color, threshold
        self.progress = None
        self.task = None
        self.t0 = 0.0
        self.last_line = 0.0

    def __call__(self, done: int, total: int):
        if total <= self.threshold:
            return
        if done == 0:
            self.t0 = self.last_line = time.perf_counter()
            if self.color and self.err.is_terminal:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                                           TextColumn, TimeRemainingColumn)
                from rich.text import Text

                class TokPerSec(ProgressColumn):
                    def render(self, task):
                        return Text(f"{task.speed:,.0f} tok/s" if task.speed else "- tok/s")

                self.progress = Progress(TextColumn("prefill"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("tokens"), TokPerSec(), TimeRemainingColumn(),
                                         console=self.err, transient=True)
                self.progress.start()
                self.task = self.progress.add_task("prefill", total=total)
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=done)
            if done >= total:
                self.close()
            return
        now = time.perf_counter()
        if done >= total or now - self.last_line >= 2.0:
            self.last_line = now
            tps = done / max(now - self.t0, 1e-9)
            eta = (total - done) / tps if tps else 0
            self.err.print(f"prefill {done:,}/{total:,} tokens, {tps:,.0f} tok/s, ETA {eta:.0f}s",
                           markup=False)

    def close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def stream_reply(gen, prompt_ids, *, sampling, max_tokens, answer_out: Callable[[str], None],
                 reasoning_out: Callable[[str], None], progress=None, should_stop=None,
                 on_answer_start: Optional[Callable[[], None]] = None, after_prefill=None):
    """Run `gen.stream` and route the chunks; returns a `Reply`."""
    from ..generate import Reply

    r = Reply()
    started = False
    try:
        for c in gen.stream(prompt_ids, sampling=sampling, max_tokens=max_tokens, progress=progress,
                            should_stop=should_stop, after_prefill=after_prefill):
            if c.kind == "reasoning":
                r.reasoning += c.text
                reasoning_out(c.text)
            else:
                if not started and on_answer_start is not None:
                    on_answer_start()
                started = True
                r.answer += c.text
                answer_out(c.text)
    finally:
        if progress is not None:
            progress.close()
    r.stats = gen.last_stats
    return r


# ---------------------------------------------------------------------------
# dsv4 generate
# ---------------------------------------------------------------------------

MODEL_ARG = typer.Argument(
    None, help="A model folder written by `dsv4 convert`. Omitted: the built-in demo model "
    "(random weights, built once under $DSV4_HOME or ~/.cache/dsv4-mlx).", show_default=False)


def _read_prompt(prompt: Optional[str], file: Optional[Path]) -> str:
    if prompt is not None and file is not None:
        fail("pass the prompt with -p or --file, not both")
    if prompt is not None:
        text = prompt
    elif file is not None:
        if str(file) == "-":
            text = sys.stdin.read()
        else:
            try:
                text = Path(file).expanduser().read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                fail(f"cannot read {file} ({e.strerror or e})")
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        fail("no prompt: pass -p TEXT, --file FILE, or pipe the text on stdin")
    if not text.strip():
        fail("the prompt is empty")
    return text


def _mode(think: bool, think_max: bool) -> tuple:
    return (think or think_max), think_max


def run_once(model: Optional[Path], text: str, *, thinking: bool, max_effort: bool, system: Optional[str],
             max_tokens: Optional[int], temp, top_p, seed, max_context, repetition_penalty,
             prefill_step: int, no_color: bool, no_memory_check: bool, show_stats: bool,
             echo_prompt: bool = False, kv_format: Optional[str] = None, reuse_prefix: Optional[bool] = False,
             auto_snapshot_min: Optional[int] = None, budget: Optional[str] = None, docs=()):
    """Shared by `generate` and `demo`: one prompt, one streamed reply."""
    from ..generate import DEFAULT_MAX_TOKENS, DEMO_MAX_TOKENS, Conversation, encode_prompt

    color = color_enabled(no_color)
    err = make_console(True, color)
    if max_tokens is not None and max_tokens < 1:
        fail(f"--max-tokens must be positive (got {max_tokens})")
    kv = check_kv_format(kv_format) or "fp8"
    s = open_session(model, max_context, prefill_step, err)
    sampling = sampling_from(s.folder, temp, top_p, seed, repetition_penalty)
    if s.demo:
        err.print(f"note: {DEMO_NOTICE}.", markup=False, style="yellow")
    conv = Conversation(system=system, thinking=thinking, max_effort=max_effort)
    if docs:
        from ..sessions.runtime import document_message, read_documents

        try:
            conv.messages.append({"role": "user", "content": document_message(read_documents(docs))})
        except OSError as e:
            fail(f"cannot read {e.filename} ({e.strerror or e})")
    prompt_text = conv.encode(text)
    ids = encode_prompt(s.tokenizer, prompt_text)
    if len(ids) >= s.max_context:
        fail(f"the prompt has {len(ids):,} tokens but the context is {s.max_context:,} "
             "(--max-context); shorten the prompt or raise --max-context")
    if max_tokens is None:
        max_tokens = DEMO_MAX_TOKENS if s.demo else DEFAULT_MAX_TOKENS
    room = s.max_context - len(ids)
    if max_tokens > room:
        err.print(f"warning: the reply can use only {room:,} tokens before the context "
                  f"({s.max_context:,}) is full", markup=False, style="yellow")
    store = None
    if reuse_prefix is not False:
        from ..sessions import SessionStore

        store = SessionStore()
        if not reuse_enabled(reuse_prefix, store):
            store = None
    if auto_snapshot_min is not None and auto_snapshot_min < 1:
        fail(f"--auto-snapshot-min must be positive (got {auto_snapshot_min})")
    limit = sessions_budget(budget) if store is not None else 0
    s.preflight(state_copies=1, skip=no_memory_check)
    s.load(kv)
    gen = s.generator(keep_checkpoint=False, track_logits=store is not None)
    after = None
    if store is not None:
        after = attach_reuse(gen, s, store, kv, err, ids, conv, sampling, max_tokens, limit,
                             auto_snapshot_min, prompt_text=prompt_text)
    if echo_prompt:
        err.print(f"prompt: {text}", markup=False, style="bold")
    return emit_reply(gen, ids, s, sampling, max_tokens, err, color, thinking, show_stats, after_prefill=after)


def attach_reuse(gen, s, store, kv, err, ids, conv, sampling, max_tokens, budget_bytes,
                 auto_snapshot_min, own=None, touch=True, prompt_text: Optional[str] = None):
    """Prefix reuse from every compatible session and, for a long prompt, an automatic snapshot
    (resume points: every 16,384 tokens, the end of the user's text - so a prompt that adds to
    it starts there - and the whole prompt); returns the `after_prefill` callback (prints how
    many prompt tokens were reused)."""
    from ..sessions import SessionError
    from ..sessions.runtime import (DEFAULT_AUTO_SNAPSHOT_MIN, DEFAULT_CHECKPOINT_EVERY, AutoSnapshot,
                                    SessionRuntime, conversation_messages, make_settings,
                                    stable_text_prefix)

    def warn(text):
        err.print(f"warning: {text}", markup=False, style="yellow")

    try:
        fp = s.fingerprints(kv)
    except (OSError, ValueError) as e:
        warn(f"prefix reuse is off: cannot fingerprint {s.folder} ({e})")
        return None
    rt = SessionRuntime(store, fp, own=own, search_all=True, touch=touch, warn=warn)
    gen.prefix_source = rt
    snap = None
    if len(ids) >= (auto_snapshot_min or DEFAULT_AUTO_SNAPSHOT_MIN):
        msgs = conversation_messages(conv)
        snap = AutoSnapshot(rt, ids[:-1], msgs, make_settings("auto", s.folder, conv, sampling, max_tokens),
                            budget_bytes, warn)
        gen.boundary_every = DEFAULT_CHECKPOINT_EVERY
        gen.on_boundary = snap.on_boundary
        if prompt_text is not None:
            b = len(stable_text_prefix(s.tokenizer, prompt_text))
            if 0 < b < len(ids) - 1:
                gen.boundary_at = {b}

    def after(g):
        st = g.last_stats
        src = f" from session '{g.reused_from}'" if g.reused_from else ""
        err.print(f"prompt {len(ids):,} tokens: {st.reused_tokens:,} reused{src}, "
                  f"{len(ids) - st.reused_tokens:,} prefilled", markup=False, style="dim")
        if snap is not None:
            try:
                snap.finish(g)
            except SessionError as e:
                warn(str(e))
            if snap.saved:
                err.print(f"saved the prompt's state as session {snap.name} ({snap.saved:,} tokens)",
                          markup=False, style="dim")
            if snap.evicted:
                err.print(f"evicted {len(snap.evicted)} automatic snapshot(s) to stay under the sessions "
                          f"budget: {', '.join(snap.evicted)}", markup=False, style="dim")

    return after


def emit_reply(gen, ids, s, sampling, max_tokens, err, color, thinking, show_stats, after_prefill=None):
    """Stream one reply: the answer on stdout, reasoning and stats on stderr; Ctrl+C exits 130."""
    from ..generate import ContextError

    out = sys.stdout
    tail = {"answer": "", "reasoning": False}

    def answer_out(t):
        if tail.get("broken"):
            return
        try:
            out.write(t)
            out.flush()
        except BrokenPipeError:  # `dsv4 generate ... | head`: stop quietly
            tail["broken"] = True
            flag.stopped = True

    def reasoning_out(t):
        tail["reasoning"] = True
        err.print(t, end="", style="dim", markup=False, soft_wrap=True)

    def answer_start():
        if tail["reasoning"]:
            err.print("", markup=False)

    flag = StopFlag()
    try:
        with flag:
            r = stream_reply(gen, ids, sampling=sampling, max_tokens=max_tokens, answer_out=answer_out,
                             reasoning_out=reasoning_out, on_answer_start=answer_start,
                             progress=PrefillProgress(err, color, s.prefill_step), should_stop=flag,
                             after_prefill=after_prefill)
    except ContextError as e:
        fail(str(e))
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        fail("interrupted", EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - session faults inside the prefill
        from ..sessions import SessionError

        if isinstance(e, SessionError):
            session_fail(e)
        raise
    if tail.get("broken"):
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        raise typer.Exit(0)
    if r.answer and not r.answer.endswith("\n"):
        out.write("\n")
    elif tail["reasoning"] and not r.answer:
        err.print("", markup=False)
    out.flush()
    st = r.stats
    if thinking and st.generation_tokens and st.reasoning_tokens == st.generation_tokens \
            and st.finish_reason != "stop":
        err.print("note: the reply stopped while still reasoning, before any answer "
                  "(raise --max-tokens)", markup=False, style="yellow")
    if show_stats:
        err.print(format_stats(st), markup=False, style="dim")
    w = context_warning(st)
    if w:
        err.print(f"warning: {w}", markup=False, style="yellow")
    if flag.stopped:
        raise typer.Exit(EXIT_INTERRUPTED)
    return r


def _guard(fn, *a, **kw):
    """Ctrl+C outside the reply (loading, building the demo model): exit 130, no traceback."""
    try:
        return fn(*a, **kw)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)


@app.command("generate", epilog=EXIT_CODES_HELP)
def generate(
    model: Optional[Path] = MODEL_ARG,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt text."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the prompt from a file ('-': stdin)."),
    think: bool = typer.Option(False, "--think/--no-think", help="Think High: reason before answering (default: no thinking)."),
    think_max: bool = typer.Option(False, "--think-max", help="Think Max: the longest reasoning (the model card advises a context >= 384K)."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", help="Most tokens to generate (default 8192; 100 for the demo model)."),
    temp: Optional[float] = typer.Option(None, "--temp", help="Sampling temperature, 0 = greedy (default: the model's generation_config.json, else 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling (default: generation_config.json, else 1.0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed, for reproducible sampling."),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Context limit in tokens, prompt + reply (default: the model's max_position_embeddings)."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="mlx-lm repetition penalty (off by default)."),
    prefill_step: int = typer.Option(2048, "--prefill-step", help="Prompt tokens per prefill chunk."),
    no_color: bool = typer.Option(False, "--no-color", help="No colors or escape codes (also NO_COLOR, TERM=dumb)."),
    no_memory_check: bool = typer.Option(False, "--no-memory-check", help="Run even if the memory preflight says it will not fit."),
    stats: bool = typer.Option(True, "--stats/--no-stats", help="Print speed and memory on stderr."),
    doc: List[Path] = typer.Option([], "--doc", help="A document sent before the prompt (repeatable), framed as `dsv4 doc` frames it."),
    kv_format: Optional[str] = typer.Option(None, "--kv-format", help="Decode-state storage: fp8 (default) or bf16."),
    reuse_prefix: Optional[bool] = typer.Option(None, "--reuse-prefix/--no-reuse-prefix", help="Resume from the longest stored session prefix and snapshot long prompts (default: on when the sessions folder exists)."),
    auto_snapshot_min: int = typer.Option(4096, "--auto-snapshot-min", help="Save prompts of at least this many tokens as automatic snapshots (auto-<hash>)."),
    budget: Optional[str] = typer.Option(None, "--sessions-budget", help="Disk budget of the automatic snapshots, least recently used evicted first (default $DSV4_SESSIONS_BUDGET or 20G)."),
):
    """Generate one reply: the answer on stdout; reasoning and stats on stderr."""
    thinking, max_effort = _mode(think, think_max)
    text = _read_prompt(prompt, file)
    _guard(run_once, model, text, thinking=thinking, max_effort=max_effort, system=system, max_tokens=max_tokens,
             temp=temp, top_p=top_p, seed=seed, max_context=max_context,
             repetition_penalty=repetition_penalty, prefill_step=prefill_step, no_color=no_color,
             no_memory_check=no_memory_check, show_stats=stats, kv_format=kv_format,
             reuse_prefix=reuse_prefix, auto_snapshot_min=auto_snapshot_min, budget=budget, docs=doc)


DEMO_PROMPT = "In two sentences, what is DeepSeek-V4?"


@app.command("demo", epilog=EXIT_CODES_HELP)
def demo(
    max_tokens: int = typer.Option(40, "--max-tokens", "-n", help="Tokens to generate."),
    think: bool = typer.Option(False, "--think/--no-think", help="Thinking mode."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    no_color: bool = typer.Option(False, "--no-color", help="No colors or escape codes (also NO_COLOR, TERM=dumb)."),
):
    """Run the built-in demo model (random weights) on a fixed prompt and print the stats.

    Builds the model on first use (seconds; cached under $DSV4_HOME or ~/.cache/dsv4-mlx).
    Its output is gibberish: it shows that the pipeline runs here, and how fast.
    """
    _guard(run_once, None, DEMO_PROMPT, thinking=think, max_effort=False, system=None, max_tokens=max_tokens,
             temp=None, top_p=None, seed=seed, max_context=None, repetition_penalty=None,
             prefill_step=2048, no_color=no_color, no_memory_check=False, show_stats=True,
             echo_prompt=True)
