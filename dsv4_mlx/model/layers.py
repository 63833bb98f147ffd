"""Small shared pieces: RMSNorm variants and fp32 linear helpers (spec §4.0)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..kernels.gemv import add_ape_row, matvec, matvec_pair


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


def matmul_f32(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T`` in fp32: x [..., in], w [out, in] -> [..., out].

    One token (a decode step) goes to `kernels.gemv.matvec` (one kernel on a GPU; ``w @ x``
    with x a column otherwise, fewer graph nodes than the transposed weight and the
    flatten/unflatten around a batched x)."""
    if x.size == x.shape[-1]:
        return matvec(w, x)
    return x.astype(mx.float32) @ w.astype(mx.float32).T


def _plain(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) and "bias" not in layer


def linear_f32(layer: nn.Module, x: mx.array) -> mx.array:
    """`x @ W.T` computed in fp32 (the reference holds these weights in fp32)."""
    if _plain(layer):
        return matmul_f32(x, layer.weight)
    return layer(x).astype(mx.float32)


def linear_f32_pair(a: nn.Module, b: nn.Module, x: mx.array, ape=None,
                    offset: int = 0) -> tuple[mx.array, mx.array]:
    """(`linear_f32(a, x)`, `linear_f32(b, x)`); one token through one kernel for both. With
    `ape` [m, out_b] (one token at position `offset`): row ``offset % m`` in fp32 is added to
    the second (in the kernel on a GPU)."""
    if x.size == x.shape[-1] and _plain(a) and _plain(b):
        return matvec_pair(a.weight, b.weight, x, ape, offset)
    ya, yb = linear_f32(a, x), linear_f32(b, x)
    if ape is not None:
        yb = add_ape_row(yb, ape, offset)
    return ya, yb
