"""Kernel source of the fused mHC steps (spec §4.2, §4.3): one body, three dialects.

The bodies use the dialect layer of `indexer_source` (the ``KI_*`` macros, ``ki_tid`` and
``ki_gx/gy/gz``, Metal / CUDA / C++ emulation) and keep its rules: inputs indexed directly,
barriers reached by every thread of a group, sizes that shape the code as template constants.

* ``hc_pre``: one threadgroup a token. The sum of squares of the flattened streams (the
  RMSNorm_0 of §4.3), the mixing parameters from the projected logits, the Sinkhorn
  normalisation of `comb`, and the collapse ``h = sum_j pre_j X_j``, in one launch. The
  projection itself (``flatten(X) . fn^T``, 24 outputs of n*D inputs a token) stays an MLX
  matmul: it reads `fn` once spread over the whole GPU, where one group a token would read it
  from a single core.
* ``hc_post``: one thread a (token, feature): ``X'_k = post_k F + sum_j comb[j, k] X_j``;
  after the MoE, F is first combined from the expert outputs (the MoE's last step).
"""

from __future__ import annotations

import functools

from .indexer_source import KernelSource, make_source

# Inputs (row-contiguous, indexed flat; N = batch x tokens): X [N, NS, D] (XT),
# mixraw [N, M] f32 (= flatten(X) . fn^T, M = (2 + NS) NS), scale [3] f32, base [M] f32,
# eps [3] f32 (hc_eps, norm_eps, the output norm's eps), wn [D] (XT; read with NORM).
# Outputs: h [N, D] (XT), post [N, NS] f32, comb [N, NS, NS] f32 (row j = source stream j).
# With HEAD (the final head collapse, spec §4.3 last paragraph) M = NS, scale [1], and only h
# is written: pre = sigmoid(mix scale[0] + base) + eps, no post, no Sinkhorn.
# With NORM, h is the collapse through the RMSNorm that follows it in the block (attn_norm,
# ffn_norm; the model's final norm after HEAD), as `mx.fast.rms_norm` computes it: the sum of
# squares of the collapse rounded to XT, y = XT(h * rsqrt(mean + eps)), h' = XT(wn * y).
# Template: XT, NS, D, ITERS, TG (a power of two), HEAD, NORM, SINK, REG. Grid (N * TG, 1, 1),
# groups of TG. SINK: who runs the Sinkhorn (2: every warp, one matrix element a lane; 1: warp
# 0 alone, the same way; 0: thread 0 alone, a loop over rows then columns); REG: a thread's
# values held in registers where they fit (KEEP below) or always read twice. Every choice gives
# the same bits (the same operations in the same order); they differ only in speed.
_PRE_BODY = r"""
  constexpr int M = HEAD ? NS : (2 + NS) * NS;
  const int t = ki_gx;
  KI_SHARED float ki_red[TG];
  KI_SHARED float ki_pre[NS];
  const int xbase = t * NS * D;
  // One token is one group, so nothing else hides the memory latency: with KEEP (D a
  // multiple of TG, at most 64 values a thread) a thread loads all its values at once into
  // registers, xv[u] = X[j, d] for flat index ki_tid + u TG (stream j = u / (D / TG),
  // feature d = ki_tid + (u % (D / TG)) TG), which are also the values its collapse below
  // needs; otherwise four loads in flight, and the collapse reads X again. Either way value
  // u of a thread goes to partial sum u % 4.
  constexpr int PER = (NS * D + TG - 1) / TG;
  constexpr bool KEEP = REG && D % TG == 0 && PER <= 64;
  float xv[PER];  // (unused, so never allocated, without KEEP)
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  if (KEEP) {
    KI_UNROLL
    for (int u = 0; u < PER; ++u) xv[u] = ki_to_float(X[xbase + ki_tid + u * TG]);
    KI_UNROLL
    for (int u = 0; u < PER; ++u) {
      const float sq = xv[u] * xv[u];
      if (u % 4 == 0) s0 += sq;
      else if (u % 4 == 1) s1 += sq;
      else if (u % 4 == 2) s2 += sq;
      else s3 += sq;
    }
  } else {
    int i = ki_tid;
    for (; i + 3 * TG < NS * D; i += 4 * TG) {
      const float v0 = ki_to_float(X[xbase + i]);
      const float v1 = ki_to_float(X[xbase + i + TG]);
      const float v2 = ki_to_float(X[xbase + i + 2 * TG]);
      const float v3 = ki_to_float(X[xbase + i + 3 * TG]);
      s0 += v0 * v0;
      s1 += v1 * v1;
      s2 += v2 * v2;
      s3 += v3 * v3;
    }
    for (; i < NS * D; i += TG) {
      const float v = ki_to_float(X[xbase + i]);
      s0 += v * v;
    }
  }
  ki_red[ki_tid] = (s0 + s1) + (s2 + s3);
  KI_BARRIER();
  for (int s = TG / 2; s > 0; s >>= 1) {
    if (ki_tid < s) ki_red[ki_tid] += ki_red[ki_tid + s];
    KI_BARRIER();
  }
  // The parameters: pre and post one thread an output; the Sinkhorn's NS x NS matrix
  // (NS * NS <= 32) one element a lane, in every warp at once (each computes the whole
  // matrix; warp 0 writes it), rows and columns summed through lane shuffles: no group
  // barrier. Every value is computed with the operations, in the order, of a single-thread
  // loop over rows then columns (each sum from its first term to its last): the same bits as
  // the one-thread version this replaced (checked in the C++ emulation), whose serial
  // Sinkhorn (20 rounds of NS x NS fp32 divisions in one dependent stream) was a long pole.
  const float rs = KI_RSQRT(ki_red[0] / (float)(NS * D) + eps[1]);
  const float hc_eps = eps[0];
  for (int j = ki_tid; j < NS; j += TG) {
    const float a = mixraw[t * M + j] * rs * scale[0] + base[j];
    ki_pre[j] = 1.0f / (1.0f + KI_EXP(-a)) + hc_eps;
    if (!HEAD) {
      const float b = mixraw[t * M + NS + j] * rs * scale[1] + base[NS + j];
      post[t * NS + j] = 2.0f / (1.0f + KI_EXP(-b));
    }
  }
  static_assert(HEAD || SINK == 0 || NS * NS <= 32, "the Sinkhorn matrix is held in one warp's lanes");
  static_assert(HEAD || SINK == 0 || TG % 32 == 0, "every lane of a warp takes part in the shuffles");
  if (!HEAD && SINK == 0 && ki_tid == 0) {
    float c[NS][NS];
    for (int j = 0; j < NS; ++j) {  // row softmax (max-subtracted) + eps
      float mx = KI_NEG_INF;
      for (int k = 0; k < NS; ++k) {
        const int i = 2 * NS + j * NS + k;
        c[j][k] = mixraw[t * M + i] * rs * scale[2] + base[i];
        mx = c[j][k] > mx ? c[j][k] : mx;
      }
      float sum = 0.0f;
      for (int k = 0; k < NS; ++k) {
        c[j][k] = KI_EXP(c[j][k] - mx);
        sum += c[j][k];
      }
      for (int k = 0; k < NS; ++k) c[j][k] = c[j][k] / sum + hc_eps;
    }
    for (int it = 0; it < ITERS; ++it) {
      if (it > 0) {  // rows (the first round has only the column normalisation)
        for (int j = 0; j < NS; ++j) {
          float sum = 0.0f;
          for (int k = 0; k < NS; ++k) sum += c[j][k];
          for (int k = 0; k < NS; ++k) c[j][k] = c[j][k] / (sum + hc_eps);
        }
      }
      for (int k = 0; k < NS; ++k) {
        float sum = 0.0f;
        for (int j = 0; j < NS; ++j) sum += c[j][k];
        for (int j = 0; j < NS; ++j) c[j][k] = c[j][k] / (sum + hc_eps);
      }
    }
    for (int j = 0; j < NS; ++j)
      for (int k = 0; k < NS; ++k) comb[(t * NS + j) * NS + k] = c[j][k];
  }
  if (!HEAD && SINK > 0 && (SINK == 2 || ki_tid < 32)) {
    const int lane = ki_tid % 32;
    const int e = lane < NS * NS ? lane : 0;  // (lanes past the matrix repeat element 0)
    const int j = e / NS;
    const int k = e % NS;
    float cr[NS];  // row j: softmax (max-subtracted) + eps
    float mx = KI_NEG_INF;
    for (int m = 0; m < NS; ++m) {
      const int i = 2 * NS + j * NS + m;
      cr[m] = mixraw[t * M + i] * rs * scale[2] + base[i];
      mx = cr[m] > mx ? cr[m] : mx;
    }
    float sum = 0.0f;
    for (int m = 0; m < NS; ++m) {
      cr[m] = KI_EXP(cr[m] - mx);
      sum += cr[m];
    }
    float c = cr[k] / sum + hc_eps;
    for (int it = 0; it < ITERS; ++it) {
      if (it > 0) {  // rows (the first round has only the column normalisation)
        float rsum = 0.0f;
        for (int m = 0; m < NS; ++m) rsum += KI_SHFL(c, j * NS + m);
        c = c / (rsum + hc_eps);
      }
      float csum = 0.0f;
      for (int m = 0; m < NS; ++m) csum += KI_SHFL(c, m * NS + k);
      c = c / (csum + hc_eps);
    }
    if (ki_tid < NS * NS) comb[t * NS * NS + ki_tid] = c;
  }
  KI_BARRIER();
  // The collapse. With NORM its rounded values are kept for the norm: in registers (KEEP),
  // or written to h and read back below by the same thread.
  constexpr int DT = KEEP ? D / TG : 1;
  float hv[DT];  // (unused, so never allocated, without KEEP and NORM)
  float hs = 0.0f;
  if (KEEP) {
    KI_UNROLL
    for (int m = 0; m < DT; ++m) {
      float acc = 0.0f;
      for (int j = 0; j < NS; ++j) acc += ki_pre[j] * xv[j * DT + m];
      if (NORM) {
        hv[m] = ki_to_float(ki_from_float<XT>(acc));
        hs += hv[m] * hv[m];
      } else {
        h[t * D + ki_tid + m * TG] = ki_from_float<XT>(acc);
      }
    }
  } else {
    for (int d = ki_tid; d < D; d += TG) {
      float acc = 0.0f;
      for (int j = 0; j < NS; ++j) acc += ki_pre[j] * ki_to_float(X[xbase + j * D + d]);
      const XT q = ki_from_float<XT>(acc);
      h[t * D + d] = q;
      const float v = ki_to_float(q);
      hs += v * v;
    }
  }
  if (NORM) {  // (ki_red's last reader, thread 0, passed the barrier above)
    ki_red[ki_tid] = hs;
    KI_BARRIER();
    for (int s = TG / 2; s > 0; s >>= 1) {
      if (ki_tid < s) ki_red[ki_tid] += ki_red[ki_tid + s];
      KI_BARRIER();
    }
    const float nrm = KI_RSQRT(ki_red[0] / (float)D + eps[2]);
    if (KEEP) {
      KI_UNROLL
      for (int m = 0; m < DT; ++m) {
        const int d = ki_tid + m * TG;
        const float y = ki_to_float(ki_from_float<XT>(hv[m] * nrm));
        h[t * D + d] = ki_from_float<XT>(ki_to_float(wn[d]) * y);
      }
    } else {
      for (int d = ki_tid; d < D; d += TG) {
        const float y = ki_to_float(ki_from_float<XT>(ki_to_float(h[t * D + d]) * nrm));
        h[t * D + d] = ki_from_float<XT>(ki_to_float(wn[d]) * y);
      }
    }
  }
"""

# Inputs: X [N, NS, D] (XT), F [N, D] (FT), post [N, NS] f32, comb [N, NS, NS] f32,
# R [N, KR, D] (RT; read when KR > 0).
# Output: Y [N, NS, D] (XT). Template: XT, FT, RT, KR, NS, D, TG. Grid (ceil(D / TG) * TG, N, 1).
# With KR > 0 the block's output is the MoE's: F is the shared expert's output and R the KR
# routed experts' (weighted) outputs, combined as the MoE does (fp32 sum of the routed
# outputs, plus the shared one, rounded to XT) before the expansion.
_POST_BODY = r"""
  const int t = ki_gy;
  const int d = ki_gx * TG + ki_tid;
  if (d < D) {
    float f = ki_to_float(F[t * D + d]);
    if (KR > 0) {
      float acc = 0.0f;
      for (int j = 0; j < KR; ++j) acc += ki_to_float(R[(t * KR + j) * D + d]);
      f = ki_to_float(ki_from_float<XT>(acc + f));
    }
    float x[NS];
    for (int j = 0; j < NS; ++j) x[j] = ki_to_float(X[(t * NS + j) * D + d]);
    for (int k = 0; k < NS; ++k) {
      float m = 0.0f;
      for (int j = 0; j < NS; ++j) m += comb[(t * NS + j) * NS + k] * x[j];
      Y[(t * NS + k) * D + d] = ki_from_float<XT>(post[t * NS + k] * f + m);
    }
  }
"""


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def pre_source(dialect: str) -> KernelSource:
    """hc_pre kernel (see `_PRE_BODY`)."""
    return make_source(dialect, "dsv4_mhc_pre", ("X", "mixraw", "scale", "base", "eps", "wn"),
                       ("h", "post", "comb"), _PRE_BODY)


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def post_source(dialect: str) -> KernelSource:
    """hc_post kernel (see `_POST_BODY`)."""
    return make_source(dialect, "dsv4_mhc_post", ("X", "F", "post", "comb", "R"), ("Y",), _POST_BODY)
