"""Kernel source of the one-token fp32 projections (spec §4.0): one body, three dialects.

``y[o] = sum_k W[o, k] x[k]`` with W fp32 [O, K] and x one token (fp32, bf16 or fp16),
accumulated in fp32: the mHC mixing projection (24 x 16,384), the router (256 x 4,096), the
compressors' ``wkv`` / ``wgate`` pairs. MLX's one-row fp32 GEMV gives such a matrix few
threadgroups with few loads in flight (~12 µs a call on an H100 for 1.5 MB); here one
threadgroup a row issues all its loads at once (a thread: ceil(K / 4 / TG) float4), so a call
costs about one memory round trip. The pair variant computes two weights that share x
(``wkv`` and ``wgate``) in one launch; x is converted in the kernel (no cast launch).

The body uses the dialect layer of `indexer_source` and keeps its rules.
"""

from __future__ import annotations

import functools

from .indexer_source import KernelSource, make_source

# Inputs: W [O0, K] f32, (pair: W2 [O1, K] f32), x [K] (XT). Outputs: y [O0] f32,
# (pair: y2 [O1] f32). Template: XT, K (a multiple of 4), TG (a multiple of 32), O0.
# Grid ((O0 + O1) * TG, 1, 1), groups of TG: group o takes row o (of W2 past O0).
_GEMV_BODY = r"""
  constexpr int K4 = K / 4;
  constexpr int PER = (K4 + TG - 1) / TG;
  KI_SHARED float ki_wsum[TG / 32];
  const int o = ki_gx;
  const bool first = o < O0;  // (uniform in the group)
  const int64_t row = (int64_t)(first ? o : o - O0) * K;
  // every load of the row at once: one memory round trip
  float4 wv[PER];
  KI_UNROLL
  for (int u = 0; u < PER; ++u) {
    const int i = ki_tid + u * TG;
    wv[u] = KI_FLOAT4(0.0f, 0.0f, 0.0f, 0.0f);
    if (i < K4) wv[u] = first ? KI_LOAD4F(W + row, i) : KI_LOAD4F(@W2@ + row, i);
  }
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
  KI_UNROLL
  for (int u = 0; u < PER; ++u) {
    const int i = ki_tid + u * TG;
    if (i < K4) {
      a0 += wv[u].x * ki_to_float(x[4 * i]);
      a1 += wv[u].y * ki_to_float(x[4 * i + 1]);
      a2 += wv[u].z * ki_to_float(x[4 * i + 2]);
      a3 += wv[u].w * ki_to_float(x[4 * i + 3]);
    }
  }
  const float a = KI_WARP_SUM((a0 + a1) + (a2 + a3));
  if (ki_tid % 32 == 0) ki_wsum[ki_tid / 32] = a;
  KI_BARRIER();
  if (ki_tid == 0) {
    float s = 0.0f;
    for (int j = 0; j < TG / 32; ++j) s += ki_wsum[j];
    @STORE@
  }
"""

_SINGLE = {"@W2@": "W", "@STORE@": "y[o] = s;"}
_PAIR = {"@W2@": "W2", "@STORE@": "if (first) y[o] = s; else y2[o - O0] = s;"}


def _body(parts: dict) -> str:
    body = _GEMV_BODY
    for k, v in parts.items():
        body = body.replace(k, v)
    return body


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def gemv_source(dialect: str, pair: bool = False) -> KernelSource:
    """One-token fp32 projection (see `_GEMV_BODY`); ``pair``: two weights sharing x."""
    if pair:
        return make_source(dialect, "dsv4_gemv2", ("W", "W2", "x"), ("y", "y2"), _body(_PAIR))
    return make_source(dialect, "dsv4_gemv", ("W", "x"), ("y",), _body(_SINGLE))
