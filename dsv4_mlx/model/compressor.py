"""KV compressor (spec §4.6), for CSA (rate 4, overlapping halves) and HCA (any other rate).

Per token j (fp32): ``C_j = x_j Wkv^T``, ``Z_j = x_j Wgate^T + ape[j mod m]`` of width
kappa*c (kappa = 2 with overlap). Windows are aligned to absolute positions: window w covers
tokens [w*m, (w+1)*m). The softmax runs over tokens, separately per feature channel.

* HCA: ``P_w = sum_{j in win w} softmax_j(Z_j) * C_j``.
* CSA: entry w pools the first halves of window w-1 and the second halves of window w
  (2m slots, one softmax); window -1 is (C=0, Z=-inf).

Then ``K_w = RoPE(RMSNorm(cast(P_w)), position w*m)``. Entry w exists once token (w+1)m-1 has
been seen; it is visible to query t iff ``(w+1)*m <= t+1``.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import CompressorState
from .layers import RMSNorm, linear_f32_pair
from .rope import RoPE


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        k = 2 if overlap else 1
        self.ratio = ratio
        self.head_dim = head_dim
        self.overlap = overlap
        self.wkv = nn.Linear(dim, k * head_dim, bias=False)
        self.wgate = nn.Linear(dim, k * head_dim, bias=False)
        self.ape = mx.zeros((ratio, k * head_dim))
        self.norm = RMSNorm(head_dim, eps)

    def __call__(self, x: mx.array, state: CompressorState, offset: int, rope: RoPE,
                 x32: Optional[mx.array] = None) -> int:
        """Feed the chunk `x` [B, T, D] at absolute positions offset..offset+T-1 (`x32`: x in
        fp32 when the caller has it).

        Emits every window completed by this chunk into `state` (which stores them through its
        codec) and returns the number of entries emitted so far.
        """
        B, T, _ = x.shape
        m, c = self.ratio, self.head_dim
        state.init_batch(B, x.dtype)
        r = state.num_pending
        assert r == offset % m, "compressor state out of step with the position"

        if T == 1:  # one token: the projection kernel converts x itself and adds the gate's
            # ape row (ops: the same cast and add)
            kv, gate = linear_f32_pair(self.wkv, self.wgate, x, self.ape, offset)
        else:
            src = x.astype(mx.float32) if x32 is None else x32
            kv, gate = linear_f32_pair(self.wkv, self.wgate, src)
            gate = gate + self.ape.astype(mx.float32)[mx.array(np.arange(offset, offset + T) % m, mx.int32)]
        if r:
            kv = mx.concatenate([state.pending_kv, kv], axis=1)
            gate = mx.concatenate([state.pending_gate, gate], axis=1)
        n = (r + T) // m
        state.pending_kv = kv[:, n * m :]
        state.pending_gate = gate[:, n * m :]
        if n:
            kv = kv[:, : n * m].reshape(B, n, m, -1)
            gate = gate[:, : n * m].reshape(B, n, m, -1)
            if self.overlap:
                first_kv, second_kv = kv[..., :c], kv[..., c:]
                first_gate, second_gate = gate[..., :c], gate[..., c:]
                prev_kv = mx.concatenate([state.overlap_kv[:, None], first_kv[:, :-1]], axis=1)
                prev_gate = mx.concatenate(
                    [state.overlap_gate[:, None], first_gate[:, :-1]], axis=1
                )
                state.overlap_kv = first_kv[:, -1]
                state.overlap_gate = first_gate[:, -1]
                kv = mx.concatenate([prev_kv, second_kv], axis=2)  # [B, n, 2m, c]
                gate = mx.concatenate([prev_gate, second_gate], axis=2)
            pooled = (mx.softmax(gate, axis=2, precise=True) * kv).sum(axis=2)  # [B, n, c]
            entries = self.norm(pooled.astype(x.dtype))
            w0 = (offset - r) // m
            entries = rope(entries, offset=w0, scale=float(m))
            state.append_entries(entries)
        return state.num_entries
