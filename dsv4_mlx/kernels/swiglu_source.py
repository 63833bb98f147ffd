"""Kernel source of the experts' clamped SwiGLU on a fused gate/up projection (spec §4.10):
one body, three dialects.

The experts' ``w1`` and ``w3`` run as one matmul (`model.moe.fuse_pair`), whose output row
holds the gate in its first I values and the up projection in the next I. One thread an
output value: ``h = silu(min(gate, limit)) * clip(up, -limit, limit)`` in fp32 (silu as MLX's
``x * sigmoid(x)``, sigmoid as MLX's ``1 / (1 + exp(|x|))`` mirrored for x >= 0), times the
row's routing weight for routed experts, rounded to OT. It reads the two halves in place: no
slice nodes, one launch (the compiled ops path of MLX takes the two halves as views).

The body uses the dialect layer of `indexer_source` and keeps its rules.
"""

from __future__ import annotations

import functools

from .indexer_source import KernelSource, make_source

# Inputs: y [R, 2 I] (YT), w [R] f32 (read when WEIGHTED), limit [1] f32.
# Output: h [R, I] (OT). Template: YT, OT, I, TG, WEIGHTED. Grid (ceil(I / TG) TG, R, 1).
_BODY = r"""
  const int r = ki_gy;
  const int j = ki_gx * TG + ki_tid;
  if (j < I) {
    const float lim = limit[0];
    const float gv = ki_to_float(y[(int64_t)r * 2 * I + j]);
    const float uv = ki_to_float(y[(int64_t)r * 2 * I + I + j]);
    const float g = gv < lim ? gv : lim;
    const float u = uv < -lim ? -lim : (uv > lim ? lim : uv);
    const float e = 1.0f / (1.0f + KI_EXP(g < 0.0f ? -g : g));
    const float sg = g < 0.0f ? e : 1.0f - e;
    float hv = (g * sg) * u;
    if (WEIGHTED) hv = hv * w[r];
    h[(int64_t)r * I + j] = ki_from_float<OT>(hv);
  }
"""


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def swiglu_source(dialect: str) -> KernelSource:
    """The fused-projection SwiGLU kernel (see `_BODY`)."""
    return make_source(dialect, "dsv4_swiglu_fused", ("y", "w", "limit"), ("h",), _BODY)
