"""Glue between the :class:`~dsv4_mlx.generate.Generator` and the :class:`SessionStore`.

* :class:`SessionRuntime` - the store and the fingerprints of the model in use. Called by the
  Generator before a prefill (``Generator.prefix_source``), it loads the stored boundary holding
  the longest prefix of the tokens to compute: from the session attached to the conversation
  (``own``) and, with prefix reuse on, from any compatible session. It saves states
  (:meth:`SessionRuntime.save`) and remembers sessions found damaged, which are cut back to
  their last intact boundary before anything is appended to them.
* :func:`turn_state` - after a chat turn, the one state worth saving: the live state when every
  next prompt of the conversation starts with it (chat mode, the reply re-encodes to the same
  tokens), else the Generator's checkpoint (the end of the turn's prompt minus its last token,
  what the next turn restores when thinking is dropped or the reply re-tokenizes differently).
  One segment per turn, O(new tokens).
* :func:`stable_prefix` - the tokens every next prompt of a conversation starts with, whatever
  the next user message is (the common prefix of the prompts for three different probes).
* :func:`document_message` - the framing of `dsv4 doc` / `generate --doc`.
* :class:`AutoSnapshot` - the automatic snapshots of long prompts (``auto-<hash>``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .store import CorruptSession, Fingerprints, Loaded, SessionError, SessionStore

AUTO_PREFIX = "auto-"
DEFAULT_CHECKPOINT_EVERY = 16384
DEFAULT_AUTO_SNAPSHOT_MIN = 4096
DEFAULT_BUDGET = "20G"
PROBES = ("a", "\n", " .")  # next user messages that tokenize differently at their start


# -- documents ---------------------------------------------------------------------------------

def document_message(files: Sequence[Tuple[str, str]]) -> str:
    """The user message of `dsv4 doc` / `generate --doc`: for each (name, text), a header line
    ``==> name <==`` then the text without its trailing newlines; files separated by one blank
    line (the `head` convention)."""
    return "\n\n".join(f"==> {name} <==\n{text.rstrip(chr(10)).rstrip(chr(13))}" for name, text in files)


def read_documents(paths: Sequence[Path]) -> List[Tuple[str, str]]:
    """(file name, text) of each path (UTF-8, undecodable bytes replaced); OSError passes."""
    return [(Path(p).name, Path(p).expanduser().read_text(encoding="utf-8", errors="replace")) for p in paths]


# -- token helpers ----------------------------------------------------------------------------

def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def stable_prefix(tokenizer, conv) -> List[int]:
    """The tokens that every next prompt of `conv` (a Conversation) starts with."""
    from ..generate import encode_prompt

    runs = [encode_prompt(tokenizer, conv.encode(p)) for p in PROBES]
    n = min(_lcp(runs[0], r) for r in runs[1:])
    return runs[0][:n]


def stable_text_prefix(tokenizer, prompt_text: str) -> List[int]:
    """The tokens that any prompt continuing the last user message of `prompt_text` (a prompt
    ending with the assistant's turn) starts with: up to the end of that message's text, less
    the last few tokens that more text could re-tokenize."""
    from ..encoding import ASSISTANT
    from ..generate import encode_prompt

    cut = prompt_text.rfind(ASSISTANT)
    if cut < 0:
        return []
    runs = [encode_prompt(tokenizer, prompt_text[:cut] + p) for p in PROBES]
    n = min(_lcp(runs[0], r) for r in runs[1:])
    return runs[0][:n]


def conversation_messages(conv) -> List[Dict]:
    """The transcript as stored: the system message (if any) first."""
    return ([{"role": "system", "content": conv.system}] if conv.system else []) + list(conv.messages)


def split_messages(messages: Sequence[Dict]) -> Tuple[Optional[str], List[Dict]]:
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system":
        return msgs[0].get("content"), msgs[1:]
    return None, msgs


def token_hash(tokens: Sequence[int]) -> str:
    h = hashlib.sha256()
    h.update(",".join(map(str, tokens)).encode())
    return h.hexdigest()[:16]


# -- settings ---------------------------------------------------------------------------------

SAMPLER_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty")


def make_settings(kind: str, model_dir, conv, sampling, max_tokens: Optional[int], **extra) -> Dict:
    s = dict(kind=kind, model=str(Path(model_dir).resolve()), mode=conv.mode, max_tokens=max_tokens)
    s.update({k: getattr(sampling, k) for k in SAMPLER_KEYS})
    s.update(extra)
    return s


def apply_mode(conv, mode: Optional[str]) -> None:
    if mode in ("chat", "think", "think-max"):
        conv.thinking, conv.max_effort = mode != "chat", mode == "think-max"


def apply_sampler(sampling, settings: Dict, given: Sequence[str] = ()) -> None:
    """Stored sampler settings, except those given on the command line (names in `given`)."""
    for k in SAMPLER_KEYS:
        if k in settings and k not in given:
            setattr(sampling, k, settings[k])


# -- the runtime -------------------------------------------------------------------------------

@dataclass
class LoadInfo:
    name: str
    tokens: int
    bytes: int
    seconds: float
    warning: Optional[str] = None


class SessionRuntime:
    """Sessions for one model: `store`, `fingerprints`, and the Generator's prefix source.

    `own` is the session of the conversation (always searched); `search_all` extends the
    search to every compatible session (prefix reuse). `touch=False` reads sessions without
    writing anything (not even `last_used`). `warn(text)` reports damaged sessions.
    """

    def __init__(self, store: SessionStore, fingerprints: Fingerprints, *, own: Optional[str] = None,
                 search_all: bool = False, touch: bool = True, warn: Optional[Callable[[str], None]] = None):
        self.store, self.fp = store, fingerprints
        self.own, self.search_all, self.touch = own, search_all, touch
        self.warn = warn or (lambda text: None)
        self.damaged: Dict[str, int] = {}  # session -> intact segments (found on load)
        self.loads: List[LoadInfo] = []

    # -- finding and loading ---------------------------------------------------------------
    def _names(self) -> List[str]:
        names = []
        if self.own and self.store.exists(self.own):
            names.append(self.own)
        if self.search_all:
            names += [i["name"] for i in self.store.list() if i["name"] != self.own]
        return names

    def best(self, tokens: Sequence[int], more_than: int = 0) -> Optional[Tuple[str, int]]:
        """(session, boundary) holding the longest prefix of `tokens` (> `more_than` tokens)."""
        tokens = [int(t) for t in tokens]
        best: Optional[Tuple[str, int]] = None
        for name in self._names():
            try:
                m = self.store.manifest(name)
                self.store._check(m, self.fp, name)
            except SessionError:
                continue
            limit = len(m["segments"])
            if name in self.damaged:
                limit = min(limit, self.damaged[name])
            for s in m["segments"][:limit]:
                T = s["tokens"]
                if T > len(tokens) or m["tokens"][:T] != tokens[:T]:
                    break
                if T > more_than and (best is None or T > best[1]):
                    best = (name, T)
        return best

    def load(self, name: str, upto: Optional[int] = None) -> Loaded:
        t0 = time.perf_counter()
        loaded = self.store.load(name, self.fp, upto_tokens=upto, touch=self.touch)
        m = loaded.manifest
        used = m["segments"][: loaded.segments_used]
        if loaded.warning:
            self.damaged[name] = loaded.segments_used
            self.warn(loaded.warning)
        self.loads.append(LoadInfo(name, len(loaded.tokens), sum(s["bytes"] for s in used),
                                   time.perf_counter() - t0, loaded.warning))
        return loaded

    def state_of(self, loaded: Loaded, source: str):
        from ..generate import StoredState

        return StoredState(loaded.caches, list(loaded.tokens), loaded.next_logits, source)

    def __call__(self, tokens: List[int], have: int):
        """The Generator's prefix source."""
        found = self.best(tokens, more_than=have)
        if found is None:
            return None
        name, T = found
        try:
            loaded = self.load(name, upto=T)
        except CorruptSession as e:
            self.damaged[name] = 0
            self.warn(str(e))
            return None
        if len(loaded.tokens) <= have:
            return None
        return self.state_of(loaded, name)

    # -- saving ------------------------------------------------------------------------------
    def repair(self, name: str) -> None:
        """Cut a session found damaged back to its intact segments (before appending to it)."""
        n = self.damaged.pop(name, None)
        if n is not None and self.store.exists(name):
            if n == 0:
                self.store.remove(name)
            else:
                self.store.truncate(name, n)

    def save(self, name: str, state, messages: Sequence[Dict], settings: Dict) -> Dict:
        """Save `state` (a StoredState) as session `name` (appending to what it holds)."""
        self.repair(name)
        if state.next_logits is None:
            raise SessionError("internal: the state to save has no next-token logits")
        return self.store.save(name, state.caches, state.tokens, state.next_logits, self.fp,
                               messages=messages, settings=settings)

    def save_turn(self, name: str, gen, history: Sequence[int], messages: Sequence[Dict],
                  settings: Dict) -> Optional[Dict]:
        """After a chat turn: save the state every next prompt starts from (see `turn_state`);
        with none (the conversation was edited), only the transcript."""
        state = turn_state(gen, history)
        if state is None:
            if self.store.exists(name):
                self.repair(name)
                return self.store.update_meta(name, messages, settings)
            return None
        return self.save(name, state, messages, settings)

    def fork_from(self, src: str, dst: str) -> None:
        """Copy-on-write copy; a source found damaged is cut back in the copy."""
        self.store.fork(src, dst)
        if src in self.damaged:
            self.damaged[dst] = self.damaged[src]
            self.repair(dst)


def turn_state(gen, history: Sequence[int]):
    """The live state when `history` (what every next prompt starts with) extends it, else
    the checkpoint when it does; None when neither does."""
    from ..generate import StoredState

    history = list(history)
    if gen.tokens and gen.tokens == history[: len(gen.tokens)] and gen.next_logits is not None:
        return StoredState(list(gen.cache), list(gen.tokens), gen.next_logits)
    ck = gen.checkpoint_state()
    if ck is not None and ck.tokens and ck.next_logits is not None and ck.tokens == history[: len(ck.tokens)]:
        return ck
    return None


# -- automatic snapshots ------------------------------------------------------------------------

class AutoSnapshot:
    """Saves the state of a long prompt as ``auto-<hash of its tokens>``: at every
    `every`-token boundary of the prefill (an interrupted prefill resumes from there) and at
    the end; starts as a copy-on-write fork of the session the prefix was reused from, so only
    the new tokens are written. Then evicts least recently used snapshots over `budget`."""

    def __init__(self, rt: SessionRuntime, tokens: Sequence[int], messages: Sequence[Dict], settings: Dict,
                 budget: int, warn: Callable[[str], None]):
        self.rt, self.tokens = rt, [int(t) for t in tokens]
        self.name = AUTO_PREFIX + token_hash(self.tokens)
        self.messages, self.settings, self.budget, self.warn = list(messages), dict(settings), budget, warn
        self.saved = 0
        self.failed = False
        self.evicted: List[str] = []

    def _save(self, gen) -> None:
        from ..generate import StoredState

        if self.failed or gen.next_logits is None or not gen.tokens:
            return
        st = self.rt.store
        try:
            if not st.exists(self.name) and gen.reused_from and gen.reused_from != self.name \
                    and st.exists(gen.reused_from):
                self.rt.fork_from(gen.reused_from, self.name)
            self.rt.save(self.name, StoredState(list(gen.cache), list(gen.tokens), gen.next_logits),
                         self.messages, self.settings)
            self.saved = len(gen.tokens)
        except (SessionError, OSError) as e:
            self.failed = True
            self.warn(f"the automatic snapshot was not saved ({e})")

    def on_boundary(self, gen) -> None:
        self._save(gen)

    def finish(self, gen) -> None:
        if gen.tokens == self.tokens:
            self._save(gen)
        try:
            self.evicted = self.rt.store.evict(self.budget)
        except (SessionError, OSError) as e:
            self.warn(f"could not evict old automatic snapshots ({e})")


__all__ = ["SessionRuntime", "AutoSnapshot", "turn_state", "stable_prefix", "document_message",
           "read_documents", "conversation_messages", "split_messages", "make_settings", "apply_mode",
           "apply_sampler", "token_hash", "stable_text_prefix", "LoadInfo"]
