"""Kernel source of the MoE router (spec §4.10): one body, three dialects.

One threadgroup a token, after the router logits ``x . gate^T`` (an MLX matmul, which reads the
gate weight spread over the whole GPU). The body computes the scores
``s = sqrt(softplus(logits))`` (softplus as MLX's ``logaddexp(l, 0)``), picks the top-k of
``s + bias`` for learned layers (k rounds of a parallel arg-max; ties go to the lower expert) or
takes the hash layer's experts, and writes the picks as uint32 (what `gather_qmm` indexes with)
and their unbiased scores normalised to sum 1 times the routed scaling factor. It replaces the
eight launches of the ops path (scores, bias, negate, argpartition, cast, gather, sum, divide).

The body uses the dialect layer of `indexer_source` and keeps its rules.
"""

from __future__ import annotations

import functools

from .indexer_source import KernelSource, make_source

# Inputs: logits [N, E] f32, bias [E] f32 (read when !HASH), hidx [N, K] int32 (read when
# HASH; with ROWS the whole table [V, K], token t taking row ids[t]), scale [1] f32,
# ids [N] int32 (read with ROWS). Outputs: idx [N, K] uint32, w [N, K] f32.
# Template: E, K, TG (a power of two), HASH, ROWS. Grid (N * TG, 1, 1), groups of TG.
_ROUTE_BODY = r"""
  const int t = ki_gx;
  KI_SHARED float ki_s[E];
  KI_SHARED float ki_b[E];
  KI_SHARED int ki_used[E];
  KI_SHARED float ki_rv[TG];
  KI_SHARED int ki_ri[TG];
  KI_SHARED int ki_pick[K];
  for (int e = ki_tid; e < E; e += TG) {
    const float l = logits[t * E + e];
    // softplus(l) = logaddexp(l, 0) = max + log1p(exp(min - max))
    const float hi = l > 0.0f ? l : 0.0f;
    const float lo = l > 0.0f ? 0.0f : l;
    const float sp = hi == KI_AS_FLOAT(0x7f800000u) ? hi : hi + KI_LOG1P(KI_EXP(lo - hi));
    const float s = KI_SQRT(sp);
    ki_s[e] = s;
    ki_b[e] = HASH ? s : s + bias[e];
    ki_used[e] = 0;
  }
  KI_BARRIER();
  if (HASH) {
    if (ki_tid < K) ki_pick[ki_tid] = hidx[(ROWS ? (int64_t)ids[t] : (int64_t)t) * K + ki_tid];
  } else {
    for (int j = 0; j < K; ++j) {
      // arg-max of the unpicked experts; ties (and NaN) go to the lower expert
      float bv = 0.0f;
      int bi = -1;
      for (int e = ki_tid; e < E; e += TG) {
        if (ki_used[e] == 0 && (bi < 0 || ki_b[e] > bv)) {
          bv = ki_b[e];
          bi = e;
        }
      }
      ki_rv[ki_tid] = bv;
      ki_ri[ki_tid] = bi;
      KI_BARRIER();
      for (int s = TG / 2; s > 0; s >>= 1) {
        if (ki_tid < s) {
          const float ov = ki_rv[ki_tid + s];
          const int oi = ki_ri[ki_tid + s];
          const int mi = ki_ri[ki_tid];
          if (oi >= 0 && (mi < 0 || ov > ki_rv[ki_tid] || (ov == ki_rv[ki_tid] && oi < mi))) {
            ki_rv[ki_tid] = ov;
            ki_ri[ki_tid] = oi;
          }
        }
        KI_BARRIER();
      }
      if (ki_tid == 0) {
        ki_pick[j] = ki_ri[0];
        ki_used[ki_ri[0]] = 1;
      }
      KI_BARRIER();
    }
  }
  KI_BARRIER();
  if (ki_tid == 0) {
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) sum += ki_s[ki_pick[j]];
    for (int j = 0; j < K; ++j) {
      const int e = ki_pick[j];
      idx[t * K + j] = (uint32_t)e;
      w[t * K + j] = ki_s[e] / sum * scale[0];
    }
  }
"""


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def route_source(dialect: str) -> KernelSource:
    """The router kernel (see `_ROUTE_BODY`)."""
    return make_source(dialect, "dsv4_moe_route", ("logits", "bias", "hidx", "scale", "ids"),
                       ("idx", "w"), _ROUTE_BODY)
