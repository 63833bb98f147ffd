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

Ring and entries are stored through a codec (`model/kv_formats.py`): `fp8` (default: FP8 KV
with BF16 RoPE dims, FP4 indexer keys) or `bf16` (as computed). `state` / `meta_state` give the
complete state; a cache rebuilt from them continues exactly. On-disk sessions build on
`segment` / `from_segments`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import _BaseCache

from .model.kv_formats import DEFAULT_KV_FORMAT, index_codec, kv_codec

ENTRY_STEP = 256  # growth step of the compressed-entry buffers (entries, not tokens)


class CompressorState:
    """Running state of one compressor (main KV or indexer keys) of one layer."""

    def __init__(self, ratio: int, head_dim: int, overlap: bool, codec):
        self.ratio = ratio
        self.head_dim = head_dim
        self.overlap = overlap
        self.codec = codec
        self.width = (2 if overlap else 1) * head_dim
        self.pending_kv: Optional[mx.array] = None  # [B, r, width] fp32, r = pos mod ratio
        self.pending_gate: Optional[mx.array] = None
        self.overlap_kv: Optional[mx.array] = None  # [B, ratio, head_dim] fp32
        self.overlap_gate: Optional[mx.array] = None
        self._parts: Optional[Dict[str, mx.array]] = None  # encoded entries [B, capacity, ...]
        self.num_entries = 0

    # -- pending rows and overlap ------------------------------------------------------------
    def init_batch(self, batch: int, dtype):
        if self._parts is None:
            probe = self.codec.encode(mx.zeros((batch, 0, self.head_dim), dtype=dtype))
            self._parts = {k: v for k, v in probe.items()}
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
    def parts(self, start: int = 0, end: Optional[int] = None) -> Dict[str, mx.array]:
        end = self.num_entries if end is None else end
        return {k: v[:, start:end] for k, v in self._parts.items()}

    @property
    def buffers(self) -> Dict[str, mx.array]:
        """The stored (encoded) entry buffers, full capacity: [B, capacity, ...]; the first
        `num_entries` rows are the entries."""
        return self._parts

    @property
    def entries(self) -> mx.array:
        """All entries, decoded: [B, N, head_dim]."""
        return self.codec.decode(self.parts())

    def gather(self, idx: mx.array) -> mx.array:
        """Entries at `idx` [B, T, k] (clamped to >= 0), decoded: [B, T, k, head_dim]."""
        safe = mx.maximum(idx, 0)
        picked = {}
        for key, v in self.parts().items():
            flat = v.reshape(v.shape[0], v.shape[1], -1)  # [B, N, f]
            g = mx.take_along_axis(flat[:, None], safe[..., None], axis=2)  # [B, T, k, f]
            picked[key] = g.reshape(*g.shape[:3], *v.shape[2:])
        return self.codec.decode(picked)

    def append_entries(self, new: mx.array):
        """Encode and append `new` [B, n, head_dim]."""
        n = new.shape[1]
        if n == 0:
            return
        enc = self.codec.encode(new)
        end = self.num_entries + n
        cap = next(iter(self._parts.values())).shape[1]
        if end > cap:
            cap = ((end + ENTRY_STEP - 1) // ENTRY_STEP) * ENTRY_STEP
            for k, v in self._parts.items():
                grown = mx.zeros((v.shape[0], cap, *v.shape[2:]), dtype=v.dtype)
                if self.num_entries:
                    grown[:, : self.num_entries] = v[:, : self.num_entries]
                self._parts[k] = grown
        for k, v in enc.items():
            self._parts[k][:, self.num_entries : end] = v
        self.num_entries = end

    # -- serialisation -----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, mx.array]:
        out = {f"entries.{k}": v for k, v in self.parts().items()}
        out["pending_kv"], out["pending_gate"] = self.pending_kv, self.pending_gate
        if self.overlap:
            out["overlap_kv"], out["overlap_gate"] = self.overlap_kv, self.overlap_gate
        return out

    def set_state_dict(self, d: Dict[str, mx.array]):
        self._parts = {k[len("entries."):]: v for k, v in d.items() if k.startswith("entries.")}
        self.num_entries = next(iter(self._parts.values())).shape[1]
        self.pending_kv, self.pending_gate = d["pending_kv"], d["pending_gate"]
        if self.overlap:
            self.overlap_kv, self.overlap_gate = d["overlap_kv"], d["overlap_gate"]

    def nbytes_at(self, tokens: int, itemsize: int, batch: int = 1) -> float:
        """Bytes of the state after `tokens` positions (the same layout, computed)."""
        if tokens == 0:
            return 0
        n, r = tokens // self.ratio, tokens % self.ratio
        b = n * self.codec.bytes_per_entry(itemsize) + 2 * r * self.width * 4
        if self.overlap:
            b += 2 * self.ratio * self.head_dim * 4
        return batch * b


class LayerCache(_BaseCache):
    """State of one attention layer: window ring, compressor(s), position."""

    def __init__(self, window: int, ratio: int, head_dim: int, index_head_dim: int = 0,
                 rope_dims: int = 64, kv_format: str = DEFAULT_KV_FORMAT):
        self.window = window
        self.ratio = ratio
        self.head_dim = head_dim
        self.index_head_dim = index_head_dim
        self.rope_dims = rope_dims
        self.kv_format = kv_format
        self.codec = kv_codec(kv_format, head_dim, rope_dims)
        self.offset = 0
        self.ring: Optional[Dict[str, mx.array]] = None  # encoded [B, window, ...]
        self.comp = CompressorState(ratio, head_dim, ratio == 4, self.codec) if ratio else None
        self.index = (
            CompressorState(ratio, index_head_dim, True, index_codec(kv_format, index_head_dim))
            if ratio == 4 else None
        )

    # -- window ring -------------------------------------------------------------------------
    def window_keys(self, new_kv: mx.array) -> Tuple[mx.array, mx.array]:
        """Keys of the window branch for a chunk `new_kv` [B, T, c] at positions offset..

        Returns (keys [B, L, c], positions [L] int32), oldest first: the `window` positions
        before the chunk (from the ring; positions < 0 were never written) followed by the chunk
        itself. Query t sees key position p iff t - window < p <= t and p >= 0.
        """
        s, T, W = self.offset, new_kv.shape[1], self.window
        if self.ring is None or s == 0:
            return new_kv, mx.arange(s, s + T)
        order = (mx.arange(W) + s) % W  # slot of position s - W + j
        ring = self.codec.decode({k: v[:, order] for k, v in self.ring.items()})
        return mx.concatenate([ring, new_kv], axis=1), mx.arange(s - W, s + T)

    def update_ring(self, parts: Dict[str, mx.array]):
        """Write the encoded KV of the chunk at positions offset.. into the ring."""
        s, W = self.offset, self.window
        T = next(iter(parts.values())).shape[1]
        if self.ring is None:
            self.ring = {k: mx.zeros((v.shape[0], W, *v.shape[2:]), dtype=v.dtype) for k, v in parts.items()}
        n = min(T, W)
        first = (s + T - n) % W
        if first + n <= W:  # one contiguous run of slots: a slice update
            for k, v in parts.items():
                self.ring[k][:, first : first + n] = v if n == T else v[:, T - n :]
            return
        slots = mx.array((np.arange(s + T - n, s + T) % W).astype(np.int32))
        for k, v in parts.items():
            self.ring[k][:, slots] = v[:, T - n :]

    def store_token(self, kv: mx.array):
        """Write one token's KV [B, 1, c] (at position offset) into the ring, encoded: one
        kernel on a GPU for the fp8 format (`kernels.kv_store`), else encode + slice update."""
        from .kernels import kv_store

        backend = kv_store.kernel_backend(self.ring, kv, self.codec)
        if backend == "ops":
            self.update_ring(self.codec.encode(kv))
        else:
            self.ring = kv_store.store_kernel(self.ring, kv, self.offset % self.window, self.codec,
                                              backend=backend)

    # -- protocol ----------------------------------------------------------------------------
    def advance(self, n: int):
        self.offset += n

    def size(self):
        return self.offset

    def empty(self):
        return self.offset == 0

    def is_trimmable(self):
        return False

    def state_dict(self) -> Dict[str, mx.array]:
        if self.offset == 0:
            return {}
        out = {f"ring.{k}": v for k, v in self.ring.items()}
        for key, c in (("comp", self.comp), ("index", self.index)):
            if c is not None:
                out.update({f"{key}.{k}": v for k, v in c.state_dict().items()})
        return out

    def set_state_dict(self, d: Dict[str, mx.array]):
        if not d:
            return
        self.ring = {k[5:]: v for k, v in d.items() if k.startswith("ring.")}
        for key, c in (("comp", self.comp), ("index", self.index)):
            if c is not None:
                c.set_state_dict({k[len(key) + 1:]: v for k, v in d.items() if k.startswith(key + ".")})

    @property
    def state(self):
        d = self.state_dict()
        return [d[k] for k in sorted(d)]

    @state.setter
    def state(self, v):
        if not v:
            return
        self.set_state_dict(dict(zip(sorted(self._state_keys()), v)))

    def _state_keys(self) -> List[str]:
        keys = [f"ring.{k}" for k in self.codec.part_names]
        for key, c in (("comp", self.comp), ("index", self.index)):
            if c is not None:
                keys += [f"{key}.entries.{k}" for k in c.codec.part_names]
                keys += [f"{key}.pending_kv", f"{key}.pending_gate"]
                if c.overlap:
                    keys += [f"{key}.overlap_kv", f"{key}.overlap_gate"]
        return keys

    @property
    def meta_state(self):
        return tuple(map(str, (self.offset, *self.layout(), self.kv_format)))

    @meta_state.setter
    def meta_state(self, v):
        *nums, fmt = v
        offset, window, ratio, head_dim, index_head_dim, rope_dims = map(int, nums)
        self.__init__(window, ratio, head_dim, index_head_dim, rope_dims, fmt)
        self.offset = offset

    @classmethod
    def from_state(cls, state, meta_state):
        """Rebuild a cache. The arrays are used as given: a cache is updated in place, so
        rebuilding from the `state` of a cache that keeps running must pass copies
        (`mx.array(a)`); arrays loaded from a file need none."""
        obj = cls.__new__(cls)
        obj.meta_state = meta_state
        obj.state = state
        return obj

    def layout(self) -> Tuple[int, int, int, int, int]:
        return (self.window, self.ratio, self.head_dim, self.index_head_dim, self.rope_dims)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def nbytes_at(self, tokens: int, itemsize: int = 2, batch: int = 1) -> float:
        """Bytes `state` holds after `tokens` positions, computed from this cache's layout."""
        if tokens == 0:
            return 0
        b = batch * self.window * self.codec.bytes_per_entry(itemsize)
        for c in (self.comp, self.index):
            if c is not None:
                b += c.nbytes_at(tokens, itemsize, batch)
        return b

    def growth_per_token(self, itemsize: int = 2) -> float:
        """Average bytes added per position (compressed entries only)."""
        return sum(c.codec.bytes_per_entry(itemsize) / c.ratio
                   for c in (self.comp, self.index) if c is not None)

    # -- segments (on-disk sessions) ----------------------------------------------------------
    def segment(self, since_tokens: int) -> Dict[str, mx.array]:
        """What this layer added since position `since_tokens` (entries) plus the small state
        at this boundary (ring, pending and overlap rows)."""
        out = self.state_dict()
        for key, c in (("comp", self.comp), ("index", self.index)):
            if c is not None:
                for k, v in c.parts(since_tokens // c.ratio).items():
                    out[f"{key}.entries.{k}"] = v
        return out

    @classmethod
    def from_segments(cls, layout: Tuple, kv_format: str, segments: List[Dict[str, mx.array]], offset: int):
        """Rebuild from the segments up to a boundary (the last one gives the small state)."""
        obj = cls(*layout, kv_format=kv_format)
        obj.offset = offset
        if offset == 0:
            return obj
        d = dict(segments[-1])
        for k in [k for k in d if ".entries." in k]:
            parts = [seg[k] for seg in segments if k in seg]
            d[k] = mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        obj.set_state_dict(d)
        return obj


def snapshot(caches: List[LayerCache]) -> list:
    """A copy-on-write snapshot of `caches`: new array objects on the same data. A cache updates
    its buffers in place (`ring[...] = x` rebinds the cache's own objects, copying on write), so
    the snapshot keeps the old contents without copying anything up front."""
    return [([a[...] for a in c.state], c.meta_state) for c in caches]


def restore(snap: list) -> List[LayerCache]:
    """Caches rebuilt from `snapshot` output; the snapshot stays reusable."""
    return [LayerCache.from_state([a[...] for a in state], meta) for state, meta in snap]


def make_layer_caches(args, kv_format: str = DEFAULT_KV_FORMAT) -> List[LayerCache]:
    """Fresh caches for the main layers of `args` (a ModelArgs)."""
    return [
        LayerCache(args.sliding_window, args.layer_ratio(i), args.head_dim, args.index_head_dim,
                   args.qk_rope_head_dim, kv_format)
        for i in range(args.num_hidden_layers)
    ]


def make_mtp_caches(args, kv_format: str = DEFAULT_KV_FORMAT) -> List[LayerCache]:
    return [
        LayerCache(args.sliding_window, args.mtp_ratio(i), args.head_dim, args.index_head_dim,
                   args.qk_rope_head_dim, kv_format)
        for i in range(args.num_nextn_predict_layers)
    ]
