"""Lightning indexer of CSA layers (spec §4.7).

Keys come from a second overlapping compressor (rate 4, width c_I) over the same input,
RoPE'd at position w*4 with the layer's (compress) table. Queries are ``qr Wq_b^T`` split into
H_I heads of c_I dims, RoPE'd at position t; head weights are
``x weights_proj^T * c_I^-1/2 * H_I^-1/2``. The Hadamard rotation of the reference leaves the
dot products unchanged and only matters for FP4 storage (a later issue), so it is not applied
here.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import CompressorState
from ..kernels.fp4_round import query_roundtrip
from ..kernels.gemv import linear_scaled
from ..kernels.indexer import indexer_topk, select_scratch
from .compressor import Compressor
from .rope import RoPE


class Indexer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads = args.index_n_heads
        self.head_dim = args.index_head_dim
        self.topk = args.index_topk
        self.ratio = 4
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(
            args.hidden_size, self.head_dim, self.ratio, overlap=True, eps=args.rms_norm_eps
        )
        self.weight_scale = 1.0 / (math.sqrt(self.head_dim) * math.sqrt(self.n_heads))

    def __call__(
        self, x: mx.array, qr: mx.array, state: CompressorState, offset: int, rope: RoPE, x32=None
    ):
        """Returns the selected entries [B, T, k] (int32, -1 = none), or None if N == 0."""
        B, T, _ = x.shape
        N = self.compressor(x, state, offset, rope, x32)
        if N == 0:
            return None
        vis = (np.arange(offset, offset + T) + 1) // self.ratio
        # a decode token sees all N entries: None (the GPU kernels then read no count array:
        # MLX keeps a 4-byte array in host-resident managed memory, read over the bus)
        visible = None if (vis >= N).all() else mx.array(vis, mx.int32)
        # MLX is lazy: when N <= topk the selection is all entries and q/w are never computed
        H, d = self.n_heads, self.head_dim
        if T == 1:  # one token: [B, H, 1, d] (rotary layout) is [B, 1, H, d] in memory
            q = rope(self.wq_b(qr).reshape(B, H, 1, d), offset=offset)
        else:
            q = rope(self.wq_b(qr).reshape(B, T, H, d).swapaxes(1, 2), offset=offset).swapaxes(1, 2)
        # fp8 format: Hadamard rotation + FP4, as the keys got (one kernel on a GPU)
        q = query_roundtrip(q, state.codec, (B, T, H, d))
        if T == 1 and isinstance(self.weights_proj, nn.Linear) and "bias" not in self.weights_proj:
            w = linear_scaled(self.weights_proj.weight, x, self.weight_scale)  # one kernel
        else:
            w = self.weights_proj(x).astype(mx.float32) * self.weight_scale
        fp4 = getattr(state.codec, "mxfp4", False)
        if fp4:  # fp8 format: the kernels read packed FP4 keys
            parts = state.parts()
            keys = (parts["packed"], parts["scale"])
        else:
            keys = state.entries
        # FP4-rounded queries are bf16 numbers: the GPU may score them on the matrix units
        # (the one launch of scoring and top-k may keep its histograms in this layer's
        # scratch: its calls never overlap on the GPU; None unless asked for)
        scratch = select_scratch(B * T, self.__dict__.setdefault("_select_scratch", {}))
        return indexer_topk(q, w, keys, visible, self.topk, q_exact_bf16=fp4, scratch=scratch)

