"""Kernel source of the one-query attention with sinks (spec §4.8), reading the stored KV.

One body, three dialects (the ``KI_*`` layer of `indexer_source`). One threadgroup computes
one (head, batch row): the softmax over the window ring's slots and the compressed keys (all
of them, or the indexer's picks) with the head's sink in the denominator, K = V, straight
from the stored form: FP8 e4m3 codes with power-of-two scales per block for the non-RoPE
dims plus the RoPE dims in the compute dtype (``fp8`` format), or the plain values (``bf16``
format). Nothing is decoded into a buffer, gathered or concatenated first, and no
[heads x keys] score matrix exists.

Keys are taken in tiles of KT = TG / 4: four threads share one key's dot product (a quarter
of the dims each), the tile's logits go to shared memory, and then every thread updates the
running max / sum and its own output dims (C / TG of them) with the tile: a flash-decoding
online softmax, started from the sink (m = sink, l = 1, acc = 0).

Key j of batch row b: j < W is ring slot j (visible iff j < nring); j >= W is compressed
entry e = j - W (dense: every e < n; sparse: entry ``idx[b, e]``, none if negative).
"""

from __future__ import annotations

from .indexer_source import _PROLOGUES, KernelSource, _header

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
  // ---- one-query attention with sinks over the stored window ring + compressed keys ----
  // Inputs: q [B, H, C] (QT), ring parts [B, W, ...], compressed parts [B, CAP, ...],
  // idx [B, K] int32 (SPARSE only), sinks [H] f32, meta [2] int32 = (nring, ncomp: the
  // dense entry count or K), fp [1] f32 = softmax scale. Output o [B, H, C] (QT).
  // Template: QT, KV (dtype of the RoPE / plain parts), C, NOPE, BLK, W, TG, SPARSE.
  // Grid (H * TG, B, 1), threadgroups of TG (a multiple of 4, TG / 4 <= C).
  constexpr int KT = TG / 4;
  constexpr int DS = (C + 3) / 4;
  constexpr int NPT = (C + TG - 1) / TG;
  KI_SHARED float ki_q[C];
  KI_SHARED float ki_part[TG];
  KI_SHARED float ki_w[KT];
  KI_SHARED int ki_row[KT];
  const int H = q_shape[1];
  const int CAP = @CAPSHAPE@[1];
  const int h = ki_gx;
  const int b = ki_gy;
  const int nring = meta[0];
  const int ncomp = meta[1];
  const int L = W + ncomp;
  const int64_t qo = ((int64_t)b * H + h) * C;
  for (int d = ki_tid; d < C; d += TG) ki_q[d] = ki_to_float(q[qo + d]) * fp[0];
  float m = sinks[h];  // running max, from the sink's logit
  float l = 1.0f;      // running sum of exp(logit - m): the sink's term
  float acc[NPT];
  for (int i = 0; i < NPT; ++i) acc[i] = 0.0f;
  for (int j0 = 0; j0 < L; j0 += KT) {
    if (ki_tid < KT) {
      // stored row of key j0 + tid: ring rows b * W + slot, compressed rows
      // B * W + b * CAP + entry; -1 = no key
      const int j = j0 + ki_tid;
      int r = -1;
      if (j < W) {
        r = j < nring ? b * W + j : -1;
      } else if (j < L) {
        const int e = SPARSE ? idx[b * ncomp + (j - W)] : j - W;
        r = e >= 0 ? q_shape[0] * W + b * CAP + e : -1;
      }
      ki_row[ki_tid] = r;
    }
    KI_BARRIER();
    {
      // a quarter of one key's dot product
      const int jj = ki_tid % KT;
      const int s0 = (ki_tid / KT) * DS;
      const int s1 = s0 + DS < C ? s0 + DS : C;
      const int r = ki_row[jj];
      float dot = 0.0f;
      if (r >= 0 && r < q_shape[0] * W) {
        for (int d = s0; d < s1; ++d) dot += ki_q[d] * @RVAL_DOT@;
      } else if (r >= 0) {
        const int rc = r - q_shape[0] * W;
        for (int d = s0; d < s1; ++d) dot += ki_q[d] * @CVAL_DOT@;
      }
      ki_part[ki_tid] = dot;
    }
    KI_BARRIER();
    if (ki_tid < KT) {
      const float lg = (ki_part[ki_tid] + ki_part[KT + ki_tid]) +
                       (ki_part[2 * KT + ki_tid] + ki_part[3 * KT + ki_tid]);
      ki_w[ki_tid] = ki_row[ki_tid] >= 0 ? lg : KI_NEG_INF;
    }
    KI_BARRIER();
    float tm = m;
    for (int jj = 0; jj < KT; ++jj) tm = ki_w[jj] > tm ? ki_w[jj] : tm;
    const float corr = KI_EXP(m - tm);
    m = tm;
    l *= corr;
    for (int i = 0; i < NPT; ++i) acc[i] *= corr;
    for (int jj = 0; jj < KT; ++jj) {
      const int r = ki_row[jj];
      if (r < 0) continue;
      const float p = KI_EXP(ki_w[jj] - m);
      l += p;
      if (r < q_shape[0] * W) {
        for (int i = 0; i < NPT; ++i) {
          const int d = ki_tid + i * TG;
          if (d < C) acc[i] += p * @RVAL_ACC@;
        }
      } else {
        const int rc = r - q_shape[0] * W;
        for (int i = 0; i < NPT; ++i) {
          const int d = ki_tid + i * TG;
          if (d < C) acc[i] += p * @CVAL_ACC@;
        }
      }
    }
    KI_BARRIER();  // the tile's rows and logits are rewritten next
  }
  for (int i = 0; i < NPT; ++i) {
    const int d = ki_tid + i * TG;
    if (d < C) o[qo + d] = ki_from_float<QT>(acc[i] / l);
  }
"""


def decode_source(dialect: str, mode: str) -> KernelSource:
    """The one-query sink attention kernel for a stored-KV `mode` ("fp8" or "plain")."""
    if mode not in KV_MODES:
        raise ValueError(f"unknown KV mode {mode!r}; expected one of {KV_MODES}")
    parts = _PARTS[mode]
    body = (_BODY.replace("@CAPSHAPE@", "c" + parts[0] + "_shape")
            .replace("@RVAL_DOT@", _val(mode, "r", "r", "d"))
            .replace("@CVAL_DOT@", _val(mode, "c", "rc", "d"))
            .replace("@RVAL_ACC@", _val(mode, "r", "r", "d"))
            .replace("@CVAL_ACC@", _val(mode, "c", "rc", "d")))
    return KernelSource(
        name=f"dsv4_sink_decode_{mode}",
        input_names=("q", *("r" + p for p in parts), *("c" + p for p in parts), "idx", "sinks",
                     "meta", "fp"),
        output_names=("o",),
        header=_header(dialect),
        source=_PROLOGUES[dialect] + body,
    )
