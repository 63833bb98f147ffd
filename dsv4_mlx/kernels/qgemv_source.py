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

`mx_gemv_source`: the microscaled formats of `dsv4 convert` (mxfp8: the FP8 linears; mxfp4: the
routed experts), one token, plain or gathered by expert (`_MX_BODY`).

The bodies use the dialect layer of `indexer_source` and keep its rules.
"""

from __future__ import annotations

import functools

from .indexer_source import KernelSource, make_source

# Inputs: W uint32 [O, K / 4], scales [O, K / GS] (ST), biases [O, K / GS] (ST), x [K] (XT).
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


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def qgemv_source(dialect: str) -> KernelSource:
    """One-token 8-bit affine projection (see `_QGEMV_BODY`): codes, scales, biases."""
    body = _QGEMV_BODY
    for k, v in _AFFINE.items():
        body = body.replace(k, v)
    return make_source(dialect, "dsv4_qgemv8", ("W", "scales", "biases", "x"), ("y",), body)


# --------------------------------------------------------------------------------------------
# microscaled (mxfp8 / mxfp4) one-token projections, plain or gathered by expert

# y[p, o] = sum_k deq(W[e_p, o, k]) x[r_p, k]: codes BITS wide (8: e4m3, 4: e2m1; MLX's
# layout, 32 / BITS codes a uint32 word, low bits first), a UE8M0 scale per 32 codes; a lane's
# partial sum over its 16-byte chunk (16 or 32 codes) in fp32, times its scale once, as MLX's
# fp_qmv does; the row's sum over lanes (and over the WPR warps splitting K) in fp32.
# Inputs: W uint32 [(E,) O, K * BITS / 32], scales uint8 [(E,) O, K / 32], x [R, K] (XT),
# inds uint32 [P] (GATHER: the expert of pick p; otherwise unread). Output y [P, O] (OT).
# Template: XT, OT, K (a multiple of 32), BITS, TG (a multiple of 32 * WPR), WPR (warps a row:
# the row's chunks split over 32 * WPR lanes), RW (rows a warp group, one after another, the
# next row's loads issued before this row's products), GATHER, XPP (x row p for pick p, else
# row 0). Grid (ceil(O / (TG / 32 / WPR * RW)) * TG, P, 1).
# x is staged in shared memory as fp32, a chunk's values followed by 4 padding slots, so that
# a lane reads its x four at a time (16-byte loads) and the lanes of a warp (a chunk apart)
# read different banks.
_MX_BODY = r"""
  constexpr int VPC = 128 / BITS;                  // codes a 16-byte chunk
  constexpr int CPR = K / VPC;                     // chunks a row
  constexpr int LANES = 32 * WPR;                  // lanes a row
  constexpr int PER = (CPR + LANES - 1) / LANES;   // chunks a lane
  constexpr int NWG = TG / 32 / WPR;               // warp groups (rows at once) a group
  constexpr int XS4 = VPC / 4 + 1;                 // a chunk's x values + padding, in float4
  KI_SHARED float4 ki_x[CPR * XS4];
  KI_SHARED float ki_part[RW * (TG / 32)];
  const int p = ki_gy;
  const int64_t xrow = XPP ? (int64_t)p * K : 0;
  for (int i = ki_tid; i < K / 4; i += TG) {
    const int64_t k = xrow + 4 * i;
    ki_x[(i / (VPC / 4)) * XS4 + i % (VPC / 4)] =
        KI_FLOAT4(ki_to_float(x[k]), ki_to_float(x[k + 1]), ki_to_float(x[k + 2]),
                  ki_to_float(x[k + 3]));
  }
  const int O = W_shape[GATHER ? 1 : 0];
  const int64_t e = GATHER ? (int64_t)inds[p] : 0;
  const int lane = ki_tid % 32;
  const int warp = ki_tid / 32;
  const int wg = warp / WPR;
  const int c0 = (warp % WPR) * 32 + lane;         // this lane's first chunk of a row
  uint4 wv[2][PER];
  unsigned int sv[2][PER];
  KI_BARRIER();
  KI_UNROLL
  for (int r = 0; r <= RW; ++r) {
    // loads of row r (the next), then the products of row r - 1
    if (r < RW) {
      const int o = (ki_gx * NWG + wg) * RW + r;
      const bool valid = o < O;  // (uniform in the warp)
      const int64_t row = e * O + (valid ? o : 0);
      KI_UNROLL
      for (int u = 0; u < PER; ++u) {
        const int c = c0 + LANES * u;
        const bool ok = valid && c < CPR;
        wv[r % 2][u] = ok ? KI_LOAD4U(W + row * (CPR * 4), c) : KI_UINT4(0u, 0u, 0u, 0u);
        sv[r % 2][u] = ok ? (unsigned int)scales[row * (K / 32) + (c * VPC) / 32] : 127u;
      }
    }
    if (r > 0) {
      const int b = (r - 1) % 2;
      float acc = 0.0f;
      KI_UNROLL
      for (int u = 0; u < PER; ++u) {
        const int c = c0 + LANES * u;
        if (c < CPR) {
          const int xb = c * XS4;
          const unsigned int words[4] = {wv[b][u].x, wv[b][u].y, wv[b][u].z, wv[b][u].w};
          float a0 = 0.0f, a1 = 0.0f;
          KI_UNROLL
          for (int j = 0; j < 4; ++j) {
@DECODE@
          }
          acc += (a0 + a1) @SCALE@;
        }
      }
      acc = KI_WARP_SUM(acc);
      if (lane == 0) ki_part[(r - 1) * (TG / 32) + warp] = acc;
    }
  }
  KI_BARRIER();
  for (int i = ki_tid; i < RW * NWG; i += TG) {
    const int r = i / NWG;
    const int g = i % NWG;
    const int o = (ki_gx * NWG + g) * RW + r;
    if (o < O) {
      float s = 0.0f;
      for (int j = 0; j < WPR; ++j) s += ki_part[r * (TG / 32) + g * WPR + j];
      y[(int64_t)p * O + o] = ki_from_float<OT>(s);
    }
  }
"""

# word j of a chunk: 4 e4m3 codes (bytes, low first) times x values 4 j ..
_MX_DECODE8 = """\
            const float4 q = KI_E4M3X4(words[j]);
            const float4 xv = ki_x[xb + j];
            a0 += q.x * xv.x;
            a1 += q.y * xv.y;
            a0 += q.z * xv.z;
            a1 += q.w * xv.w;"""
# word j of a chunk: 8 e2m1 codes (nibbles, low first) times x values 8 j ..: nibbles h and
# h + 4 as one f16 pair whose bits are the code's (magnitude bits to 9-11, sign to 15): the
# value times 2^-14 exactly (magnitude code 1 is the subnormal 2^-15), for both nibbles of
# the pair with two shifts and masks; the 2^14 goes with the scale.
_MX_DECODE4 = """\
            const unsigned int u = words[j];
            const float4 xa = ki_x[xb + 2 * j];
            const float4 xc = ki_x[xb + 2 * j + 1];
            const unsigned int h0 = ((u << 9) & 0x0e000e00u) | ((u << 12) & 0x80008000u);
            const unsigned int h1 = ((u << 5) & 0x0e000e00u) | ((u << 8) & 0x80008000u);
            const unsigned int h2 = ((u << 1) & 0x0e000e00u) | ((u << 4) & 0x80008000u);
            const unsigned int h3 = ((u >> 3) & 0x0e000e00u) | (u & 0x80008000u);
            a0 += ki_half_lo(h0) * xa.x;
            a1 += ki_half_hi(h0) * xc.x;
            a0 += ki_half_lo(h1) * xa.y;
            a1 += ki_half_hi(h1) * xc.y;
            a0 += ki_half_lo(h2) * xa.z;
            a1 += ki_half_hi(h2) * xc.z;
            a0 += ki_half_lo(h3) * xa.w;
            a1 += ki_half_hi(h3) * xc.w;"""
_MX_SCALE = {8: "* ki_e8m0(sv[b][u])", 4: "* 16384.0f * ki_e8m0(sv[b][u])"}


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def mx_gemv_source(dialect: str, bits: int) -> KernelSource:
    """One-token mxfp8 (``bits`` 8) or mxfp4 (4) projection, plain or gathered (`_MX_BODY`)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    body = _MX_BODY.replace("@DECODE@", _MX_DECODE4 if bits == 4 else _MX_DECODE8).replace(
        "@SCALE@", _MX_SCALE[bits])
    return make_source(dialect, f"dsv4_mxgemv{bits}", ("W", "scales", "x", "inds"), ("y",), body)
