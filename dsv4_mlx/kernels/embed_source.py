"""Kernel source of the token embedding into the mHC streams (spec §4.1, §4.2): one body,
three dialects.

The model's input is each token's embedding row copied into its n residual streams. One
thread a (token, feature): it reads the row straight from the table -- an affine-quantized
one (the packed codes, the group's scale and bias: ``T(q x scale + bias)`` rounded once, as
MLX's CUDA dequantization computes it -- its ``scale * T(q) + bias`` in bf16 is contracted
to one fused multiply-add, measured on an H100; MLX's CPU path rounds the product first, so
there the two may differ by an ulp or two) or a plain one -- and writes the value to all n
streams. One launch replaces the three gathers, the dequantization, the broadcast and
the copy a kernel reading the streams would make of the broadcast.

The body uses the dialect layer of `indexer_source` and keeps its rules.
"""

from __future__ import annotations

import functools

from .indexer_source import KernelSource, make_source

# Inputs: ids [N] int32, w [V, D / (32 / BITS)] uint32 (quantized) or [V, D] (XT),
# scales, biases [V, D / GS] (XT; read when quantized). Output: X [N, NS, D] (XT).
# Template: XT, D, NS, TG (and BITS, GS when quantized). Grid (ceil(D / TG) TG, N, 1).
_BODY = r"""
  const int t = ki_gy;
  const int d = ki_gx * TG + ki_tid;
  if (d < D) {
    const int64_t row = ids[t];
@VALUE@
    for (int j = 0; j < NS; ++j) X[((int64_t)t * NS + j) * D + d] = v;
  }
"""

_QUANT = r"""
    constexpr int PW = 32 / BITS;  // codes a 32-bit word, lowest bits first
    const uint32_t word = w[row * (D / PW) + d / PW];
    const uint32_t q = (word >> ((d % PW) * BITS)) & ((1u << BITS) - 1u);
    const int64_t g = row * (D / GS) + d / GS;
    const XT v = ki_from_float<XT>((float)q * ki_to_float(scales[g]) + ki_to_float(biases[g]));"""

_PLAIN = r"""
    const XT v = w[row * D + d];"""


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def embed_source(dialect: str, quantized: bool) -> KernelSource:
    """The embedding-into-streams kernel (see `_BODY`): affine-quantized or plain table."""
    if quantized:
        return make_source(dialect, "dsv4_embed_streams_q", ("ids", "w", "scales", "biases"),
                           ("X",), _BODY.replace("@VALUE@", _QUANT.strip("\n")))
    return make_source(dialect, "dsv4_embed_streams", ("ids", "w"), ("X",),
                       _BODY.replace("@VALUE@", _PLAIN.strip("\n")))
