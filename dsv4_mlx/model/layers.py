"""Small shared pieces: RMSNorm variants and fp32 linear helpers (spec §4.0)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class RMSNorm(nn.Module):
    """`w * x / sqrt(mean(x^2) + eps)`; statistics in fp32, result in the input dtype."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)


def rms_norm_0(x: mx.array, eps: float) -> mx.array:
    """RMSNorm without a weight (`RMSNorm_0` in the spec)."""
    return mx.fast.rms_norm(x, None, eps)


def linear_f32(layer: nn.Module, x: mx.array) -> mx.array:
    """`x @ W.T` computed in fp32 (the reference holds these weights in fp32)."""
    if isinstance(layer, nn.Linear) and "bias" not in layer:
        return x.astype(mx.float32) @ layer.weight.astype(mx.float32).T
    return layer(x).astype(mx.float32)
