"""Rotary position embedding (spec §4.4).

RoPE rotates the *last* `qk_rope_head_dim` dims of a head, with interleaved pairs
(2i, 2i+1) -- `mx.fast.rope(traditional=True)`. Two tables exist: theta=10000 plain for
window-only layers and MTP, and theta=160000 with YaRN (no mscale) for CSA/HCA layers, used for
queries, window KV, compressed KV, indexer queries and indexer keys alike.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np


def inv_freq_plain(theta: float, dims: int) -> np.ndarray:
    """omega_i = theta^(-2i/dims), i = 0..dims/2-1 (float64)."""
    return 1.0 / (theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims))


def inv_freq_yarn(
    theta: float,
    dims: int,
    factor: float,
    original_max_position: int,
    beta_fast: float,
    beta_slow: float,
) -> np.ndarray:
    """YaRN-blended inverse frequencies (spec §4.4); no attention-temperature factor."""
    base = inv_freq_plain(theta, dims)

    def corr(beta):
        return dims * math.log(original_max_position / (2 * math.pi * beta)) / (2 * math.log(theta))

    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), dims - 1)
    if high == low:
        high += 0.001
    ramp = np.clip((np.arange(dims // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return base / factor * ramp + base * (1.0 - ramp)


class RoPE:
    """A RoPE table acting on the trailing `dims` features of the last axis.

    Positions run along axis -2 (`[..., T, D]`). `offset` is the position of the first row,
    `scale` multiplies positions (compressed entry w sits at position w*m: offset=w0, scale=m).
    """

    def __init__(self, inv_freq: np.ndarray, dims: int):
        self.dims = dims
        self.inv_freq = inv_freq.astype(np.float32)
        # mx.fast.rope takes periods ("freqs"): angle = position / freqs.
        self._periods32 = (1.0 / inv_freq).astype(np.float32)
        self._wide: dict = {}

    def _periods(self, width: int, inverse: bool) -> mx.array:
        """Periods for a rotation over all `width` features: the leading (non-RoPE) pairs get
        an infinite period, i.e. angle 0 at every position: cos 1, sin 0, the identity exactly.
        One rope launch then covers the whole head (no slice and concatenate)."""
        key = (width, inverse)
        if key not in self._wide:
            lead = np.full(((width - self.dims) // 2,), np.inf, np.float32)
            p = np.concatenate([lead, self._periods32])
            self._wide[key] = mx.array(-p if inverse else p)
        return self._wide[key]

    def inv_freq_f32(self) -> mx.array:
        """The pairs' inverse frequencies as `mx.fast.rope` computes them from its periods
        (``1.0 / period`` in double, rounded to fp32), for kernels that rotate themselves."""
        if "inv" not in self._wide:
            self._wide["inv"] = mx.array((1.0 / self._periods32.astype(np.float64)).astype(np.float32))
        return self._wide["inv"]

    def __call__(self, x: mx.array, offset=0, scale: float = 1.0, inverse: bool = False) -> mx.array:
        w = x.shape[-1]
        return mx.fast.rope(x, w, traditional=True, base=None, scale=scale, offset=offset,
                            freqs=self._periods(w, inverse))


def make_rope(args, ratio: int) -> RoPE:
    """The table of a layer with compression rate `ratio` (0 = window only)."""
    d = args.qk_rope_head_dim
    if ratio == 0:
        return RoPE(inv_freq_plain(args.rope_theta, d), d)
    rs = args.rope_scaling or {}
    rtype = rs.get("type", rs.get("rope_type"))
    if rtype == "yarn" and rs.get("original_max_position_embeddings", 0) > 0:
        inv = inv_freq_yarn(
            args.compress_rope_theta,
            d,
            float(rs["factor"]),
            int(rs["original_max_position_embeddings"]),
            float(rs.get("beta_fast", 32)),
            float(rs.get("beta_slow", 1)),
        )
    else:
        inv = inv_freq_plain(args.compress_rope_theta, d)
    return RoPE(inv, d)
