"""DeepSeekMoE FFN (spec §4.10).

Router in fp32: ``s = sqrt(softplus(x . gate^T))``. Learned layers pick top-k of ``s + bias``
(the bias only selects); hash layers (layer < num_hash_layers) take ``tid2eid[token]``. The
weights are the unbiased scores of the picks, normalised to 1, times routed_scaling_factor.
SwiGLU with clamp (gate <= limit, |up| <= limit) in fp32 on routed and shared experts; the
routing weight multiplies the activation before w2 (as the reference does); expert outputs
are summed in fp32.

Routed experts are stacked per projection -- ``ffn.experts.w1.weight`` [E, I, D] -- and run
through mlx-lm's `SwitchLinear` (`gather_mm`, or `gather_qmm` once quantized).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear, _scatter_unsort


def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    g = mx.minimum(gate.astype(mx.float32), limit)
    u = mx.clip(up.astype(mx.float32), -limit, limit)
    return nn.silu(g) * u


# fused elementwise chains (mx.compile: one launch each instead of 5-10)
@partial(mx.compile, shapeless=True)
def _swiglu_out(gate, up, limit, dtype_like):
    return clamped_swiglu(gate, up, limit).astype(dtype_like.dtype)


@partial(mx.compile, shapeless=True)
def _weighted_swiglu(gate, up, w, limit, dtype_like):
    return (clamped_swiglu(gate, up, limit) * w[..., None, None]).astype(dtype_like.dtype)


@partial(mx.compile, shapeless=True)
def _router_scores(logits):
    return mx.sqrt(nn.softplus(logits))


@partial(mx.compile, shapeless=True)
def _route_weights(scores, idx, scale):
    w = mx.take_along_axis(scores, idx, axis=-1)
    return w / w.sum(axis=-1, keepdims=True) * scale


class Gate(nn.Module):
    def __init__(self, args, hash_routed: bool):
        super().__init__()
        self.hash_routed = hash_routed
        self.top_k = args.num_experts_per_tok
        self.scale = args.routed_scaling_factor
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if hash_routed:
            self.tid2eid = mx.zeros((args.vocab_size, self.top_k), dtype=mx.int32)
        else:
            self.bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x: mx.array, input_ids: mx.array):
        """x [..., D] -> (indices [..., k] int32, weights [..., k] fp32)."""
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        scores = _router_scores(logits)
        if self.hash_routed:
            idx = self.tid2eid[input_ids].astype(mx.int32)
        else:
            biased = scores + self.bias.astype(mx.float32)
            idx = mx.argpartition(-biased, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
            idx = idx.astype(mx.int32)
        return idx, _route_weights(scores, idx, mx.array(self.scale, mx.float32))


def _switch(layer, x, inds, sorted_indices):
    """`layer(x, inds)`; MLX's CPU backend has gather_mm for float32 only, so unquantized
    half-precision experts are computed in float32 there (tests and demos; GPUs are unaffected)."""
    if (
        isinstance(layer, SwitchLinear)
        and x.dtype != mx.float32
        and mx.default_device() == mx.cpu
    ):
        w = layer.weight.astype(mx.float32).swapaxes(-1, -2)
        y = mx.gather_mm(x.astype(mx.float32), w, rhs_indices=inds, sorted_indices=sorted_indices)
        return y.astype(x.dtype)
    return layer(x, inds, sorted_indices=sorted_indices)


class RoutedExperts(nn.Module):
    """The E routed experts, stacked: w1/w3 [E, I, D], w2 [E, D, I]."""

    def __init__(self, dim: int, inter: int, num_experts: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = SwitchLinear(dim, inter, num_experts, bias=False)
        self.w3 = SwitchLinear(dim, inter, num_experts, bias=False)
        self.w2 = SwitchLinear(inter, dim, num_experts, bias=False)

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """x [..., D], idx/weights [..., k] -> sum_e w_e y_e, [..., D] fp32."""
        x = mx.expand_dims(x, (-2, -3))
        do_sort = idx.size >= 64
        inds, w = idx, weights
        if do_sort:  # group tokens by expert, as mlx-lm's SwitchGLU does
            order = mx.argsort(idx.flatten())
            inv = mx.argsort(order)
            x = x.flatten(0, -3)[order // idx.shape[-1]]
            inds, w = idx.flatten()[order], weights.flatten()[order]
        g = _switch(self.w1, x, inds, do_sort)
        u = _switch(self.w3, x, inds, do_sort)
        h = _weighted_swiglu(g, u, w, mx.array(self.limit, mx.float32), x)
        y = _switch(self.w2, h, inds, do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv, idx.shape)
        return y.squeeze(-2).astype(mx.float32).sum(axis=-2)


class SharedExpert(nn.Module):
    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = _swiglu_out(self.w1(x), self.w3(x), mx.array(self.limit, mx.float32), x)
        return self.w2(h)


class MoE(nn.Module):
    def __init__(self, args, hash_routed: bool):
        super().__init__()
        self.gate = Gate(args, hash_routed)
        self.experts = RoutedExperts(
            args.hidden_size, args.moe_intermediate_size, args.n_routed_experts, args.swiglu_limit
        )
        self.shared_experts = SharedExpert(
            args.hidden_size, args.moe_intermediate_size, args.swiglu_limit
        )

    def __call__(self, x: mx.array, input_ids: mx.array) -> mx.array:
        idx, w = self.gate(x, input_ids)
        y = self.experts(x, idx, w) + self.shared_experts(x).astype(mx.float32)
        return y.astype(x.dtype)
