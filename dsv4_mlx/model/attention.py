"""Attention of every layer type (spec §4.5, §4.8, §4.9).

Common path: low-rank query with a weighted norm on the latent ``qr`` (reused by the indexer)
and an unweighted per-head norm; one KV latent (K = V) with its own norm; RoPE on the last
`qk_rope_head_dim` dims with the layer's table. Key set of query t:

* window only (rate 0): the window, positions (t - window, t];
* HCA (rate m != 4): the window plus every visible compressed entry (dense);
* CSA (rate 4): the window plus the indexer's top-k compressed entries.

Softmax with a per-head sink in the denominator, inverse RoPE of the output at the query
position, then the block-diagonal grouped projection `wo_a` and `wo_b`.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import LayerCache
from ..kernels import attention as kattn
from ..kernels.norm_rope import norm_rope
from .compressor import Compressor
from .indexer import Indexer
from .layers import RMSNorm, rms_norm_0
from .rope import make_rope


_GROUP_IDS: dict = {}


def _group_ids(G: int) -> mx.array:
    """`arange(G)` (uint32, gather_qmm's index type) as a materialised constant: no launch
    per call. Group g's rows of x meet group g's weights: it serves as lhs and rhs indices."""
    if G not in _GROUP_IDS:
        _GROUP_IDS[G] = mx.array(np.arange(G, dtype=np.uint32))
    return _GROUP_IDS[G]


class GroupedLinear(nn.Module):
    """Block-diagonal projection (spec §4.9): weight [G*d_g, in_g], group g reads its own slice.

    Input [..., G, in_g] -> output [..., G, d_g].
    """

    def __init__(self, in_per_group: int, out_total: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = mx.zeros((out_total, in_per_group))

    def __call__(self, x: mx.array) -> mx.array:
        G = self.groups
        lead = x.shape[:-2]
        xg = x.reshape(-1, G, x.shape[-1]).swapaxes(0, 1)  # [G, N, in_g]
        return self.grouped(xg).swapaxes(0, 1).reshape(*lead, G, -1)

    def grouped(self, xg: mx.array) -> mx.array:
        """Group-major form: xg [G, N, in_g] -> [G, N, d_g]."""
        w = self.weight.reshape(self.groups, -1, self.weight.shape[-1])  # [G, d_g, in_g]
        return xg @ w.swapaxes(-1, -2)

    def to_quantized(self, group_size: int = 32, bits: int = 8, mode: str = "mxfp8", **_):
        q = QuantizedGroupedLinear(self.weight.shape[1], self.weight.shape[0], self.groups,
                                   group_size, bits, mode)
        q.weight, q.scales, *b = mx.quantize(self.weight, group_size, bits, mode=mode)
        q.biases = b[0] if b else None
        return q


class QuantizedGroupedLinear(nn.Module):
    """`GroupedLinear` with quantized weights: one `gather_qmm` over the G groups."""

    def __init__(self, in_per_group, out_total, groups, group_size=32, bits=8, mode="mxfp8"):
        super().__init__()
        self.groups, self.group_size, self.bits, self.mode = groups, group_size, bits, mode
        self.weight, self.scales, *b = mx.quantize(
            mx.zeros((out_total, in_per_group)), group_size, bits, mode=mode
        )
        self.biases = b[0] if b else None
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        G = self.groups
        lead = x.shape[:-2]
        xg = x.reshape(-1, G, x.shape[-1]).swapaxes(0, 1)  # [G, N, in_g]
        return self.grouped(xg).swapaxes(0, 1).reshape(*lead, G, -1)

    def _split(self):
        """weight, scales, biases as [G, rows_g, cols]: views, made (and evaluated) once per
        set of parameters, so a call adds no reshape to the graph."""
        parts = (self.weight, self.scales, self.biases)
        cached = self.__dict__.get("_split_views")  # not a parameter: lives and dies with self
        if cached is None or any(a is not b for a, b in zip(cached[0], parts)):
            G = self.groups
            views = tuple(None if a is None else a.reshape(G, -1, a.shape[-1]) for a in parts)
            mx.eval([v for v in views if v is not None])
            cached = (parts, views)
            object.__setattr__(self, "_split_views", cached)
        return cached[1]

    def grouped(self, xg: mx.array) -> mx.array:
        """Group-major form: xg [G, N, in_g] -> [G, N, d_g]."""
        G = self.groups
        w, scales, biases = self._split()
        return mx.gather_qmm(
            xg, w, scales, biases,
            lhs_indices=_group_ids(G), rhs_indices=_group_ids(G), transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode,
        )


def sink_attention(q: mx.array, keys: mx.array, mask: Optional[mx.array], sinks: mx.array,
                   scale: float) -> mx.array:
    """Attention with a sink in the denominator (spec §4.8); K = V; fused SDPA.

    q [B, H, T, c]; keys [B, L, c] shared by all queries, `mask` ([T, L] or [B, 1, T, L], True =
    visible). Returns [B, H, T, c] in q's dtype.
    """
    k = keys[:, None]
    return mx.fast.scaled_dot_product_attention(q, k, k, scale=scale, mask=mask, sinks=sinks.astype(q.dtype))


class Attention(nn.Module):
    def __init__(self, args, ratio: int):
        super().__init__()
        D, H, c = args.hidden_size, args.num_attention_heads, args.head_dim
        G, dg = args.o_groups, args.o_lora_rank
        self.n_heads, self.head_dim, self.groups = H, c, G
        self.ratio = ratio
        self.eps = args.rms_norm_eps
        self.scale = 1.0 / math.sqrt(c)
        self.wq_a = nn.Linear(D, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, H * c, bias=False)
        self.wkv = nn.Linear(D, c, bias=False)
        self.kv_norm = RMSNorm(c, args.rms_norm_eps)
        self.wo_a = GroupedLinear(H * c // G, G * dg, G)
        self.wo_b = nn.Linear(G * dg, D, bias=False)
        self.attn_sink = mx.zeros((H,))
        if ratio:
            self.compressor = Compressor(D, c, ratio, overlap=ratio == 4, eps=args.rms_norm_eps)
        if ratio == 4:
            self.indexer = Indexer(args)
        self.rope = make_rope(args, ratio)

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        B, T, _ = x.shape
        H, c = self.n_heads, self.head_dim
        s = cache.offset
        if B * T == 1 and s > 0:  # one token continuing one sequence
            return self._project(self.decode_core(x, self.decode_pre(x), cache))

        decode = T == 1 and s > 0  # one query a sequence of several: _decode_attention
        qr = self.q_norm(self.wq_a(x))
        if B * T == 1:  # the first token: both norms and RoPEs in one kernel on a GPU
            q, kv = norm_rope(self.wq_b(qr), self.wkv(x), self.kv_norm, self.eps, self.rope, s,
                              None)
        else:
            q = rms_norm_0(self.wq_b(qr).reshape(B, T, H, c), self.eps).swapaxes(1, 2)
            q = self.rope(q, offset=s)  # [B, H, T, c]
            kv = self.rope(self.kv_norm(self.wkv(x)), offset=s)  # [B, T, c]

        # the compressed branch: dense entries (shared by all queries) or per-query picks
        dense = dense_vis = sel_keys = sel_valid = idx = None
        n_dense = 0
        if self.ratio:
            x32 = x.astype(mx.float32)  # the compressors' projections are fp32; cast once
            n_dense, idx = self._compressed(x, qr, cache, s, x32)
            if n_dense and not decode:  # a one-query step sees every entry (_decode_attention)
                dense = cache.comp.entries
                dense_vis = mx.array(np.arange(n_dense)[None] < ((np.arange(s, s + T) + 1) // self.ratio)[:, None])
            elif idx is not None and not decode:
                sel_keys, sel_valid = cache.comp.gather(idx), idx >= 0  # only the picks decoded

        W = cache.window
        if decode:
            o = self._decode_attention(q, kv, cache, n_dense, idx)
            cache.advance(1)
            return self._project(o)
        parts = cache.codec.encode(kv)  # the stored form (fp8 format: FP8 non-RoPE dims)
        kv = cache.codec.decode(parts)  # attend over exactly what is stored
        keys, kpos = cache.window_keys(kv)
        if T > W or (sel_keys is not None and T > 1):  # long chunk, or per-query picks
            o = blocked_attention(q, keys, kpos, s, W, self.attn_sink, self.scale,
                                  dense, dense_vis, sel_keys, sel_valid)
        else:
            qpos = mx.arange(s, s + T)[:, None]
            mask = (kpos[None] <= qpos) & (kpos[None] > qpos - W) & (kpos[None] >= 0)
            if dense is not None:
                keys = mx.concatenate([keys, dense], axis=1)
                mask = mx.concatenate([mask, dense_vis], axis=1)
            if sel_keys is not None:  # decode: the picks are one more key set
                keys = mx.concatenate([keys, sel_keys[:, 0]], axis=1)
                mask = mx.concatenate(
                    [mx.broadcast_to(mask, (B, 1, T, mask.shape[-1])), sel_valid[:, None]], axis=-1)
            o = sink_attention(q, keys, mask, self.attn_sink, self.scale)
        cache.update_ring(parts)
        cache.advance(T)
        return self._output(o, s)

    def _compressed(self, x, qr, cache: LayerCache, s: int, x32):
        """The compressed branch's state update and choice: (n_dense, idx). Every entry the
        compressor has emitted (HCA; CSA while they number <= top-k: the selection is all of
        them) is attended densely (n_dense = their count, idx None), or the indexer picks
        top-k of them (idx [B, T, k]); the CSA indexer's own compressor keeps its keys
        either way."""
        N = self.compressor(x, cache.comp, s, self.rope, x32)
        if N and (self.ratio != 4 or N <= self.indexer.topk):
            if self.ratio == 4:
                self.indexer.compressor(x, cache.index, s, self.rope, x32)  # keep its keys
            return N, None
        if N:
            return 0, self.indexer(x, qr, cache.index, s, self.rope, x32)
        if self.ratio == 4:
            self.indexer.compressor(x, cache.index, s, self.rope, x32)
        return 0, None

    # -- one token continuing one sequence (B = T = 1, offset > 0): the stateless projections
    # (`decode_pre`), what reads and writes the cache (`decode_core`), then `_project`; a block
    # with `compile_decode` runs the first and the last inside compiled functions
    def decode_pre(self, x: mx.array) -> list:
        """[qr, wq_b(qr), wkv(x)] (+ x in fp32 for the compressors) of one token x [1, 1, D]."""
        qr = self.q_norm(self.wq_a(x))
        parts = [qr, self.wq_b(qr), self.wkv(x)]
        if self.ratio:
            parts.append(x.astype(mx.float32))  # the compressors' projections are fp32
        return parts

    def decode_core(self, x: mx.array, parts: list, cache: LayerCache) -> mx.array:
        """The cache's part of one decode step (norms and RoPEs with the KV store, the
        compressors, the indexer, the attention); the output before `_project`."""
        s = cache.offset
        qr, qb, kvp = parts[:3]
        # both norms and RoPEs in one kernel on a GPU, which also stores the KV into the ring
        # (then kv is None: stored)
        q, kv = norm_rope(qb, kvp, self.kv_norm, self.eps, self.rope, s, cache)
        n_dense, idx = self._compressed(x, qr, cache, s, parts[3]) if self.ratio else (0, None)
        o = self._decode_attention(q, kv, cache, n_dense, idx)
        cache.advance(1)
        return o

    def _output(self, o: mx.array, s: int) -> mx.array:
        """Inverse RoPE at the query positions (undo the position carried by V), then the
        grouped projection `wo_a` and `wo_b`. o [B, H, T, c] -> [B, T, D]."""
        return self._project(self.rope(o, offset=s, inverse=True))

    def _project(self, o: mx.array) -> mx.array:
        """The grouped projection `wo_a`, then `wo_b`: o [B, H, T, c] -> [B, T, D] (or one
        token's o already group-major, [G, 1, H c / G])."""
        if o.ndim == 3:
            return self.wo_b(self.wo_a.grouped(o).reshape(1, 1, -1))
        B, _, T, _ = o.shape
        if B * T == 1:  # one token: the heads are already group-major (fewer views)
            o = self.wo_a.grouped(o.reshape(self.groups, 1, -1)).reshape(1, 1, -1)
        else:
            o = self.wo_a(o.swapaxes(1, 2).reshape(B, T, self.groups, -1)).reshape(B, T, -1)
        return self.wo_b(o)

    def _decode_attention(self, q, kv, cache: LayerCache, n_dense: int, idx) -> mx.array:
        """One query at position s > 0: the new KV [B, 1, c] goes into the ring first (stored
        form, `LayerCache.store_token`; kv None: already stored), then one softmax
        over the ring's slots (any order: softmax does not care) and the compressed keys:
        the first `n_dense` entries, or the indexer's picks `idx` [B, 1, k].

        Every compressed key is visible here: the dense entries emitted so far are exactly those
        with (w+1)m <= s+1, and past top-k the indexer's k picks are all visible entries. Only
        ring slots not yet written (s < window - 1) need a mask.

        On a GPU this is one kernel reading the stored form (`kernels.attention`); otherwise
        the ring is decoded, the picks gathered, and the keys go through the fused SDPA.
        Returns the output after its inverse RoPE (in the kernel's last step on a GPU; for
        one batch row there already group-major, as `_project` takes it).
        """
        s, W = cache.offset, cache.window
        if kv is not None:
            cache.store_token(kv)
        ncomp = n_dense or (0 if idx is None else idx.shape[-1])
        backend = kattn.kernel_backend(q, cache.codec, ncomp, self.rope)
        if backend != "ops":
            comp = cache.comp.buffers if (n_dense or idx is not None) else None
            B, H, _, c = q.shape
            grouped = (self.groups, 1, H * c // self.groups) if B == 1 else None
            return kattn.sink_decode(q, cache.ring, min(s + 1, W), comp, n_dense,
                                     None if idx is None else idx[:, 0], self.attn_sink,
                                     self.scale, cache.codec, backend, rope=self.rope, offset=s,
                                     out_shape=grouped)
        keys = cache.codec.decode(cache.ring)  # [B, W, c]; slot j holds position s - (s - j) mod W
        extra = None
        if n_dense:
            extra = cache.comp.entries
        elif idx is not None:
            extra = cache.comp.gather(idx)[:, 0]
        mask = None
        if s < W - 1:
            m = np.arange(W + (0 if extra is None else extra.shape[1])) <= s
            m[W:] = True
            mask = mx.array(m[None])
        if extra is not None:
            keys = mx.concatenate([keys, extra], axis=1)
        o = sink_attention(q, keys, mask, self.attn_sink, self.scale)
        return self.rope(o, offset=s, inverse=True)


def blocked_attention(q, keys, kpos, s, W, sinks, scale, dense=None, dense_vis=None,
                      sel_keys=None, sel_valid=None):
    """Attention of a chunk with the window branch in query blocks of W (used for T > W, and
    for any chunk of T > 1 queries with per-query picks).

    Block i (queries s + iW ..) needs only the 2W window keys before and in it, so the window
    costs T x 2W scores instead of T x (W + T). Dense compressed entries join every block's
    keys and the blocks run as a batch through the fused SDPA with sinks; per-query picks (CSA
    past top-k) take a plain-ops joint softmax. q [B, H, T, c]; keys [B, L, c] with positions
    `kpos` [L] (oldest first, the last T are the chunk).
    """
    B, H, T, c = q.shape
    nb = -(-T // W)
    Tp = nb * W
    L = keys.shape[1]
    lead = W + T - L  # missing history (no ring yet): positions before s that never existed
    if lead or Tp > T:
        keys = mx.concatenate([mx.zeros((B, lead, c), keys.dtype), keys,
                               mx.zeros((B, Tp - T, c), keys.dtype)], axis=1)
        kpos = mx.concatenate([mx.full((lead,), -(10**9), mx.int32), kpos.astype(mx.int32),
                               mx.full((Tp - T,), 10**9, mx.int32)])
    idx = (mx.arange(nb) * W)[:, None] + mx.arange(2 * W)[None]  # [nb, 2W]
    kb, kbpos = keys[:, idx], kpos[idx]  # [B, nb, 2W, c], [nb, 2W]
    qbpos = mx.arange(s, s + Tp).reshape(nb, W)
    band = ((kbpos[:, None, :] <= qbpos[:, :, None]) & (kbpos[:, None, :] > qbpos[:, :, None] - W)
            & (kbpos[:, None, :] >= 0))  # [nb, W, 2W]
    if Tp > T:
        q = mx.concatenate([q, mx.zeros((B, H, Tp - T, c), q.dtype)], axis=2)
    qb = q.reshape(B, H, nb, W, c)

    if sel_keys is None:
        kk = kb
        mask = band
        if dense is not None:
            N = dense.shape[1]
            vis = dense_vis
            if Tp > T:
                vis = mx.concatenate([vis, mx.zeros((Tp - T, N), mx.bool_)], axis=0)
            kk = mx.concatenate([kb, mx.broadcast_to(dense[:, None], (B, nb, N, c))], axis=2)
            mask = mx.concatenate([band, vis.reshape(nb, W, N)], axis=-1)
        Lb = kk.shape[2]
        o = mx.fast.scaled_dot_product_attention(
            qb.transpose(0, 2, 1, 3, 4).reshape(B * nb, H, W, c),
            kk.reshape(B * nb, 1, Lb, c), kk.reshape(B * nb, 1, Lb, c), scale=scale,
            mask=mx.broadcast_to(mask[None], (B, nb, W, Lb)).reshape(B * nb, 1, W, Lb),
            sinks=sinks.astype(q.dtype))
        o = o.reshape(B, nb, H, W, c).transpose(0, 2, 1, 3, 4).reshape(B, H, Tp, c)
        return o[:, :, :T]

    # per-query picks: joint softmax over the block's window keys and the query's picks
    f32 = mx.float32
    k = sel_keys.shape[2]
    if Tp > T:
        sel_keys = mx.concatenate([sel_keys, mx.zeros((B, Tp - T, k, c), sel_keys.dtype)], axis=1)
        sel_valid = mx.concatenate([sel_valid, mx.zeros((B, Tp - T, k), mx.bool_)], axis=1)
    kbf = kb.astype(f32)[:, None]  # [B, 1, nb, 2W, c]
    lw = (qb.astype(f32) @ kbf.swapaxes(-1, -2)) * scale  # [B, H, nb, W, 2W]
    lw = mx.where(band, lw, -mx.inf)
    sk = sel_keys.astype(f32)
    ls = (q.astype(f32).swapaxes(1, 2) @ sk.swapaxes(-1, -2)).swapaxes(1, 2) * scale  # [B, H, Tp, k]
    ls = mx.where(sel_valid[:, None], ls, -mx.inf)
    sink = sinks.astype(f32)[None, :, None]
    m = mx.maximum(mx.maximum(lw.max(axis=-1).reshape(B, H, Tp), ls.max(axis=-1)), sink)
    ew = mx.exp(lw - m.reshape(B, H, nb, W)[..., None])
    es = mx.exp(ls - m[..., None])
    denom = ew.sum(axis=-1).reshape(B, H, Tp) + es.sum(axis=-1) + mx.exp(sink - m)
    o = (ew @ kbf).reshape(B, H, Tp, c) + (es.swapaxes(1, 2) @ sk).swapaxes(1, 2)
    return (o / denom[..., None]).astype(q.dtype)[:, :, :T]
