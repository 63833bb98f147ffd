"""Generation: streaming replies through mlx-lm, chunked prefill, cache reuse across turns,
memory preflight and the embedded demo model (spec §7; issue 3).

The pieces, from the bottom up:

* :class:`SamplingConfig` and :func:`generation_defaults` - temperature / top-p / seed, with
  the defaults of the model folder's ``generation_config.json`` (V4: T = 1.0, top_p = 1.0).
* :func:`memory_preflight` - weights (the safetensors files) + decode state at the requested
  context (:func:`dsv4_mlx.model.summary.state_bytes`) + working memory, against what the
  device may use; :func:`set_wired_limit` does what mlx-lm does on Metal.
* :class:`Generator` - holds model, tokenizer, the decode state (``cache``) and the tokens it
  holds (``tokens``). :meth:`Generator.prefill` makes the cache hold a token list, reusing the
  longest cached prefix and computing the rest in chunks (with a progress callback);
  :meth:`Generator.stream` prefills a prompt and streams the reply through mlx-lm's
  ``generate_step`` (``make_sampler``, ``make_logits_processors``, the tokenizer's streaming
  detokenizer), split into reasoning and answer at ``</think>``, stopping at EOS, at
  ``max_tokens``, when the context is full or when ``should_stop()`` says so. The stats of the
  last reply are in ``Generator.last_stats``. The on-disk sessions build on this class.
* :class:`Conversation` - the message list of a chat and its encoding (``encode_messages``).
* :func:`ensure_demo_model` - a tiny random-weight model in the real architecture with the real
  V4 tokenizer, built deterministically on first use under ``$DSV4_HOME`` (default
  ``~/.cache/dsv4-mlx``) and reused afterwards.

Cache reuse. The V4 decode state cannot be trimmed (compressed entries summarise whole
windows), so going back is done with a checkpoint: after each prompt prefill the Generator
keeps a view of the state at ``len(prompt) - 1`` tokens (MLX arrays are copy-on-write, so this
costs nothing until the state changes). The next turn's prompt normally extends the cached
tokens; when it does not (thinking dropped from the previous turn, a reply re-tokenized
differently, an edited system prompt), the Generator restores the checkpoint if it is a
prefix of the new prompt, and otherwise starts from an empty cache. Either way the cache holds
exactly the tokens of the new prompt, as if it had been computed in one go.

On-disk sessions (``dsv4_mlx.sessions.runtime``) plug in through three attributes:
``prefix_source`` (called before a prefill computes anything: it may install a stored state
holding a longer prefix of the tokens, see :meth:`Generator.install`), ``track_logits`` (keep
the next-token logits of the state, ``Generator.next_logits``, computed for the last position
only) and ``boundary_every`` / ``on_boundary`` (split the prefill at every multiple of
``boundary_every`` positions, and at the positions in ``boundary_at``, and call
``on_boundary(generator)`` there: checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

from . import __version__
from .encoding import THINK_END, THINK_START, encode_messages

GIB = 2**30
MIB = 2**20
DEFAULT_PREFILL_STEP = 2048
DEFAULT_MAX_TOKENS = 8192
DEMO_MAX_TOKENS = 100  # the random demo model never stops by itself
WARN_CONTEXT_FRACTION = 0.9
MACOS_RESERVE = 4 * GIB  # what raising the wired limit should leave to macOS


class GenerateError(Exception):
    """A problem the user can fix; the message is one sentence saying how."""


class ContextError(GenerateError):
    """The prompt does not fit the context."""


class MemoryPreflightError(GenerateError):
    """The model and its decode state will not fit in the memory the device may use."""


# ---------------------------------------------------------------------------
# Sampling settings
# ---------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    seed: Optional[int] = None

    def sampler(self):
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(temp=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(self) -> list:
        from mlx_lm.sample_utils import make_logits_processors

        return make_logits_processors(
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
        )


def generation_defaults(model_dir) -> SamplingConfig:
    """Sampling defaults of a model folder: its generation_config.json, else T = 1.0, top_p = 1.0
    (the V4 model card's recommendation)."""
    cfg = SamplingConfig()
    path = Path(model_dir) / "generation_config.json"
    try:
        gc = json.loads(path.read_text())
    except (OSError, ValueError):
        return cfg
    if not isinstance(gc, dict):
        return cfg
    if gc.get("do_sample") is False:
        cfg.temperature = 0.0
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    for key in ("temperature", "top_p", "min_p"):
        if num(gc.get(key)):
            setattr(cfg, key, float(gc[key]))
    if num(gc.get("top_k")):
        cfg.top_k = int(gc["top_k"])
    if num(gc.get("repetition_penalty")) and gc["repetition_penalty"] != 1.0:
        cfg.repetition_penalty = float(gc["repetition_penalty"])
    return cfg


# ---------------------------------------------------------------------------
# Memory preflight
# ---------------------------------------------------------------------------


def total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 0


def memory_budget() -> tuple:
    """(bytes the model may use, bytes of memory in all, what the first number is)."""
    import mlx.core as mx

    try:
        info = mx.device_info()
    except Exception:  # pragma: no cover - very old MLX
        info = {}
    ram = total_ram()
    memory = int(info.get("memory_size") or ram)
    rec = info.get("max_recommended_working_set_size")
    if mx.metal.is_available() and rec:
        return int(rec), memory, "GPU working set"
    return memory, memory, "RAM"


def set_wired_limit() -> Optional[int]:
    """On Metal, wire up to the recommended working set, as mlx-lm does (no-op elsewhere)."""
    import mlx.core as mx

    if not mx.metal.is_available():
        return None
    from mlx_lm.utils import maybe_set_recommended_wired_limit

    return maybe_set_recommended_wired_limit()


def weights_bytes(model_dir) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB / 10 else f"{n / MIB:,.0f} MiB"


@dataclass
class MemoryCheck:
    weights: int
    state: int
    working: int
    budget: int
    memory: int
    budget_kind: str
    context: int
    fits: bool = True
    message: str = ""

    @property
    def need(self) -> int:
        return self.weights + self.state + self.working

    def as_dict(self) -> dict:
        d = asdict(self)
        d["need"] = self.need
        return d


def memory_preflight(model_dir, args, context: int, prefill_step: int = DEFAULT_PREFILL_STEP,
                     state_copies: int = 1, budget: Optional[tuple] = None,
                     recipe: Optional[str] = None) -> MemoryCheck:
    """Will the model in `model_dir` (ModelArgs `args`) run at `context` tokens?

    Need = weights + `state_copies` x decode state at `context` + a working-memory margin
    (the size of one prefill chunk's fp32 logits, plus 512 MiB: a rough allowance for the
    activations of a chunk; the logits themselves are computed for the last token only).
    `budget` = (usable, total, kind) for tests; by default :func:`memory_budget`.
    """
    from .model.summary import state_bytes

    w = weights_bytes(model_dir)
    s = state_copies * state_bytes(args, int(context))
    working = prefill_step * int(args.vocab_size) * 4 + 512 * MIB
    usable, memory, kind = budget or memory_budget()
    chk = MemoryCheck(w, s, working, int(usable), int(memory), kind, int(context))
    if chk.need <= usable:
        return chk
    chk.fits = False
    what = (f"{model_dir} needs about {_gib(chk.need)} (weights {_gib(w)}, decode state at "
            f"{int(context):,} tokens {_gib(s)}, working memory {_gib(working)})")
    smaller = "a smaller --max-context"
    if recipe != "mixed-4-8":
        smaller += " or a smaller recipe (`dsv4 convert SOURCE OUT --recipe mixed-4-8`)"
    else:
        smaller += " or a smaller model"
    if kind == "GPU working set" and chk.need <= memory - MACOS_RESERVE:
        mb = int(math.ceil(chk.need / MIB / 1024.0)) * 1024
        chk.message = (f"{what} but the GPU may use only {_gib(usable)} of this Mac's "
                       f"{_gib(memory)}: raise the limit with `sudo sysctl iogpu.wired_limit_mb={mb}` "
                       f"(until the next reboot), or use {smaller}.")
    else:
        chk.message = (f"{what} but this machine has {_gib(memory)} of memory "
                       f"({_gib(usable)} usable): use {smaller}.")
    return chk


# ---------------------------------------------------------------------------
# The embedded demo model
# ---------------------------------------------------------------------------

DEMO_PRESET = "tiny"
DEMO_SEED = 0
DEMO_RECIPE = "mixed-4-8"


def dsv4_home() -> Path:
    """`$DSV4_HOME`, else `$XDG_CACHE_HOME/dsv4-mlx`, else `~/.cache/dsv4-mlx`."""
    env = os.environ.get("DSV4_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dsv4-mlx"


def demo_model_dir() -> Path:
    return dsv4_home() / f"demo-{DEMO_PRESET}-{__version__}"


def is_random_demo(config: dict) -> bool:
    return bool((config.get("dsv4_demo") or {}).get("random_weights"))


DEMO_README = """# dsv4-mlx demo model (random weights)

A tiny DeepSeek-V4 in the real architecture (window-only, CSA and HCA layers, mHC, MoE with
hash routing, MTP) with the real V4 tokenizer and **random weights**: it runs anywhere in
seconds and its output is gibberish. Built by dsv4-mlx {version} (`dsv4 demo`, `dsv4 chat`
without a model) from preset `{preset}`, seed {seed}, recipe `{recipe}`.
"""


def ensure_demo_model(console=None) -> Path:
    """The demo model folder, built on first use (deterministically, atomically)."""
    final = demo_model_dir()
    if (final / "config.json").is_file():
        return final
    from .convert.convert import convert as run_convert
    from .demo import preset_config, write_source_checkpoint

    final.parent.mkdir(parents=True, exist_ok=True)
    if console is not None:
        console.print(f"building the demo model (random weights, once) in {final} ...", markup=False)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.build-"))
    try:
        src, out = tmp / "src", tmp / "model"
        write_source_checkpoint(src, preset_config(DEMO_PRESET), DEMO_SEED)
        from rich.console import Console

        quiet = Console(file=open(os.devnull, "w"), no_color=True)
        run_convert(str(src), out, DEMO_RECIPE, force=True, console=quiet, show_progress=False)
        quiet.file.close()
        (out / "README.md").write_text(DEMO_README.format(
            version=__version__, preset=DEMO_PRESET, seed=DEMO_SEED, recipe=DEMO_RECIPE))
        try:
            os.rename(out, final)
        except OSError:
            if not (final / "config.json").is_file():  # not just a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------


@dataclass
class Chunk:
    """A piece of streamed text: `kind` is "reasoning" or "answer"."""

    kind: str
    text: str


@dataclass
class ReplyStats:
    prompt_tokens: int = 0  # tokens of the prompt
    reused_tokens: int = 0  # of which served from the cache
    prefill_tokens: int = 0  # of which computed (the last prompt token included)
    time_to_first_token: float = 0.0  # seconds, prefill included
    prompt_tps: float = 0.0  # computed prompt tokens per second (time to first token)
    generation_tokens: int = 0  # sampled tokens (the EOS included)
    reasoning_tokens: int = 0
    generation_tps: float = 0.0  # tokens after the first per second
    peak_memory: int = 0  # bytes, mx.get_peak_memory()
    context_used: int = 0
    context_limit: int = 0
    finish_reason: str = ""  # stop | length | context | interrupted
    reused_from: str = ""  # where the reused prompt tokens came from ("" = this process's cache)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reply:
    reasoning: str = ""
    answer: str = ""
    tokens: List[int] = field(default_factory=list)
    stats: ReplyStats = field(default_factory=ReplyStats)

    def message(self) -> dict:
        m = {"role": "assistant", "content": self.answer}
        if self.reasoning:
            m["reasoning_content"] = self.reasoning
        return m


@dataclass
class _Checkpoint:
    tokens: List[int]
    layers: list  # [(state arrays, meta_state)] per layer
    logits: object = None  # the next-token logits there [V], when known


@dataclass
class StoredState:
    """A decode state from elsewhere (an on-disk session) for :meth:`Generator.install`."""

    caches: list
    tokens: List[int]
    next_logits: object = None
    source: str = ""


class _Recorder:
    """The model as generate_step sees it: remembers the logits of the last call."""

    def __init__(self, model):
        self.model = model
        self.out = None
        self.fed = 0

    def __call__(self, inputs, cache=None, **kw):
        out = self.model(inputs, cache=cache, **kw)
        self.out = out
        self.fed += int(inputs.shape[1])
        return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Generator:
    """Model + tokenizer + decode state + the tokens the state holds.

    `max_context` bounds prompt + reply (default: the model's max_position_embeddings).
    `keep_checkpoint` keeps the state at the end of each prompt (minus its last token) so that a
    next prompt that diverges after that point is served without a full re-prefill.
    """

    def __init__(self, model, tokenizer, max_context: Optional[int] = None,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP, keep_checkpoint: bool = True,
                 track_logits: bool = False):
        self.model = model
        self.track_logits = track_logits
        # sessions: a callable (tokens, have) -> StoredState holding more than `have` tokens of
        # `tokens`, or None; checkpoints every `boundary_every` positions during a prefill
        self.prefix_source: Optional[Callable[[List[int], int], Optional[StoredState]]] = None
        self.boundary_every = 0
        self.boundary_at: set = set()  # more checkpoint positions (absolute)
        self.on_boundary: Optional[Callable[["Generator"], None]] = None
        self.tokenizer = tokenizer
        self.max_context = int(max_context or model.args.max_position_embeddings)
        self.prefill_step_size = int(prefill_step_size)
        self.keep_checkpoint = keep_checkpoint
        self.eos_ids = set(tokenizer.eos_token_ids)
        self.think_start_id = tokenizer.convert_tokens_to_ids(THINK_START)
        self.think_end_id = tokenizer.convert_tokens_to_ids(THINK_END)
        self.last_stats: Optional[ReplyStats] = None
        self.total_prefill_tokens = 0
        self.total_generation_tokens = 0
        self.reused_from = ""  # the stored state the last prefill started from ("" = none)
        self.reset()

    # -- state -------------------------------------------------------------------------------
    def reset(self):
        """Empty the cache (and drop the checkpoint)."""
        self.cache = self.model.make_cache()
        self.tokens: List[int] = []
        self._checkpoint: Optional[_Checkpoint] = None
        self._logits = None  # (number of tokens, logits [V] or the model output [1, S, V])

    def _set_logits(self, value):
        self._logits = None if value is None else (len(self.tokens), value)

    @property
    def next_logits(self):
        """The next-token logits [V] (fp32) of the state, when known (see `track_logits`)."""
        if self._logits is None or self._logits[0] != len(self.tokens):
            return None
        v = self._logits[1]
        return v[0, -1] if v.ndim == 3 else v

    def install(self, state: StoredState):
        """Make the cache hold a state computed elsewhere (an on-disk session); the checkpoint
        is dropped."""
        if any(c.offset != len(state.tokens) for c in state.caches):
            raise ValueError("the caches do not hold exactly the given tokens")
        self.cache = list(state.caches)
        self.tokens = [int(t) for t in state.tokens]
        self._checkpoint = None
        self._set_logits(state.next_logits)

    def checkpoint_state(self) -> Optional[StoredState]:
        """The checkpoint (the state at the end of the last prompt minus its last token)."""
        from .cache import restore as restore_caches

        ck = self._checkpoint
        if ck is None:
            return None
        caches = restore_caches(ck.layers)
        return StoredState(caches, list(ck.tokens), ck.logits)

    def _save_checkpoint(self):
        from .cache import snapshot as snapshot_caches

        self._checkpoint = _Checkpoint(
            list(self.tokens), snapshot_caches(self.cache), self.next_logits)

    def _restore_checkpoint(self):
        from .cache import restore as restore_caches

        ck = self._checkpoint
        self.cache = restore_caches(ck.layers)
        self.tokens = list(ck.tokens)
        self._set_logits(ck.logits)

    def _last_logits(self, streams):
        """Logits [V] of the last position from the final mHC streams [B, S, n, D]: the head runs
        on one position, not the whole chunk."""
        from .model.mhc import hc_head

        m, a = self.model, self.model.args
        y = hc_head(streams[:, -1:], m.hc_head_fn, m.hc_head_scale, m.hc_head_base, a.hc_eps, a.rms_norm_eps)
        return m.lm_head(m.norm(y))[0, -1]

    def _recover(self):
        """After an exception in the middle of a model call: back to a state known to be right."""
        if self._checkpoint is not None:
            self._restore_checkpoint()
        else:
            self.reset()

    def _consistent(self) -> bool:
        return all(c.offset == len(self.tokens) for c in self.cache)

    # -- prefill -----------------------------------------------------------------------------
    def prefill(self, tokens: Sequence[int], progress: Optional[Callable[[int, int], None]] = None,
                should_stop: Optional[Callable[[], bool]] = None, checkpoint: bool = True) -> int:
        """Make the cache hold exactly `tokens`; returns how many were served from the cache.

        The part not already cached is computed in chunks of `prefill_step_size` (as mlx-lm's
        generate_step does), calling `progress(done, total)` at the start and after each chunk.
        If `should_stop()` turns true between chunks, stops early: the cache then holds a
        prefix of `tokens` (`len(self.tokens)` says how much).

        With `prefix_source`, a stored state holding a longer prefix of `tokens` than the cache
        is installed first (`self.reused_from` names it). With `boundary_every`, chunks also end
        at every multiple of it, where `on_boundary(self)` is called.
        """
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        tokens = [int(t) for t in tokens]
        lcp = _common_prefix(self.tokens, tokens)
        if lcp < len(self.tokens):
            ck = self._checkpoint
            if ck is not None and len(ck.tokens) <= lcp and ck.tokens == tokens[: len(ck.tokens)]:
                self._restore_checkpoint()
            else:
                self.reset()
        self.reused_from = ""
        if self.prefix_source is not None and len(tokens) > len(self.tokens):
            got = self.prefix_source(tokens, len(self.tokens))
            if got is not None and len(self.tokens) < len(got.tokens) <= len(tokens) \
                    and list(got.tokens) == tokens[: len(got.tokens)]:
                self.install(got)
                self.reused_from = got.source
        reused = len(self.tokens)
        todo = tokens[reused:]
        total, done = len(todo), 0
        every = int(self.boundary_every or 0)
        stops = sorted(p - reused for p in self.boundary_at if reused < p <= len(tokens))
        if progress:
            progress(0, total)
        ok = False
        try:
            with mx.stream(generation_stream):
                while done < total:
                    if should_stop is not None and should_stop():
                        break
                    end = min(total, done + self.prefill_step_size)
                    if every:
                        end = min(end, ((reused + done) // every + 1) * every - reused)
                    end = min([end] + [p for p in stops if p > done])
                    chunk = todo[done:end]
                    at_boundary = bool(every) and (reused + end) % every == 0 or end in stops
                    want = self.track_logits and (end == total or at_boundary)
                    if want:
                        full, streams = self.model(mx.array(chunk)[None], cache=self.cache, return_streams=True)
                        del full  # never evaluated: the head runs on the last position only
                        last = self._last_logits(streams)
                        mx.eval([c.state for c in self.cache] + [last])
                        del streams
                    else:
                        self.model(mx.array(chunk)[None], cache=self.cache)
                        mx.eval([c.state for c in self.cache])
                        last = None
                    self.tokens.extend(chunk)
                    self._set_logits(last)
                    done += len(chunk)
                    self.total_prefill_tokens += len(chunk)
                    if at_boundary and self.on_boundary is not None:
                        self.on_boundary(self)
                    if progress:
                        progress(done, total)
                    mx.clear_cache()
            ok = self._consistent()
        finally:
            if not ok:
                self._recover()
        if checkpoint and self.keep_checkpoint and len(self.tokens) == len(tokens):
            if self._checkpoint is None or self._checkpoint.tokens != self.tokens:
                self._save_checkpoint()
        return reused

    # -- generation --------------------------------------------------------------------------
    def check_prompt(self, n: int):
        if n >= self.max_context:
            raise ContextError(
                f"the prompt has {n:,} tokens but the context is {self.max_context:,}; "
                "shorten it or raise --max-context")

    def stream(self, prompt: Sequence[int], sampling: Optional[SamplingConfig] = None,
               max_tokens: Optional[int] = None,
               progress: Optional[Callable[[int, int], None]] = None,
               should_stop: Optional[Callable[[], bool]] = None,
               logits_processors: Optional[list] = None,
               after_prefill: Optional[Callable[["Generator"], None]] = None) -> Iterator[Chunk]:
        """Prefill `prompt` (token ids; the cache is reused where it holds a prefix) and stream
        the reply as :class:`Chunk` s. A prompt ending with ``<think>`` makes a thinking reply:
        the text before ``</think>`` is "reasoning", the rest "answer". Stops at EOS, after
        `max_tokens`, when the context is full, or when `should_stop()` turns true (checked
        between tokens and between prefill chunks). The stats are in `self.last_stats`
        when the iterator ends (also when it is closed early). `after_prefill(self)` runs once
        the cache holds the prompt but its last token (e.g. to save a snapshot); its time is
        not counted in the stats.
        """
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("empty prompt")
        self.check_prompt(len(prompt))
        sampling = sampling or SamplingConfig()
        room = self.max_context - len(prompt)
        limit = room if max_tokens is None else max(0, min(int(max_tokens), room))
        st = ReplyStats(prompt_tokens=len(prompt), context_limit=self.max_context)
        self.last_stats = st
        t0 = time.perf_counter()
        st.reused_tokens = self.prefill(prompt[:-1], progress=progress, should_stop=should_stop)
        st.reused_from = self.reused_from
        st.prefill_tokens = len(self.tokens) - st.reused_tokens
        if len(self.tokens) < len(prompt) - 1 or limit == 0:
            st.finish_reason = "interrupted" if limit else "length"
            self._finish(st, t0, None, None, 0)
            return
        if after_prefill is not None:
            t_cb = time.perf_counter()
            after_prefill(self)
            t0 += time.perf_counter() - t_cb
        st.prefill_tokens += 1  # the last prompt token goes through generate_step

        if sampling.seed is not None:
            mx.random.seed(int(sampling.seed))
        processors = list(sampling.logits_processors())
        history = prompt[:-1][-sampling.repetition_context_size:]
        if processors and history:  # mlx-lm's processors see only what generate_step is given
            processors = [_with_history(p, mx.array(history)) for p in processors]
        processors += list(logits_processors or [])

        in_reasoning = prompt[-1] == self.think_start_id
        detok = self.tokenizer.detokenizer
        base = len(self.tokens)
        rec = _Recorder(self.model)
        steps = generate_step(mx.array(prompt[-1:]), rec, max_tokens=limit,
                              sampler=sampling.sampler(), logits_processors=processors or None,
                              prompt_cache=self.cache)
        n = 0
        t_first = t_last = None
        ok = False
        try:
            for tok, _ in steps:
                t_last = time.perf_counter()
                if n == 0:
                    t_first = t_last
                    self.tokens.append(prompt[-1])
                self.tokens.append(tok)  # generate_step has fed `tok` to the model already
                n += 1
                if tok in self.eos_ids:
                    st.finish_reason = "stop"
                    break
                if in_reasoning and tok == self.think_end_id:
                    detok.finalize()
                    if detok.last_segment:
                        yield Chunk("reasoning", detok.last_segment)
                    detok = self.tokenizer.detokenizer
                    in_reasoning = False
                    st.reasoning_tokens = n
                else:
                    detok.add_token(tok)
                    seg = detok.last_segment
                    if seg:
                        yield Chunk("reasoning" if in_reasoning else "answer", seg)
                if should_stop is not None and should_stop():
                    st.finish_reason = "interrupted"
                    break
                if n >= limit:
                    st.finish_reason = "context" if limit == room else "length"
                    break
            detok.finalize()
            if detok.last_segment:
                yield Chunk("reasoning" if in_reasoning else "answer", detok.last_segment)
            ok = True
        except GeneratorExit:
            ok = True
            st.finish_reason = st.finish_reason or "interrupted"
            raise
        finally:
            steps.close()
            if in_reasoning:
                st.reasoning_tokens = n
            if not (ok and self._consistent()):
                self._recover()
                st.finish_reason = "interrupted"
            elif rec.out is not None and len(self.tokens) == base + rec.fed:
                self._set_logits(rec.out)  # the logits after the last token fed
            else:
                self._set_logits(None)
            self._finish(st, t0, t_first, t_last, n)

    def _finish(self, st: ReplyStats, t0, t_first, t_last, n):
        import mlx.core as mx

        st.generation_tokens = n
        self.total_generation_tokens += n
        if t_first is not None:
            st.time_to_first_token = t_first - t0
            st.prompt_tps = st.prefill_tokens / max(st.time_to_first_token, 1e-9)
            if n > 1 and t_last > t_first:
                st.generation_tps = (n - 1) / (t_last - t_first)
        st.peak_memory = int(mx.get_peak_memory())
        st.context_used = len(self.tokens)
        if not st.finish_reason:
            st.finish_reason = "length"

    def generate(self, prompt: Sequence[int], **kw) -> Reply:
        """:meth:`stream`, collected."""
        r = Reply()
        start = len(prompt)
        for c in self.stream(prompt, **kw):
            if c.kind == "reasoning":
                r.reasoning += c.text
            else:
                r.answer += c.text
        r.tokens = list(self.tokens[start:]) if self.tokens[: len(prompt)] == list(prompt) else []
        r.stats = self.last_stats
        return r


def _with_history(processor, history):
    import mlx.core as mx

    def run(tokens, logits):
        return processor(mx.concatenate([history, tokens]), logits)

    return run


# ---------------------------------------------------------------------------
# Conversation
# ---------------------------------------------------------------------------


@dataclass
class Conversation:
    """A chat's messages and settings; :meth:`encode` gives the prompt for the next reply."""

    system: Optional[str] = None
    thinking: bool = False
    max_effort: bool = False
    messages: List[dict] = field(default_factory=list)

    @property
    def mode(self) -> str:
        if not self.thinking:
            return "chat"
        return "think-max" if self.max_effort else "think"

    def encode(self, user: Optional[str] = None) -> str:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += self.messages
        if user is not None:
            msgs.append({"role": "user", "content": user})
        return encode_messages(
            msgs, thinking_mode="thinking" if self.thinking else "chat",
            reasoning_effort="max" if self.thinking and self.max_effort else None)

    def add_turn(self, user: str, reply: Reply):
        self.messages.append({"role": "user", "content": user})
        self.messages.append(reply.message())

    def clear(self):
        self.messages.clear()


def encode_prompt(tokenizer, text: str) -> List[int]:
    """Prompt text (it carries its own BOS) -> token ids, no special tokens added."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def stderr_is_terminal() -> bool:  # pragma: no cover - trivial
    return sys.stderr.isatty()
