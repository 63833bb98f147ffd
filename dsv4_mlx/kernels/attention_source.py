"""Kernel source of the one-query attention with sinks (spec §4.8), reading the stored KV.

One body, three dialects (the ``KI_*`` layer of `indexer_source`): the softmax over the window
ring's slots and the compressed keys (all of them, or the indexer's picks) with the head's
sink in the denominator, K = V, straight from the stored form: FP8 e4m3 codes with
power-of-two scales per block for the non-RoPE dims plus the RoPE dims in the compute dtype
(``fp8`` format), or the plain values (``bf16`` format). Nothing is decoded into device
memory, gathered or concatenated first, and no [heads x keys] score matrix exists.

Flash decoding in two launches. The split kernel: one threadgroup a (split of SPL keys, group
of HG heads, batch row); the keys go through in tiles of KT, each decoded once into shared
memory for the group's heads; PT = TG / (HG KT) threads share one (head, key) dot product;
one thread a head updates the running max / sum (online softmax); every thread then updates
its output dims of every head. It writes the split's max, sum and unnormalised output. The
combining kernel: one threadgroup a (head, batch row) rescales the splits to a common max
and adds the sink's term exp(sink - M) to the denominator.

Key j of batch row b: j < W is ring slot j (visible iff j < nring); j >= W is compressed
entry e = j - W (dense: every e < n; sparse: entry ``idx[b, e]``, none if negative).
"""

from __future__ import annotations

from .indexer_source import KernelSource, make_source

KV_MODES = ("fp8", "plain")

# per mode: the input names of one stored key set (ring prefix "r", compressed prefix "c")
_PARTS = {"fp8": ("n", "s", "r"), "plain": ("k",)}


def _val(mode: str, src: str, row: str, d: str) -> str:
    """The fp32 value of dim `d` of stored row `row` (batch offset included) of key set `src`."""
    if mode == "plain":
        return f"ki_to_float({src}k[(int64_t)({row}) * C + ({d})])"
    # FP8 non-RoPE dims: e4m3 code x 2^(scale - 127) (exact); RoPE dims as stored
    return (f"(({d}) < NOPE ? ki_e4m3((unsigned int){src}n[(int64_t)({row}) * NOPE + ({d})]) * "
            f"KI_AS_FLOAT(((unsigned int){src}s[(int64_t)({row}) * (NOPE / BLK) + ({d}) / BLK]) << 23)"
            f" : ki_to_float({src}r[(int64_t)({row}) * (C - NOPE) + ({d}) - NOPE]))")


_BODY = """\
  // ---- one-query attention with sinks, split over keys: the partials of one split ----
  // Inputs: q [B, H, C] (QT), ring parts [B, W, ...], compressed parts [B, CAP, ...],
  // idx [B, K] int32 (SPARSE only), meta [4] int32 = (nring, ncomp: the dense entry count
  // or K, SPL: keys a split, S: splits), fp [1] f32 = softmax scale.
  // Outputs: pm, pl [B, H, S] f32 (the split's max logit and sum of exp(logit - pm)),
  // pacc [B, H, S, C] f32 (sum of exp(logit - pm) x value).
  // Template: QT, KV (dtype of the RoPE / plain parts), C, NOPE, BLK, W, TG, HG (heads a
  // group), KT (keys a tile), SPARSE; TG a multiple of HG x KT.
  // Grid (NG * S * TG, B, 1): group x = split s * NG + head group g, NG = ceil(H / HG).
  constexpr int NPT = (C + TG - 1) / TG;
  constexpr int PT = TG / (HG * KT);
  constexpr int CP = C + 8;  // padded row stride: the rows of one warp's reads in other banks
  KI_SHARED float ki_q[HG * CP];
  KI_SHARED float ki_k[KT * CP];
  KI_SHARED float ki_part[TG];
  KI_SHARED float ki_p[HG * KT];
  KI_SHARED float ki_ml[3 * HG];  // running max, running sum, this tile's rescale; per head
  KI_SHARED int ki_row[KT];
  const int B = q_shape[0];
  const int H = q_shape[1];
  const int CAP = @CAPSHAPE@[1];
  const int NG = (H + HG - 1) / HG;
  const int g = ki_gx % NG;
  const int sp = ki_gx / NG;
  const int b = ki_gy;
  const int nring = meta[0];
  const int ncomp = meta[1];
  const int SPL = meta[2];
  const int S = meta[3];
  const int L = W + ncomp;
  const int j_lo = sp * SPL;
  const int j_hi = j_lo + SPL < L ? j_lo + SPL : L;
  for (int i = ki_tid; i < HG * C; i += TG) {
    const int hh = g * HG + i / C;
    ki_q[(i / C) * CP + i % C] = hh < H ? ki_to_float(q[((int64_t)b * H + hh) * C + i % C]) * fp[0] : 0.0f;
  }
  if (ki_tid < HG) {
    ki_ml[ki_tid] = KI_NEG_INF;
    ki_ml[HG + ki_tid] = 0.0f;
  }
  float acc[HG][NPT];
  for (int h = 0; h < HG; ++h)
    for (int i = 0; i < NPT; ++i) acc[h][i] = 0.0f;
  for (int j0 = j_lo; j0 < j_hi; j0 += KT) {
    if (ki_tid < KT) {
      // stored row of key j0 + tid: ring rows b * W + slot, compressed rows
      // B * W + b * CAP + entry; -1 = no key
      const int j = j0 + ki_tid;
      int r = -1;
      if (j < j_hi) {
        if (j < W) {
          r = j < nring ? b * W + j : -1;
        } else {
          const int e = SPARSE ? idx[b * ncomp + (j - W)] : j - W;
          r = e >= 0 ? B * W + b * CAP + e : -1;
        }
      }
      ki_row[ki_tid] = r;
    }
    KI_BARRIER();
    // the tile's keys, decoded once for all HG heads
    for (int i = ki_tid; i < KT * C; i += TG) {
      const int d = i % C;
      const int r = ki_row[i / C];
      float v = 0.0f;
      if (r >= 0 && r < B * W) {
        v = @RVAL@;
      } else if (r >= 0) {
        const int rc = r - B * W;
        v = @CVAL@;
      }
      ki_k[(i / C) * CP + d] = v;
    }
    KI_BARRIER();
    {
      // PT threads share one (head, key) dot product, every PT-th dim each
      const int pair = ki_tid / PT;
      const int hh = pair / KT;
      const int jj = pair % KT;
      float dot = 0.0f;
      for (int d = ki_tid % PT; d < C; d += PT) dot += ki_q[hh * CP + d] * ki_k[jj * CP + d];
      ki_part[ki_tid] = dot;
    }
    KI_BARRIER();
    if (ki_tid < HG * KT) {
      float lg = 0.0f;
      for (int i = 0; i < PT; ++i) lg += ki_part[ki_tid * PT + i];
      ki_p[ki_tid] = ki_row[ki_tid % KT] >= 0 ? lg : KI_NEG_INF;
    }
    KI_BARRIER();
    if (ki_tid < HG) {
      // online softmax of head ki_tid over the tile: new max, rescale, weights
      const float m_old = ki_ml[ki_tid];
      float tm = m_old;
      for (int jj = 0; jj < KT; ++jj) tm = ki_p[ki_tid * KT + jj] > tm ? ki_p[ki_tid * KT + jj] : tm;
      const float corr = tm == KI_NEG_INF ? 1.0f : KI_EXP(m_old - tm);
      float l = ki_ml[HG + ki_tid] * corr;
      for (int jj = 0; jj < KT; ++jj) {
        const float lg = ki_p[ki_tid * KT + jj];
        const float p = lg == KI_NEG_INF ? 0.0f : KI_EXP(lg - tm);
        ki_p[ki_tid * KT + jj] = p;
        l += p;
      }
      ki_ml[ki_tid] = tm;
      ki_ml[HG + ki_tid] = l;
      ki_ml[2 * HG + ki_tid] = corr;
    }
    KI_BARRIER();
    for (int h = 0; h < HG; ++h) {
      const float corr = ki_ml[2 * HG + h];
      for (int i = 0; i < NPT; ++i) {
        const int d = ki_tid + i * TG;
        if (d < C) {
          float a = acc[h][i] * corr;
          for (int jj = 0; jj < KT; ++jj) a += ki_p[h * KT + jj] * ki_k[jj * CP + d];
          acc[h][i] = a;
        }
      }
    }
    KI_BARRIER();  // the tile's rows, keys and weights are rewritten next
  }
  KI_BARRIER();  // a split without keys: the initial max and sum, written above
  for (int h = 0; h < HG; ++h) {
    const int hh = g * HG + h;
    if (hh < H) {
      const int64_t o = ((int64_t)b * H + hh) * S + sp;
      if (ki_tid == 0) {
        pm[o] = ki_ml[h];
        pl[o] = ki_ml[HG + h];
      }
      for (int i = 0; i < NPT; ++i) {
        const int d = ki_tid + i * TG;
        if (d < C) pacc[o * C + d] = acc[h][i];
      }
    }
  }
"""

_COMBINE_BODY = """\
  // ---- one-query attention with sinks: the splits combined, the sink in the denominator ----
  // Inputs: pm, pl [B, H, S] f32, pacc [B, H, S, C] f32, sinks [H] f32. Output o [B, H, C]
  // (QT). Template: QT, C, TG. Grid (H * TG, B, 1), one group a (head, batch row).
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
  for (int d = ki_tid; d < C; d += TG) {
    float a = 0.0f;
    for (int s = 0; s < S; ++s)
      if (pm[base + s] != KI_NEG_INF) a += pacc[(base + s) * C + d] * KI_EXP(pm[base + s] - M);
    o[((int64_t)b * H + h) * C + d] = ki_from_float<QT>(a / l);
  }
"""


def decode_source(dialect: str, mode: str) -> KernelSource:
    """The split kernel of the one-query sink attention for a stored-KV `mode`."""
    if mode not in KV_MODES:
        raise ValueError(f"unknown KV mode {mode!r}; expected one of {KV_MODES}")
    parts = _PARTS[mode]
    body = (_BODY.replace("@CAPSHAPE@", "c" + parts[0] + "_shape")
            .replace("@RVAL@", _val(mode, "r", "r", "d"))
            .replace("@CVAL@", _val(mode, "c", "rc", "d")))
    return make_source(dialect, f"dsv4_sink_decode_{mode}",
                       ("q", *("r" + p for p in parts), *("c" + p for p in parts), "idx", "meta", "fp"),
                       ("pm", "pl", "pacc"), body)


def combine_source(dialect: str) -> KernelSource:
    """The combining kernel: the splits' partials and the sink -> the attention output."""
    return make_source(dialect, "dsv4_sink_decode_combine", ("pm", "pl", "pacc", "sinks"), ("o",),
                       _COMBINE_BODY)
