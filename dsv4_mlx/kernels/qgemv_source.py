"""Kernel source of the one-token 8-bit affine projection (the output head, spec §4.14): one
body, three dialects.

``y[o] = sum_k (q[o, k] s[o, g] + b[o, g]) x[k]`` (g = k / GS) for MLX's affine 8-bit layout
(`mx.quantize(..., bits=8, mode="affine")`: the codes packed four to a uint32 word, byte j of
word i being element 4 i + j; a scale and a bias per GS inputs), x one token, fp32 sums. The
head of the 4-layer benchmark model (129,280 x 4,096, fp32 x and scales) is MLX's largest
one-token GEMV, about a quarter of a decode step's GPU time there (`bench/decode_gpu_time.py`,
run8); MLX's `qmv` reads it at about a quarter of the copy bandwidth. Here a group stages x in
shared memory once for RW rows a warp, and a lane issues every 16-byte load of a row before
it multiplies.

The body uses the dialect layer of `indexer_source` and keeps its rules.
"""

from __future__ import annotations

import functools

from .indexer_source import KernelSource, make_source

# Inputs: W uint32 [O, K / 4], scales [O, K / GS] (ST; mxfp8: uint8), biases [O, K / GS] (ST;
# mxfp8: unread), x [K] (XT).
# Output: y [O] (OT). Template: XT, ST, OT, K (a multiple of 16), GS (a multiple of 16), TG (a
# multiple of 32), RW (rows a warp). Grid (ceil(O / (TG / 32 * RW)) * TG, 1, 1): warp w of
# group G takes rows (G * TG / 32 + w) * RW .. + RW - 1. Every lane of every warp reaches each
# warp sum (rows past O compute zeros and store nothing).
_QGEMV_BODY = r"""
  constexpr int K16 = K / 16;           // 16-byte chunks (16 codes) a row
  constexpr int PER = (K16 + 31) / 32;  // chunks a lane
  constexpr int NG = K / GS;            // scale groups a row
  KI_SHARED float ki_x[K];
  for (int i = ki_tid; i < K; i += TG) ki_x[i] = ki_to_float(x[i]);
  KI_BARRIER();
  const int O = W_shape[0];
  const int lane = ki_tid % 32;
  const int warp = ki_tid / 32;
  for (int r = 0; r < RW; ++r) {
    const int o = (ki_gx * (TG / 32) + warp) * RW + r;
    const bool valid = o < O;  // (uniform in the warp)
    const int64_t orow = valid ? (int64_t)o : 0;
    const int64_t wbase = orow * (K / 4);  // (words: W is indexed directly, never bound)
    uint4 wv[PER];
    KI_UNROLL
    for (int u = 0; u < PER; ++u) {
      const int c = lane + 32 * u;
      wv[u] = (valid && c < K16) ? KI_LOAD4U(W + wbase, c) : KI_UINT4(0u, 0u, 0u, 0u);
    }
    float acc = 0.0f;
    KI_UNROLL
    for (int u = 0; u < PER; ++u) {
      const int c = lane + 32 * u;
      if (valid && c < K16) {
        const int k0 = 16 * c;
@SCALE@
        const unsigned int words[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
        float a = 0.0f;
        KI_UNROLL
        for (int j = 0; j < 16; ++j) {
          const unsigned int v = (words[j / 4] >> (8 * (j % 4))) & 255u;
@CODE@
        }
        acc += a;
      }
    }
    acc = KI_WARP_SUM(acc);
    if (valid && lane == 0) y[o] = ki_from_float<OT>(acc);
  }
"""


# affine: a scale and a bias (ST) per GS codes, the code an unsigned byte
_AFFINE = {
    "@SCALE@": """\
        const float s = ki_to_float(scales[orow * NG + k0 / GS]);
        const float b = ki_to_float(biases[orow * NG + k0 / GS]);""",
    "@CODE@": """\
          a += ((float)v * s + b) * ki_x[k0 + j];""",
}
# mxfp8 (MLX's mode="mxfp8", the converter's layout of the FP8 linears): the code an e4m3
# number (bias 7, no infinities, S.1111.111 NaN), a power-of-two UE8M0 scale (uint8, bias 127,
# 255 NaN) per 32 codes, no bias. Every code times its scale is exact in fp32.
_MXFP8 = {
    "@SCALE@": """\
        const unsigned int e8 = (unsigned int)scales[orow * NG + k0 / GS];
        const float s = e8 == 255u ? KI_AS_FLOAT(0x7fc00000u)
                        : (e8 == 0u ? KI_AS_FLOAT(0x00400000u) : KI_AS_FLOAT(e8 << 23));""",
    "@CODE@": """\
          const unsigned int ex = (v >> 3) & 15u;
          const unsigned int mt = v & 7u;
          float q = ex == 0u ? (float)mt * 0.001953125f  // subnormal: m x 2^-9
                    : KI_AS_FLOAT(((ex + 120u) << 23) | (mt << 20));
          q = (ex == 15u && mt == 7u) ? KI_AS_FLOAT(0x7fc00000u) : q;
          q = (v & 128u) ? -q : q;
          a += (q * s) * ki_x[k0 + j];""",
}


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def qgemv_source(dialect: str, mode: str = "affine") -> KernelSource:
    """One-token 8-bit projection (see `_QGEMV_BODY`): ``mode`` ``"affine"`` (codes, scales,
    biases) or ``"mxfp8"`` (codes, UE8M0 scales; the biases input unread)."""
    parts = {"affine": _AFFINE, "mxfp8": _MXFP8}[mode]
    body = _QGEMV_BODY
    for k, v in parts.items():
        body = body.replace(k, v)
    return make_source(dialect, "dsv4_qgemv8" if mode == "affine" else "dsv4_qgemv_mxfp8",
                       ("W", "scales", "biases", "x"), ("y",), body)
