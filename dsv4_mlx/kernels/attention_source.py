"""Kernel source of the one-query attention with sinks (spec §4.8), reading the stored KV.

One body, three dialects (the ``KI_*`` layer of `indexer_source`): the softmax over the window
ring's slots and the compressed keys (all of them, or the indexer's picks) with the head's
sink in the denominator, K = V, straight from the stored form: FP8 e4m3 codes with
power-of-two scales per block for the non-RoPE dims plus the RoPE dims in the compute dtype
(``fp8`` format), or the plain values (``bf16`` format). Nothing is decoded into device
memory, gathered or concatenated first, and no [heads x keys] score matrix exists.

Flash decoding in two launches. The split kernel: one threadgroup a (split of SPL keys, group
of HG heads, batch row), one warp (simdgroup) a key at a time: each lane holds 4 dims in
every 128 of the group's queries and running outputs in registers, a key's dot products are
summed across the warp, and the lanes update their own dims (online softmax) with no
barrier; the warps' partials are merged in shared memory at the end. It writes the split's
max, sum and unnormalised output. The
combining kernel: one threadgroup a (head, batch row) rescales the splits to a common max,
adds the sink's term exp(sink - M) to the denominator and (optionally) applies the inverse
RoPE of the output at the query position.

Key j of batch row b: j < W is ring slot j (visible iff j < nring); j >= W is compressed
entry e = j - W (dense: every e < n; sparse: entry ``idx[b, e]``, none if negative).
"""

from __future__ import annotations

import functools

from .indexer_source import KernelSource, make_source
from .norm_rope_source import rope_pair

KV_MODES = ("fp8", "plain")

# per mode: the input names of one stored key set (ring prefix "r", compressed prefix "c")
_PARTS = {"fp8": ("n", "s", "r"), "plain": ("k",)}


def _raw_loads(mode: str) -> str:
    """Statements loading, without decoding, what dims d0 .. d0+3 of stored row `sr` of the
    chosen key set (ring or compressed: pointers picked by `ring`) hold into this (u, c)'s raw
    registers, only where `ok` (a key and in range): predicated loads, no branch with math in
    it, so that every load of a round is in flight before the first is used. C, NOPE and BLK
    are multiples of 4, so the four dims share a part and a scale block."""
    zero = "KI_UNROLL for (int i = 0; i < 4; ++i) xr[u][c][i] = ki_from_float<KV>(0.0f);\n"
    if mode == "plain":
        return (zero + "if (ok) {\n"
                "  const int64_t o = sr * C + d0;\n"
                + "".join(f"  xr[u][c][{i}] = (ring ? rk : ck)[o + {i}];\n" for i in range(4))
                + "}\n")
    # FP8 non-RoPE dims: four e4m3 codes in one 32-bit load (lowest address = low byte) and
    # their block's scale byte; RoPE dims as stored
    return ("cw[u][c] = 0u;\nsb[u][c] = 0u;\n" + zero + "if (ok && d0 < NOPE) {\n"
            "  cw[u][c] = KI_LOAD_U32(ring ? rn : cn, (sr * NOPE + d0) / 4);\n"
            "  sb[u][c] = (unsigned int)(ring ? rs : cs)[sr * (NOPE / BLK) + d0 / BLK];\n"
            "}\n"
            "if (ok && d0 >= NOPE) {\n"
            "  const int64_t o = sr * (C - NOPE) + d0 - NOPE;\n"
            + "".join(f"  xr[u][c][{i}] = (ring ? rr : cr)[o + {i}];\n" for i in range(4))
            + "}\n")


def _decode(mode: str) -> str:
    """Statements setting kv[u][4c .. 4c+3] from this (u, c)'s raw registers (0 where not
    `ok`): the FP8 codes x 2^(scale - 127) (exact), the other values converted."""
    conv = "".join(f"kv[u][4 * c + {i}] = ok ? ki_to_float(xr[u][c][{i}]) : 0.0f;\n"
                   for i in range(4))
    if mode == "plain":
        return conv
    return ("if (d0 < NOPE) {\n"
            "  const float sc = ok ? KI_AS_FLOAT(sb[u][c] << 23) : 0.0f;\n"
            + "".join(f"  kv[u][4 * c + {i}] = ki_e4m3((cw[u][c] >> {8 * i}) & 255u) * sc;\n"
                      for i in range(4))
            + "} else {\n" + _indent(conv, 2) + "\n}\n")


_LOADS = """\
KI_UNROLL for (int u = 0; u < KU; ++u) {
  const int jj = (nx * NW + wp) * KU + u;
  r[u] = jj < SPL ? ki_rows[jj] : -1;
}
KI_UNROLL for (int u = 0; u < KU; ++u) {
  KI_UNROLL for (int c = 0; c < NCH; ++c) {
    const int d0 = 128 * c + 4 * lane;
    const int row = r[u];
    const bool ok = d0 < C && row >= 0;
    const bool ring = row < B * W;
    const int64_t sr = ring ? (int64_t)row : (int64_t)(row - B * W);
@RAW@
  }
}
"""

_BODY = """\
  // ---- one-query attention with sinks, split over keys: the partials of one split ----
  // Inputs: q [B, H, C] (QT), ring parts [B, W, ...], compressed parts [B, CAP, ...],
  // idx [B, K] int32 (SPARSE only), meta [2] int32 = (nring, ncomp: the dense entry count
  // or K), fp [1] f32 = softmax scale. (meta is made on the host every step: at 8 bytes it
  // sits in MLX's small-block pool, which a CUDA GPU reads in place; a larger host array
  // migrates its page to the GPU on every use, ~100 us under Nsight Compute.)
  // Outputs: pm, pl [B, H, S] f32 (the split's max logit and sum of exp(logit - pm)),
  // pacc [B, H, S, C] f32 (sum of exp(logit - pm) x value).
  // Template: QT, KV (dtype of the RoPE / plain parts), C, NOPE, BLK (C, NOPE, BLK multiples
  // of 4), W, TG (a multiple of 32: NW = TG / 32 warps), HG (heads a group), SPL (keys a
  // split), KU (keys a warp takes at once), SPARSE, PF (0/1: the next round's loads issued
  // during this round's math).
  // Grid (NG * S * TG, B, 1): group x = split s * NG + head group g, NG = ceil(H / HG).
  // The split's stored rows are found first, in parallel. Then warp w takes keys
  // KU (r NW + w) .. + KU - 1 in round r: their loads all in flight before any math. Lane l
  // holds dims 128 i + 4 l .. + 3 of the group's HG (scaled) queries and of their running
  // outputs: a key's HG dot products are lane partials summed across the warp, and every
  // lane applies the online-softmax update to its own dims. The warps' (max, sum, output)
  // are merged in shared memory at the end.
  constexpr int NW = TG / 32;
  constexpr int NCH = (C + 127) / 128;  // 128-dim chunks: 4 dims a lane each
  constexpr int DPL = 4 * NCH;
  KI_SHARED int ki_rows[SPL];
  KI_SHARED float ki_wm[NW * HG];
  KI_SHARED float ki_wl[NW * HG];
  KI_SHARED float ki_red[HG * C];
  const int B = q_shape[0];
  const int H = q_shape[1];
  const int CAP = @CAPSHAPE@[1];
  const int NG = (H + HG - 1) / HG;
  const int g = ki_gx % NG;
  const int sp = ki_gx / NG;
  const int b = ki_gy;
  const int lane = ki_tid % 32;
  const int wp = ki_tid / 32;
  const int nring = meta[0];
  const int ncomp = meta[1];
  const int L = W + ncomp;
  const int S = (L + SPL - 1) / SPL;
  const int j_lo = sp * SPL;
  // the group's queries first: their loads fly while the split's rows are found
  float qv[HG][DPL];
  float acc[HG][DPL];
  float m[HG];
  float l[HG];
  KI_UNROLL for (int h = 0; h < HG; ++h) {
    const int hh = g * HG + h;
    KI_UNROLL for (int t = 0; t < DPL; ++t) {
      const int d = 128 * (t / 4) + 4 * lane + t % 4;
      qv[h][t] = (hh < H && d < C) ? ki_to_float(q[((int64_t)b * H + hh) * C + d]) * fp[0] : 0.0f;
      acc[h][t] = 0.0f;
    }
    m[h] = KI_NEG_INF;
    l[h] = 0.0f;
  }
  for (int i = ki_tid; i < SPL; i += TG) {
    // stored row of key j: ring rows b * W + slot, compressed rows B * W + b * CAP + entry;
    // -1 = no key
    const int j = j_lo + i;
    int r = -1;
    if (j < L) {
      if (j < W) {
        r = j < nring ? b * W + j : -1;
      } else {
        const int e = SPARSE ? idx[b * ncomp + (j - W)] : j - W;
        r = e >= 0 ? B * W + b * CAP + e : -1;
      }
    }
    ki_rows[i] = r;
  }
  KI_BARRIER();
  constexpr int NT = (SPL + NW * KU - 1) / (NW * KU);  // rounds: the same in every warp
  // A round's loads: its keys' rows into r, then every load of the round (predicated, into raw
  // registers) before any of them is used. Without PF a round issues its own loads first;
  // with PF the next round's go out right after this round's are decoded, and fly while this
  // round's math runs (the raw registers are free again by then).
  int r[KU];
@RAWDECL@
  if (PF) {
    const int nx = 0;
@LOADS@
  }
  for (int it = 0; it < NT; ++it) {
    if (!PF) {
      const int nx = it;
@LOADS@
    }
    float kv[KU][DPL];
    int rcur[KU];  // this round's rows (r may hold the next round's from here on)
    KI_UNROLL for (int u = 0; u < KU; ++u) {
      rcur[u] = r[u];
      KI_UNROLL for (int c = 0; c < NCH; ++c) {
        const int d0 = 128 * c + 4 * lane;
        const bool ok = d0 < C && r[u] >= 0;
@DEC@
      }
    }
    if (PF && it + 1 < NT) {
      const int nx = it + 1;
@LOADS@
    }
    KI_UNROLL for (int u = 0; u < KU; ++u) {
      KI_UNROLL for (int h = 0; h < HG; ++h) {
        float s = 0.0f;
        KI_UNROLL for (int t = 0; t < DPL; ++t) s += qv[h][t] * kv[u][t];
        s = KI_WARP_SUM(s);  // the same bits in every lane: the branches below are warp-uniform
        if (rcur[u] >= 0) {
          if (s > m[h]) {  // a new max: rescale by exp(m - s) (0 for the first key), weight 1
            const float c = KI_EXP(m[h] - s);
            l[h] = l[h] * c + 1.0f;
            KI_UNROLL for (int t = 0; t < DPL; ++t) acc[h][t] = acc[h][t] * c + kv[u][t];
            m[h] = s;
          } else {
            const float p = KI_EXP(s - m[h]);
            l[h] += p;
            KI_UNROLL for (int t = 0; t < DPL; ++t) acc[h][t] += p * kv[u][t];
          }
        }
      }
    }
  }
  // merge the warps: a common max per head, then the rescaled outputs summed warp by warp
  if (lane == 0) {
    KI_UNROLL for (int h = 0; h < HG; ++h) {
      ki_wm[wp * HG + h] = m[h];
      ki_wl[wp * HG + h] = l[h];
    }
  }
  KI_BARRIER();
  float wsc[HG];
  KI_UNROLL for (int h = 0; h < HG; ++h) {
    float M = KI_NEG_INF;
    for (int w = 0; w < NW; ++w) M = ki_wm[w * HG + h] > M ? ki_wm[w * HG + h] : M;
    wsc[h] = m[h] == KI_NEG_INF ? 0.0f : KI_EXP(m[h] - M);
  }
  for (int w = 0; w < NW; ++w) {
    if (wp == w) {
      KI_UNROLL for (int h = 0; h < HG; ++h) {
        KI_UNROLL for (int t = 0; t < DPL; ++t) {
          const int d = 128 * (t / 4) + 4 * lane + t % 4;
          if (d < C) ki_red[h * C + d] = (w == 0 ? 0.0f : ki_red[h * C + d]) + acc[h][t] * wsc[h];
        }
      }
    }
    KI_BARRIER();
  }
  for (int h = 0; h < HG; ++h) {
    const int hh = g * HG + h;
    if (hh < H) {
      const int64_t o = ((int64_t)b * H + hh) * S + sp;
      if (ki_tid == 0) {
        float M = KI_NEG_INF;
        for (int w = 0; w < NW; ++w) M = ki_wm[w * HG + h] > M ? ki_wm[w * HG + h] : M;
        float sum = 0.0f;
        for (int w = 0; w < NW; ++w)
          if (ki_wm[w * HG + h] != KI_NEG_INF) sum += ki_wl[w * HG + h] * KI_EXP(ki_wm[w * HG + h] - M);
        pm[o] = M;
        pl[o] = sum;
      }
      for (int d = ki_tid; d < C; d += TG) pacc[o * C + d] = ki_red[h * C + d];
    }
  }
"""

_COMBINE_BODY = """\
  // ---- one-query attention with sinks: the splits combined, the sink in the denominator ----
  // Inputs: pm, pl [B, H, S] f32, pacc [B, H, S, C] f32, sinks [H] f32, invf [RD / 2] f32,
  // pos [1] int32. Output o [B, H, C] (QT). Template: QT, C, TG, RD. Grid (H * TG, B, 1), one
  // group a (head, batch row). The splits' weights exp(pm - M) are computed once, 64 at a
  // time, into shared memory; each thread then sums its dims over those splits, every load
  // independent of the last. With RD > 0 the output then goes through the inverse RoPE at
  // position pos on its last RD dims (interleaved pairs; the attention's `rope(o, inverse)`,
  // as `mx.fast.rope` computes it from the rounded output: theta = pos x -inv_freq).
  constexpr int NPT = (C + TG - 1) / TG;
  KI_SHARED float ki_w[64];
  KI_SHARED float ki_o[RD > 0 ? C : 1];
  const int H = pm_shape[1];
  const int S = pm_shape[2];
  const int h = ki_gx;
  const int b = ki_gy;
  const int64_t base = ((int64_t)b * H + h) * S;
  const float sink = sinks[h];
  float M = sink;
  for (int s = 0; s < S; ++s) M = pm[base + s] > M ? pm[base + s] : M;
  float l = KI_EXP(sink - M);
  for (int s = 0; s < S; ++s)
    if (pm[base + s] != KI_NEG_INF) l += pl[base + s] * KI_EXP(pm[base + s] - M);
  float a[NPT];
  KI_UNROLL for (int i = 0; i < NPT; ++i) a[i] = 0.0f;
  for (int s0 = 0; s0 < S; s0 += 64) {
    const int ns = S - s0 < 64 ? S - s0 : 64;
    if (ki_tid < ns) {
      const float v = pm[base + s0 + ki_tid];
      ki_w[ki_tid] = v == KI_NEG_INF ? 0.0f : KI_EXP(v - M);
    }
    KI_BARRIER();
    for (int s = 0; s < ns; ++s) {
      const float w = ki_w[s];
      KI_UNROLL for (int i = 0; i < NPT; ++i) {
        const int d = ki_tid + i * TG;
        if (d < C) a[i] += pacc[(base + s0 + s) * C + d] * w;
      }
    }
    KI_BARRIER();
  }
  const int64_t ob = ((int64_t)b * H + h) * C;
  if (RD == 0) {
    KI_UNROLL for (int i = 0; i < NPT; ++i) {
      const int d = ki_tid + i * TG;
      if (d < C) o[ob + d] = ki_from_float<QT>(a[i] / l);
    }
  } else {  // a pair's two dims come from two threads: through shared memory
    KI_UNROLL for (int i = 0; i < NPT; ++i) {
      const int d = ki_tid + i * TG;
      if (d < C) ki_o[d] = ki_to_float(ki_from_float<QT>(a[i] / l));
    }
    KI_BARRIER();
    const float L = (float)pos[0];
    for (int p = ki_tid; p < C / 2; p += TG) {
      const int d = 2 * p;
      float y0 = ki_o[d];
      float y1 = ki_o[d + 1];
@ROPE@
      o[ob + d] = ki_from_float<QT>(y0);
      o[ob + d + 1] = ki_from_float<QT>(y1);
    }
  }
"""


def _indent(code: str, n: int) -> str:
    return "\n".join(" " * n + ln for ln in code.rstrip("\n").split("\n"))


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def decode_source(dialect: str, mode: str) -> KernelSource:
    """The split kernel of the one-query sink attention for a stored-KV `mode`."""
    if mode not in KV_MODES:
        raise ValueError(f"unknown KV mode {mode!r}; expected one of {KV_MODES}")
    parts = _PARTS[mode]
    body = (_BODY.replace("@CAPSHAPE@", "c" + parts[0] + "_shape")
            .replace("@RAWDECL@", ("" if mode == "plain" else
                                   "  unsigned int cw[KU][NCH];\n  unsigned int sb[KU][NCH];\n")
                     + "  KV xr[KU][NCH][4];")
            .replace("@LOADS@", _indent(_LOADS.replace("@RAW@", _indent(_raw_loads(mode), 4)), 6))
            .replace("@DEC@", _indent(_decode(mode), 8)))
    return make_source(dialect, f"dsv4_sink_decode_{mode}",
                       ("q", *("r" + p for p in parts), *("c" + p for p in parts), "idx", "meta", "fp"),
                       ("pm", "pl", "pacc"), body)


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def combine_source(dialect: str) -> KernelSource:
    """The combining kernel: the splits' partials and the sink -> the attention output."""
    return make_source(dialect, "dsv4_sink_decode_combine",
                       ("pm", "pl", "pacc", "sinks", "invf", "pos"), ("o",),
                       _COMBINE_BODY.replace("@ROPE@", rope_pair(6, inverse=True)))
