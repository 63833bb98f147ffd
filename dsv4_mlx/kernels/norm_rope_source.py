"""Kernel source of one decode token's query and KV normalisation with RoPE (spec §4.5, §4.4):
one body, three dialects.

One token's query heads [H, C] (after `wq_b`) and its KV latent [C] (after `wkv`) go through
their RMSNorms -- unweighted per query head, `kv_norm`'s weight on the KV -- and then RoPE at the
token's position on the last RD dims (interleaved pairs), in one launch: one threadgroup a row
(H query heads, then the KV). It replaces four (two `mx.fast.rms_norm`, two `mx.fast.rope`) and
follows their numerics: the sum of squares in fp32, ``y = T(x * rsqrt(mean + eps))``, with a
weight ``T(w * y)``; RoPE in fp32 from those rounded values, ``theta = position * inv_freq``,
rounded to T. Only the reduction order differs from MLX's.

The body uses the dialect layer of `indexer_source` and keeps its rules.
"""

from __future__ import annotations

import functools

from .indexer_source import KernelSource, make_source
from .kv_store_source import FP8_ENCODE, row_copy

# RoPE of the pair (d, d + 1) -- fp32 values y0, y1 -- when d is among the last RD of C dims,
# at position L with the pairs' inverse frequencies invf (`mx.fast.rope`'s forward rotation;
# the inverse rotates by the negated angle, as `mx.fast.rope` with negated periods does).
# Shared by this kernel and the decode attention's combining kernel.
_ROPE_PAIR = """if (d >= C - RD) {
  const float theta = L * @SIGN@invf[(d - (C - RD)) / 2];
  const float c = KI_COS(theta);
  const float sn = KI_SIN(theta);
  const float r0 = y0 * c - y1 * sn;
  const float r1 = y0 * sn + y1 * c;
  y0 = r0;
  y1 = r1;
}"""


def rope_pair(indent: int, inverse: bool = False) -> str:
    """`_ROPE_PAIR`, indented, for the forward or the inverse rotation."""
    code = _ROPE_PAIR.replace("@SIGN@", "-" if inverse else "")
    return "\n".join(" " * indent + ln for ln in code.split("\n"))

# Inputs: q [H, C] (XT), kv [C] (XT), wkv [C] (XT), invf [RD / 2] f32 (inverse frequencies of the
# RoPE pairs), pos [1] int32 (the token's position), eps [2] f32 (query norm, KV norm).
# Outputs: qo [H, C] (XT), kvo [C] (XT).
# Template: XT, H, C, RD, PER (values a thread: even, C = PER TG), TG, P2 (the power of two
# >= TG). Grid ((H + 1) TG, 1, 1), groups of TG: group g < H is query head g, group H the KV.
# A thread's PER values are contiguous, so every RoPE pair (2i, 2i + 1) is within one thread.
_BODY = r"""
  const int g = ki_gx;
  const bool isq = g < H;
  KI_SHARED float ki_red[P2];
@SETUP@
  const int d0 = ki_tid * PER;
  float v[PER];
  float ss = 0.0f;
  KI_UNROLL
  for (int u = 0; u < PER; ++u) {
    v[u] = isq ? ki_to_float(q[g * C + d0 + u]) : ki_to_float(kv[d0 + u]);
    ss += v[u] * v[u];
  }
  ki_red[ki_tid] = ss;
  if (ki_tid + TG < P2) ki_red[ki_tid + TG] = 0.0f;
  KI_BARRIER();
  for (int s = P2 / 2; s > 0; s >>= 1) {
    if (ki_tid < s) ki_red[ki_tid] += ki_red[ki_tid + s];
    KI_BARRIER();
  }
  const float nrm = KI_RSQRT(ki_red[0] / (float)C + eps[isq ? 0 : 1]);
  const float L = (float)pos[0];
  KI_UNROLL
  for (int u = 0; u < PER; u += 2) {
    const int d = d0 + u;
    float y0 = ki_to_float(ki_from_float<XT>(v[u] * nrm));
    float y1 = ki_to_float(ki_from_float<XT>(v[u + 1] * nrm));
    if (!isq) {
      y0 = ki_to_float(ki_from_float<XT>(ki_to_float(wkv[d]) * y0));
      y1 = ki_to_float(ki_from_float<XT>(ki_to_float(wkv[d + 1]) * y1));
    }
@ROPE@
    if (isq) {
      qo[g * C + d] = ki_from_float<XT>(y0);
      qo[g * C + d + 1] = ki_from_float<XT>(y1);
    } else {
@KV_WRITE@
    }
  }
@FINISH@
"""

_PLAIN = {"@SETUP@": "", "@FINISH@": "", "@KV_WRITE@": """\
      kvo[d] = ki_from_float<XT>(y0);
      kvo[d + 1] = ki_from_float<XT>(y1);"""}

# The store variant: the KV goes straight into the window ring's slot pos % W in the FP8
# layout (`kv_store_source`: the non-RoPE dims as e4m3 codes with block scales, the RoPE
# dims as they are), from its XT-rounded values as the store kernel encodes them; the ring
# is copied through (MLX kernels write new arrays). Extra inputs: codes [W, NOPE] u8,
# scl [W, NOPE / BLK] u8, rope [W, C - NOPE] (XT); outputs qo, ocodes, oscl, orope (no kvo).
# Extra template: NOPE (even), BLK, W. Grid ((H + W) TG, 1, 1): group H + w is ring slot w --
# a copy of its row, or, for the token's slot, the KV's norm, RoPE and encoding.
_STORE = {"@SETUP@": """\
  constexpr int NB = NOPE / BLK;
  constexpr int R = C - NOPE;
  KI_SHARED float ki_v[NOPE];
  KI_SHARED float ki_amax[NB];
  const int64_t row = isq ? 0 : g - H;
  if (!isq && row != pos[0] % W) {  // (a whole group: no barrier is left waiting)
@ROW_COPY@
    return;
  }""".replace("@ROW_COPY@", row_copy("XT")), "@KV_WRITE@": """\
      const XT k0 = ki_from_float<XT>(y0);
      const XT k1 = ki_from_float<XT>(y1);
      if (d < NOPE) {
        ki_v[d] = ki_to_float(k0);
        ki_v[d + 1] = ki_to_float(k1);
      } else {
        orope[row * R + d - NOPE] = k0;
        orope[row * R + d - NOPE + 1] = k1;
      }""", "@FINISH@": """\
  if (!isq) {
    KI_BARRIER();
@ENCODE@
  }""".replace("@ENCODE@", FP8_ENCODE.strip("\n"))}


def _body(parts: dict) -> str:
    body = _BODY.replace("@ROPE@", rope_pair(4))
    for k, v in parts.items():
        body = body.replace(k, v)
    return body


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def norm_rope_source(dialect: str, store: bool = False) -> KernelSource:
    """The query/KV norm + RoPE kernel (see `_BODY`); ``store``: the variant that writes the
    KV into the FP8 window ring instead of returning it."""
    ins = ("q", "kv", "wkv", "invf", "pos", "eps")
    if store:
        return make_source(dialect, "dsv4_q_norm_rope_kv_store", ins + ("codes", "scl", "rope"),
                           ("qo", "ocodes", "oscl", "orope"), _body(_STORE))
    return make_source(dialect, "dsv4_qkv_norm_rope", ins, ("qo", "kvo"), _body(_PLAIN))
