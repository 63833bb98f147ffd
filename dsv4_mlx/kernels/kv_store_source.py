"""Kernel source of the decode step's KV store (spec §4.13 item 2): one body, three dialects.

One token's KV [C] goes into slot `slot` of the window ring in the FP8 layout: the first NOPE
dims as FP8 e4m3 codes with one power-of-two scale a block of BLK values,
``k = ceil(log2(max(amax, 1e-4) / 448))`` (computed as MLX's ops do: the maximum times the fp32
constant 1/448, the exponent from the bits), the values times 2^-k clipped to +-448 and rounded
to nearest even (subnormals included: bit-identical to ``mx.to_fp8``); the RoPE dims as they
are. MLX kernels write new arrays, so the ring is copied through (one group a slot: the
other slots copy their row, the new slot's group encodes); 75 KB a layer for Flash. One
launch replaces the ops path's encode chain and the three slice updates.

The body uses the dialect layer of `indexer_source` and keeps its rules.
"""

from __future__ import annotations

import functools

import numpy as np

from .indexer_source import KernelSource, make_source


def _f32_bits(x: float) -> str:
    return f"0x{int(np.array([x], np.float32).view(np.uint32)[0]):08x}u"


# The FP8 encoding of NOPE values ki_v (shared memory, filled and past a barrier) into ring
# row `row` of ocodes / oscl (NB = NOPE / BLK block scales, maxima in shared ki_amax[NB]).
# Shared with `norm_rope_source`'s store variant.
FP8_ENCODE = (r"""
    for (int j = ki_tid; j < NB; j += TG) {
      float m = 0.0f;
      for (int i = 0; i < BLK; ++i) {
        const float v = ki_v[j * BLK + i];
        const float a = v < 0.0f ? -v : v;
        m = a > m ? a : m;
      }
      ki_amax[j] = m;
    }
    KI_BARRIER();
    for (int i = ki_tid; i < NOPE; i += TG) {
      const int j = i / BLK;
      const float lo = KI_AS_FLOAT(@MIN_AMAX@);      // fp32(1e-4)
      const float inv = KI_AS_FLOAT(@INV_448@);      // fp32(1 / 448)
      const float t = (ki_amax[j] > lo ? ki_amax[j] : lo) * inv;
      const uint32_t tb = KI_AS_UINT(t);
      const int k = (int)((tb >> 23) & 0xffu) - 127 + ((tb & 0x7fffffu) != 0u ? 1 : 0);
      float y = ki_v[i] * KI_AS_FLOAT((uint32_t)(127 - k) << 23);
      y = y > 448.0f ? 448.0f : (y < -448.0f ? -448.0f : y);
      // e4m3 (bias 7, 3 mantissa bits), round to nearest even
      const uint32_t yb = KI_AS_UINT(y);
      const uint32_t sign = (yb >> 24) & 0x80u;
      const float a = KI_AS_FLOAT(yb & 0x7fffffffu);
      uint32_t code;
      if (a >= 0.015625f) {  // 2^-6: normal
        int e = (int)((yb >> 23) & 0xffu) - 127;
        uint32_t r = (yb >> 20) & 7u;
        const uint32_t rem = yb & 0xfffffu;
        if (rem > 0x80000u || (rem == 0x80000u && (r & 1u) != 0u)) r += 1u;
        if (r == 8u) {
          r = 0u;
          e += 1;
        }
        code = ((uint32_t)(e + 7) << 3) | r;
      } else {  // subnormal: m 2^-9, m = 0..8 (8 is the smallest normal's code)
        const float q = a * 512.0f;
        uint32_t m = (uint32_t)q;
        const float f = q - (float)m;
        if (f > 0.5f || (f == 0.5f && (m & 1u) != 0u)) m += 1u;
        code = m;
      }
      ocodes[row * NOPE + i] = (uint8_t)(sign | code);
      if (i % BLK == 0) oscl[row * NB + j] = (uint8_t)(k + 127);
    }
""".replace("@MIN_AMAX@", _f32_bits(1e-4)).replace("@INV_448@", _f32_bits(1.0 / 448.0)))

# A ring row (codes, scale bytes, RoPE dims of element type @T@) copied through by one
# threadgroup: where the codes and RoPE rows are whole 32-bit words (Flash: 112 + 32 words,
# 7 scale bytes), every load a thread makes is issued before its first store -- one memory
# round trip; byte loops (one round trip an iteration, ~16 in a row) otherwise.
# Needs: row, NOPE, NB, R, TG, codes/scl/rope, ocodes/oscl/orope.
ROW_COPY = """\
    constexpr bool WORDS = NOPE % 4 == 0 && (R * (int)sizeof(@T@)) % 4 == 0 && NB <= TG;
    constexpr int WC = WORDS ? NOPE / 4 : 0;                 // words of codes
    constexpr int WR = WORDS ? R * (int)sizeof(@T@) / 4 : 0; // words of RoPE dims
    constexpr int CW = WORDS ? (WC + WR + TG - 1) / TG : 1;  // words a thread
    if (WORDS) {
      unsigned int cw[CW];
      KI_UNROLL
      for (int j = 0; j < CW; ++j) {
        const int i = ki_tid + j * TG;
        cw[j] = i < WC ? KI_LOAD_U32(codes, row * WC + i)
                       : (i < WC + WR ? KI_LOAD_U32(rope, row * WR + (i - WC)) : 0u);
      }
      const unsigned int sb = ki_tid < NB ? (unsigned int)scl[row * NB + ki_tid] : 0u;
      KI_UNROLL
      for (int j = 0; j < CW; ++j) {
        const int i = ki_tid + j * TG;
        if (i < WC) {
          KI_STORE_U32(ocodes, row * WC + i, cw[j]);
        } else if (i < WC + WR) {
          KI_STORE_U32(orope, row * WR + (i - WC), cw[j]);
        }
      }
      if (ki_tid < NB) oscl[row * NB + ki_tid] = (uint8_t)sb;
    } else {
      for (int i = ki_tid; i < NOPE; i += TG) ocodes[row * NOPE + i] = codes[row * NOPE + i];
      for (int i = ki_tid; i < NB; i += TG) oscl[row * NB + i] = scl[row * NB + i];
      for (int i = ki_tid; i < R; i += TG) orope[row * R + i] = rope[row * R + i];
    }"""


def row_copy(elem_type: str) -> str:
    """`ROW_COPY` for RoPE dims of template type `elem_type` (e.g. "KT")."""
    return ROW_COPY.replace("@T@", elem_type)


# Inputs: kv [B, C] (KT), codes [B, W, NOPE] u8, scl [B, W, NOPE / BLK] u8, rope [B, W, C - NOPE]
# (KT), slot [1] int32. Outputs: ocodes, oscl, orope (the new ring, same shapes).
# Template: KT, C, NOPE, BLK, W, TG. Grid (W * TG, B, 1), groups of TG.
_STORE_BODY = r"""
  constexpr int NB = NOPE / BLK;
  constexpr int R = C - NOPE;
  KI_SHARED float ki_v[NOPE];
  KI_SHARED float ki_amax[NB];
  const int w = ki_gx;
  const int b = ki_gy;
  const int64_t row = (int64_t)b * W + w;
  if (w != slot[0]) {
@ROW_COPY@
  } else {
    // the values into shared memory in one coalesced pass, then the block maxima from there
    // (a loop of BLK global loads in one thread would serialise their latency)
    for (int i = ki_tid; i < NOPE; i += TG) ki_v[i] = ki_to_float(kv[b * C + i]);
    KI_BARRIER();
@ENCODE@
    for (int i = ki_tid; i < R; i += TG) orope[row * R + i] = kv[b * C + NOPE + i];
  }
""".replace("@ENCODE@", FP8_ENCODE.strip("\n")).replace("@ROW_COPY@", row_copy("KT"))


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def store_source(dialect: str) -> KernelSource:
    """The FP8 ring store kernel (see `_STORE_BODY`)."""
    return make_source(dialect, "dsv4_kv_store_fp8", ("kv", "codes", "scl", "rope", "slot"),
                       ("ocodes", "oscl", "orope"), _STORE_BODY)
