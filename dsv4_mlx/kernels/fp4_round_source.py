"""Kernel source of the FP4 round trip of indexer queries (spec §4.13 item 3): one body,
three dialects.

The queries get what the indexer keys got: after the Hadamard rotation, FP4 e2m1 with one
power-of-two scale a block of BLK values, ``k = ceil(log2(max(amax, 6 * 2^-126) / 6))``
(computed as MLX's ops do: the maximum times the fp32 constant 1/6, the exponent from the
bits), the values times 2^-k clipped to +-6, rounded to nearest even on the e2m1 grid
[0, .5, 1, 1.5, 2, 3, 4, 6], and back: the code's value times 2^k (-0 for a negative value
rounded to 0). Bit-identical to `kv_formats.FP4IndexCodec.roundtrip`'s encode and decode;
one launch replaces their ~12.

Input x, 4-D (XT: the rotation's fp32 output), read flat: N = the product of its shape (read
at run time, so a new size does not compile a new kernel); output y of N values (OT: the model
dtype). The input is rounded to OT first, as the ops path casts the rotation's output back to
the model dtype before encoding. Template: XT, OT, BLK, TG (a multiple of BLK). Grid
(ceil(N / TG) * TG, 1, 1), groups of TG: each group stages TG values in shared memory, one
thread a block finds the block's scale, then each thread rounds its value.

The body uses the dialect layer of `indexer_source` and keeps its rules.
"""

from __future__ import annotations

import functools

import numpy as np

from .indexer_source import KernelSource, make_source


def _f32_bits(x: float) -> str:
    return f"0x{int(np.array([x], np.float32).view(np.uint32)[0]):08x}u"


_ROUND_BODY = r"""
  constexpr int NB = TG / BLK;
  KI_SHARED float ki_v[TG];
  KI_SHARED int ki_k[NB];
  const int64_t N = (int64_t)x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3];
  const int64_t i = (int64_t)ki_gx * TG + ki_tid;
  ki_v[ki_tid] = i < N ? ki_to_float(ki_from_float<OT>(ki_to_float(x[i]))) : 0.0f;
  KI_BARRIER();
  if (ki_tid < NB) {
    float m = 0.0f;
    for (int j = 0; j < BLK; ++j) {
      const float v = ki_v[ki_tid * BLK + j];
      const float a = v < 0.0f ? -v : v;
      m = a > m ? a : m;
    }
    const float lo = KI_AS_FLOAT(@MIN_AMAX@);  // fp32(6 * 2^-126)
    const float inv = KI_AS_FLOAT(@INV_6@);    // fp32(1 / 6)
    const float t = (m > lo ? m : lo) * inv;
    const uint32_t tb = KI_AS_UINT(t);
    ki_k[ki_tid] = (int)((tb >> 23) & 0xffu) - 127 + ((tb & 0x7fffffu) != 0u ? 1 : 0);
  }
  KI_BARRIER();
  if (i < N) {
    const int k = ki_k[ki_tid / BLK];
    float y = ki_v[ki_tid] * KI_AS_FLOAT((uint32_t)(127 - k) << 23);  // exact
    y = y > 6.0f ? 6.0f : (y < -6.0f ? -6.0f : y);
    const float a = y < 0.0f ? -y : y;
    // round to nearest even on the e2m1 grid: the code's magnitude index 0..7
    const int mag = (a > 0.25f ? 1 : 0) + (a >= 0.75f ? 1 : 0) + (a > 1.25f ? 1 : 0) +
                    (a >= 1.75f ? 1 : 0) + (a > 2.5f ? 1 : 0) + (a >= 3.5f ? 1 : 0) +
                    (a > 5.0f ? 1 : 0);
    float v = mag <= 4 ? 0.5f * (float)mag : (mag == 7 ? 6.0f : (float)(mag - 2));
    v = v * KI_AS_FLOAT((uint32_t)(k + 127) << 23);
    y_out[i] = ki_from_float<OT>(y < 0.0f ? -v : v);
  }
""".replace("@MIN_AMAX@", _f32_bits(6.0 * 2.0**-126)).replace("@INV_6@", _f32_bits(1.0 / 6.0))


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def round_source(dialect: str) -> KernelSource:
    """The FP4 round-trip kernel (see `_ROUND_BODY`)."""
    return make_source(dialect, "dsv4_fp4_roundtrip", ("x",), ("y_out",), _ROUND_BODY)
