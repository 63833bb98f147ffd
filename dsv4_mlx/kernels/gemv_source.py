"""Kernel source of the one-token projections with fp32 outputs (spec §4.0): one body, three
dialects.

``y[o] = sum_k W[o, k] x[k]`` with W [O, K] (fp32, or bf16/fp16) and x one token (fp32, bf16 or
fp16), accumulated in fp32: the mHC mixing projection (24 x 16,384), the router (256 x 4,096),
the compressors' ``wkv`` / ``wgate`` pairs (with the gate's ``ape`` row added), the indexer's
bf16 ``weights_proj`` (64 x 4,096; its output rounded to bf16 and scaled, as the linear layer
and the multiply after it do). MLX's one-row fp32 GEMV gives such a matrix few
threadgroups with few loads in flight (~12 µs a call on an H100 for 1.5 MB); here one
threadgroup a row issues all its loads at once (a thread: ceil(K / 4 / TG) float4), so a call
costs about one memory round trip. The pair variant computes two weights that share x
(``wkv`` and ``wgate``) in one launch; x is converted in the kernel (no cast launch).

The body uses the dialect layer of `indexer_source` and keeps its rules.
"""

from __future__ import annotations

import functools

from .indexer_source import KernelSource, make_source

# Inputs: W [O0, K] (WT), (pair: W2 [O1, K] (WT)), x [K] (XT), sc [1] f32, ape [M, O1] f32,
# pos [1] int32. Outputs: y [O0] f32, (pair: y2 [O1] f32).
# Template: XT, WT, K (a multiple of 4), TG (a multiple of 32), O0, O1, RT, SC, M.
# Grid ((O0 + O1) * TG, 1, 1), groups of TG: group o takes row o (of W2 past O0).
# The sum s of a row is stored as ``RT(s) x sc[0]`` (RT: the dtype a linear layer in WT
# rounds its output to, float for none; SC: whether sc is read) -- `weights_proj`'s
# ``float(bf16 linear) x scale``; with M > 0 (pair only) row pos % M of `ape` is added to
# the second output -- the compressor's ``gate + ape[t mod m]``.
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
    if (i < K4) {
      const KI_DEVICE WT* wr = first ? W + row : @W2@ + row;
      @LOADW@
    }
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
    s = ki_to_float(ki_from_float<RT>(s));
    if (SC) s *= sc[0];
    @STORE@
  }
"""

_SINGLE = {"@W2@": "W", "@STORE@": "y[o] = s;"}
_PAIR = {"@W2@": "W2", "@STORE@": (
    "if (first) { y[o] = s; } else {\n"
    "      if (M > 0) s += ape[(pos[0] % (M > 0 ? M : 1)) * O1 + (o - O0)];\n"
    "      y2[o - O0] = s;\n    }")}


# a weight row's 4 values at float4 index i: one 16-byte load (fp32), or four converted
_LOAD_F32 = "wv[u] = KI_LOAD4F(wr, i);"
_LOAD_HALF = ("wv[u] = KI_FLOAT4(ki_to_float(wr[4 * i]), ki_to_float(wr[4 * i + 1]),\n"
              "                        ki_to_float(wr[4 * i + 2]), ki_to_float(wr[4 * i + 3]));")


def _body(parts: dict, wf32: bool) -> str:
    body = _GEMV_BODY.replace("@LOADW@", _LOAD_F32 if wf32 else _LOAD_HALF)
    for k, v in parts.items():
        body = body.replace(k, v)
    return body


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def gemv_source(dialect: str, pair: bool = False, wf32: bool = True) -> KernelSource:
    """One-token projection (see `_GEMV_BODY`); ``pair``: two weights sharing x; ``wf32``:
    fp32 weights (else bf16/fp16, WT)."""
    suffix = "" if wf32 else "_h"
    if pair:
        return make_source(dialect, "dsv4_gemv2" + suffix, ("W", "W2", "x", "sc", "ape", "pos"),
                           ("y", "y2"), _body(_PAIR, wf32))
    return make_source(dialect, "dsv4_gemv" + suffix, ("W", "x", "sc", "ape", "pos"), ("y",),
                       _body(_SINGLE, wf32))
