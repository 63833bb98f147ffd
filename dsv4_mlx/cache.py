"""Decode state of DeepSeek-V4 (spec §5).

One `LayerCache` per decoder layer (and one per MTP block). Everything is aligned to absolute
positions, so a sequence can be fed in chunks of any size, one token at a time, or in one
shot, and give the same result.

Per layer (spec §5.1):

* window ring ``[B, window, c]``: the post-norm, post-RoPE KV of the last `window` positions,
  slot = position mod window;
* for compressed layers (rate m > 0) a `CompressorState`: the compressed entries emitted so far
  ``[B, N, c]``, the pending rows (C, Z+ape) of the incomplete window (``pos mod m`` rows, fp32)
  and, for the overlapping CSA compressor, the first halves of the previous complete window
  (fp32, initialised to C = 0, Z = -inf on every new sequence);
* for CSA layers a second `CompressorState` for the lightning indexer's keys ``[B, N, c_I]``;
* the absolute position `offset`.

`state` / `meta_state` give the complete state; a cache rebuilt from them continues exactly.
The on-disk session format (issue 4) builds on this.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

ENTRY_STEP = 256  # growth step of the compressed-entry buffers (entries, not tokens)


class CompressorState:
    """Running state of one compressor (main KV or indexer keys) of one layer."""

    def __init__(self, ratio: int, head_dim: int, overlap: bool):
        self.ratio = ratio
        self.head_dim = head_dim
        self.overlap = overlap
        self.width = (2 if overlap else 1) * head_dim
        self.pending_kv: Optional[mx.array] = None  # [B, r, width] fp32, r = pos mod ratio
        self.pending_gate: Optional[mx.array] = None
        self.overlap_kv: Optional[mx.array] = None  # [B, ratio, head_dim] fp32
        self.overlap_gate: Optional[mx.array] = None
        self._entries: Optional[mx.array] = None  # [B, capacity, head_dim]
        self.num_entries = 0

    # -- pending rows and overlap ------------------------------------------------------------
    def init_batch(self, batch: int, dtype):
        if self._entries is None:
            self._entries = mx.zeros((batch, 0, self.head_dim), dtype=dtype)
        if self.pending_kv is None:
            self.pending_kv = mx.zeros((batch, 0, self.width), dtype=mx.float32)
            self.pending_gate = mx.zeros((batch, 0, self.width), dtype=mx.float32)
        if self.overlap and self.overlap_kv is None:
            shape = (batch, self.ratio, self.head_dim)
            self.overlap_kv = mx.zeros(shape, dtype=mx.float32)
            self.overlap_gate = mx.full(shape, -mx.inf, dtype=mx.float32)

    @property
    def num_pending(self) -> int:
        return 0 if self.pending_kv is None else self.pending_kv.shape[1]

    # -- entries -----------------------------------------------------------------------------
    @property
    def entries(self) -> Optional[mx.array]:
        if self._entries is None:
            return None
        return self._entries[:, : self.num_entries]

    def append_entries(self, new: mx.array):
        """Append `new` [B, n, head_dim] to the emitted entries."""
        n = new.shape[1]
        if n == 0:
            return
        B = new.shape[0]
        end = self.num_entries + n
        if end > self._entries.shape[1]:
            cap = ((end + ENTRY_STEP - 1) // ENTRY_STEP) * ENTRY_STEP
            grown = mx.zeros((B, cap, self.head_dim), dtype=new.dtype)
            if self.num_entries:
                grown[:, : self.num_entries] = self._entries[:, : self.num_entries]
            self._entries = grown
        self._entries[:, self.num_entries : end] = new
        self.num_entries = end

    # -- serialisation -----------------------------------------------------------------------
    def state(self) -> List[mx.array]:
        out = [self.entries, self.pending_kv, self.pending_gate]
        if self.overlap:
            out += [self.overlap_kv, self.overlap_gate]
        return out

    def set_state(self, arrays: List[mx.array]):
        entries, self.pending_kv, self.pending_gate = arrays[:3]
        if self.overlap:
            self.overlap_kv, self.overlap_gate = arrays[3:5]
        self._entries = entries
        self.num_entries = entries.shape[1]

    @property
    def num_state_arrays(self) -> int:
        return 5 if self.overlap else 3

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state() if a is not None)

    def nbytes_at(self, tokens: int, entry_itemsize: int, batch: int = 1) -> int:
        """Bytes of `state()` after `tokens` positions (the same layout, computed)."""
        if tokens == 0:
            return 0
        n = tokens // self.ratio
        r = tokens % self.ratio
        b = n * self.head_dim * entry_itemsize + 2 * r * self.width * 4
        if self.overlap:
            b += 2 * self.ratio * self.head_dim * 4
        return batch * b


class LayerCache(_BaseCache):
    """State of one attention layer: window ring, compressor(s), position."""

    def __init__(self, window: int, ratio: int, head_dim: int, index_head_dim: int = 0):
        self.window = window
        self.ratio = ratio
        self.head_dim = head_dim
        self.index_head_dim = index_head_dim
        self.offset = 0
        self.ring: Optional[mx.array] = None  # [B, window, head_dim]
        self.comp = CompressorState(ratio, head_dim, overlap=ratio == 4) if ratio else None
        self.index = (
            CompressorState(ratio, index_head_dim, overlap=True) if ratio == 4 else None
        )

    # -- window ring -------------------------------------------------------------------------
    def window_keys(self, new_kv: mx.array) -> Tuple[mx.array, Optional[mx.array]]:
        """Keys of the window branch for a chunk `new_kv` [B, T, c] at positions offset..

        Returns (keys [B, L, c], mask [T, L] bool or None). Keys are the ring slots (positions
        before the chunk) followed by the chunk itself; query t sees key position p iff
        t - window < p <= t.
        """
        s, T, W = self.offset, new_kv.shape[1], self.window
        q_pos = mx.arange(s, s + T)[:, None]
        new_pos = mx.arange(s, s + T)[None]
        if self.ring is None or s == 0:
            keys, k_pos = new_kv, new_pos
        else:
            slots = mx.arange(W)
            ring_pos = (s - 1) - ((s - 1 - slots) % W)  # latest position held by each slot
            ring_pos = mx.where(ring_pos >= 0, ring_pos, -(10**9))  # never written: invisible
            keys = mx.concatenate([self.ring, new_kv], axis=1)
            k_pos = mx.concatenate([ring_pos[None], new_pos], axis=1)
        mask = (k_pos <= q_pos) & (k_pos > q_pos - W)
        return keys, mask

    def update_ring(self, new_kv: mx.array):
        s, T, W = self.offset, new_kv.shape[1], self.window
        if self.ring is None:
            self.ring = mx.zeros((new_kv.shape[0], W, new_kv.shape[2]), dtype=new_kv.dtype)
        n = min(T, W)
        slots = (mx.arange(s + T - n, s + T) % W).astype(mx.int32)
        self.ring[:, slots] = new_kv[:, T - n :]

    # -- segments (on-disk sessions) ----------------------------------------------------------
    def segment(self, since: Dict[str, int]) -> Dict[str, mx.array]:
        """The state added since `since` ({"comp": entries, "index": entries} at the previous
        boundary) plus the small state at this boundary (ring, pending and overlap rows)."""
        out: Dict[str, mx.array] = {}
        if self.offset == 0:
            return out
        out["ring"] = self.ring
        for key, c in (("comp", self.comp), ("index", self.index)):
            if c is None:
                continue
            out[f"{key}.entries"] = c.entries[:, since.get(key, 0) :]
            out[f"{key}.pending_kv"] = c.pending_kv
            out[f"{key}.pending_gate"] = c.pending_gate
            if c.overlap:
                out[f"{key}.overlap_kv"] = c.overlap_kv
                out[f"{key}.overlap_gate"] = c.overlap_gate
        return out

    def entry_counts(self) -> Dict[str, int]:
        return {k: c.num_entries for k, c in (("comp", self.comp), ("index", self.index)) if c is not None}

    @classmethod
    def from_segments(cls, meta: Tuple, segments: List[Dict[str, mx.array]], offset: int):
        """Rebuild from the segments up to a boundary (the last one gives the small state)."""
        window, ratio, head_dim, index_head_dim = meta
        obj = cls(window, ratio, head_dim, index_head_dim)
        obj.offset = offset
        if offset == 0:
            return obj
        last = segments[-1]
        obj.ring = last["ring"]
        for key, c in (("comp", obj.comp), ("index", obj.index)):
            if c is None:
                continue
            parts = [seg[f"{key}.entries"] for seg in segments if f"{key}.entries" in seg]
            entries = mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
            arrays = [entries, last[f"{key}.pending_kv"], last[f"{key}.pending_gate"]]
            if c.overlap:
                arrays += [last[f"{key}.overlap_kv"], last[f"{key}.overlap_gate"]]
            c.set_state(arrays)
        return obj

    def layout(self) -> Tuple[int, int, int, int]:
        return (self.window, self.ratio, self.head_dim, self.index_head_dim)

    # -- protocol ----------------------------------------------------------------------------
    def advance(self, n: int):
        self.offset += n

    def size(self):
        return self.offset

    def empty(self):
        return self.offset == 0

    def is_trimmable(self):
        return False

    @property
    def state(self):
        if self.offset == 0:
            return []
        out = [self.ring]
        for c in (self.comp, self.index):
            if c is not None:
                out += c.state()
        return out

    @state.setter
    def state(self, v):
        if not v:
            return
        self.ring = v[0]
        i = 1
        for c in (self.comp, self.index):
            if c is not None:
                c.set_state(v[i : i + c.num_state_arrays])
                i += c.num_state_arrays

    @property
    def meta_state(self):
        return tuple(
            map(str, (self.offset, self.window, self.ratio, self.head_dim, self.index_head_dim))
        )

    @meta_state.setter
    def meta_state(self, v):
        offset, window, ratio, head_dim, index_head_dim = map(int, v)
        self.__init__(window, ratio, head_dim, index_head_dim)
        self.offset = offset

    @classmethod
    def from_state(cls, state, meta_state):
        obj = cls.__new__(cls)
        obj.meta_state = meta_state
        obj.state = state
        return obj

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def nbytes_at(self, tokens: int, itemsize: int = 2, batch: int = 1) -> int:
        """Bytes `state` holds after `tokens` positions, computed from this cache's layout."""
        if tokens == 0:
            return 0
        b = batch * self.window * self.head_dim * itemsize
        for c in (self.comp, self.index):
            if c is not None:
                b += c.nbytes_at(tokens, itemsize, batch)
        return b

    def growth_per_token(self, itemsize: int = 2) -> float:
        """Average bytes added per position (compressed entries only)."""
        g = 0.0
        for c in (self.comp, self.index):
            if c is not None:
                g += c.head_dim * itemsize / c.ratio
        return g


def make_layer_caches(args) -> List[LayerCache]:
    """Fresh caches for the main layers of `args` (a ModelArgs)."""
    return [
        LayerCache(args.sliding_window, args.layer_ratio(i), args.head_dim, args.index_head_dim)
        for i in range(args.num_hidden_layers)
    ]


def make_mtp_caches(args) -> List[LayerCache]:
    return [
        LayerCache(args.sliding_window, args.mtp_ratio(i), args.head_dim, args.index_head_dim)
        for i in range(args.num_nextn_predict_layers)
    ]
