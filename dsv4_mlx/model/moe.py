"""DeepSeekMoE FFN (spec §4.10).

Router in fp32: ``s = sqrt(softplus(x . gate^T))``. Learned layers pick top-k of ``s + bias``
(the bias only selects); hash layers (layer < num_hash_layers) take ``tid2eid[token]``. The
weights are the unbiased scores of the picks, normalised to 1, times routed_scaling_factor
(`kernels.router.route`: one kernel on a GPU). SwiGLU with clamp (gate <= limit, |up| <= limit) in fp32 on routed and shared experts, whose
``w1`` and ``w3`` run as one matmul (`fuse_pair`; `kernels.swiglu` reads the two halves); the
routing weight multiplies the activation before w2 (as the reference does); expert outputs
are summed in fp32 (in the decoder block, inside the mHC post kernel: `MoE.branches`).

Routed experts are stacked per projection -- ``ffn.experts.w1.weight`` [E, I, D] -- held in
mlx-lm's `SwitchLinear` / `QuantizedSwitchLinear` and run with `gather_mm` / `gather_qmm`
directly, with constant uint32 row indices for one-token steps (no per-call arange and cast),
or, for one token where ``DSV4_MX_GEMV_KERNEL`` asks for it, through the microscaled one-token
kernel (`kernels.qgemv.mx_project`: the token's picks gathered in one launch a projection).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear, _scatter_unsort

from ..kernels.mhc import combine_moe
from ..kernels.qgemv import mx_project
from ..kernels.router import route
from ..kernels.swiglu import swiglu, swiglu_out, weighted_swiglu
from .layers import matmul_f32


class _Fused:
    """Two projections that share their input (``w1`` and ``w3``) as one: their weights (and
    scales, biases) concatenated along the output rows, one matmul for both. Made once per set
    of parameters (`fuse_pair`); not a module, so not a parameter of the model."""

    def __init__(self, src, weight, scales, biases, quantized, group_size, bits, mode):
        self.src, self.weight, self.scales, self.biases = src, weight, scales, biases
        self.quantized, self.group_size, self.bits, self.mode = quantized, group_size, bits, mode

    def __getitem__(self, k):
        return getattr(self, k)

    def get(self, k, default=None):
        v = getattr(self, k, None)
        return default if v is None else v


_PARTS = ("weight", "scales", "biases")


def fuse_pair(owner: nn.Module, a: nn.Module, b: nn.Module) -> Optional[_Fused]:
    """`a` and `b` (same kind, quantization and input) as one `_Fused`, cached on `owner`.

    The concatenation is evaluated once (at the module's first call: for Flash ~2.3 GB a layer
    copied once, the only time both copies exist), then `a`'s and `b`'s parameters are rebound
    to views into it (same names, same values, no second copy: the originals are freed), so
    the model keeps the checkpoint's ``w1``/``w3`` while a decode step runs one matmul where it
    ran two.
    None where the two cannot be fused (different quantization, a bias, global scales)."""
    cached = owner.__dict__.get("_fused13")
    if cached is not None and all(cached.src[i] is p for i, p in enumerate(_params(a, b))):
        return cached
    qa, qb = isinstance(a, (QuantizedSwitchLinear, nn.QuantizedLinear)), \
        isinstance(b, (QuantizedSwitchLinear, nn.QuantizedLinear))
    if qa != qb or "bias" in a or "bias" in b or "global_scale" in a or "global_scale" in b:
        return None
    if qa and (a.group_size, a.bits, a.mode) != (b.group_size, b.bits, b.mode):
        return None
    if a.weight.shape[:-2] != b.weight.shape[:-2] or a.weight.shape[-1] != b.weight.shape[-1] \
            or a.weight.dtype != b.weight.dtype:
        return None
    rows = a.weight.shape[-2]
    fused = {}
    for k in _PARTS:
        if k in a:
            fused[k] = mx.concatenate([a[k], b[k]], axis=-2)
    mx.eval(list(fused.values()))
    for k, v in fused.items():  # the originals become views of the fused arrays
        a[k], b[k] = v[..., :rows, :], v[..., rows:, :]
    mx.eval([m[k] for m in (a, b) for k in fused])
    # the originals' buffers (freed now) would otherwise stay in MLX's buffer cache, and a
    # fused buffer is larger than either, so the next layer could not reuse them
    mx.clear_cache()
    f = _Fused(_params(a, b), fused["weight"], fused.get("scales"), fused.get("biases"), qa,
               getattr(a, "group_size", None), getattr(a, "bits", None), getattr(a, "mode", None))
    object.__setattr__(owner, "_fused13", f)
    return f


def _params(a, b):
    return tuple(m[k] for m in (a, b) for k in _PARTS if k in m)


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

    def __call__(self, x: mx.array, input_ids: mx.array, expand: bool = False):
        """x [..., D] -> (indices [..., k] uint32, weights [..., k] fp32, or [..., k, 1, 1]
        with `expand`); the scoring, selection and normalisation are `kernels.router.route`
        (one kernel on a GPU)."""
        logits = matmul_f32(x, self.weight)
        if self.hash_routed:
            return route(logits, None, self.tid2eid, self.top_k, self.scale, expand, input_ids)
        return route(logits, self.bias, None, self.top_k, self.scale, expand)


_LHS: "OrderedDict[tuple, mx.array]" = OrderedDict()


def _lhs_indices(shape: tuple, per_row: bool) -> mx.array:
    """The `lhs_indices` that `gather_*mm` would build, as a materialised constant (no
    arange/broadcast launches per call): uint32 of `shape` [*lead, k], holding the row of x
    each pick reads -- r for every pick of row r when x has one row a token (`per_row`, the
    first projections), or the pick's own row when x has one row a pick (w2)."""
    key = (shape, per_row)
    a = _LHS.get(key)
    if a is None:
        *lead, k = shape
        n = int(np.prod(lead)) if lead else 1
        if per_row:
            v = np.broadcast_to(np.arange(n, dtype=np.uint32).reshape(*lead, 1), shape)
        else:
            v = np.arange(n * k, dtype=np.uint32).reshape(shape)
        a = _LHS[key] = mx.array(v)
        if len(_LHS) > 16:
            _LHS.popitem(last=False)
    else:
        _LHS.move_to_end(key)
    return a


def _switch(layer, x, lhs, inds, sorted_indices):
    """`layer(x, inds)` (mlx-lm's `SwitchLinear` / `QuantizedSwitchLinear`, or a `_Fused`
    pair of them) with explicit `lhs` indices. MLX's CPU backend has gather_mm for float32
    only, so unquantized half-precision experts are computed in float32 there (tests and
    demos; GPUs are unaffected)."""
    if getattr(layer, "quantized", isinstance(layer, QuantizedSwitchLinear)):
        return mx.gather_qmm(
            x, layer["weight"], layer["scales"], layer.get("biases"), lhs_indices=lhs,
            rhs_indices=inds, transpose=True, group_size=layer.group_size, bits=layer.bits,
            mode=layer.mode, global_scale=getattr(layer, "global_scale", None),
            sorted_indices=sorted_indices,
        )
    w = layer.weight.swapaxes(-1, -2)
    if x.dtype != mx.float32 and mx.default_device() == mx.cpu:
        y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32), lhs, inds,
                         sorted_indices=sorted_indices)
        return y.astype(x.dtype)
    return mx.gather_mm(x, w, lhs, inds, sorted_indices=sorted_indices)


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
        return self.outputs(x, idx, weights).squeeze(-2).astype(mx.float32).sum(axis=-2)

    def outputs(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """The k weighted expert outputs w_e y_e, unsummed: [..., k, 1, D] in x's dtype.
        `weights` [..., k] or already [..., k, 1, 1]."""
        x = mx.expand_dims(x, (-2, -3))
        do_sort = idx.size >= 64
        if weights.ndim == idx.ndim:
            weights = weights[..., None, None]
        inds, w = idx, weights
        if do_sort:  # group tokens by expert, as mlx-lm's SwitchGLU does
            order = mx.argsort(idx.flatten())
            inv = mx.argsort(order)
            x = x.flatten(0, -3)[order // idx.shape[-1]]
            inds, w = idx.flatten()[order], weights.flatten()[order][:, None, None]
            # x has one row a pick already; MLX's own lhs (its arange) keeps gather_qmm's
            # sorted-rhs fast path for prefill chunks
            lhs1 = lhs2 = None
        else:
            lhs1, lhs2 = _lhs_indices(idx.shape, True), _lhs_indices(idx.shape, False)
        one = not do_sort and x.size == x.shape[-1]  # one token: the microscaled kernel
        w13 = fuse_pair(self, self.w1, self.w3)
        if w13 is not None:  # one matmul for w1 and w3, the activation reads both halves
            y13 = mx_project(w13, x, inds) if one else None
            if y13 is None:
                y13 = _switch(w13, x, lhs1, inds, do_sort)
            h = swiglu(y13, w, self.limit, x)
        else:
            g = _switch(self.w1, x, lhs1, inds, do_sort)
            u = _switch(self.w3, x, lhs1, inds, do_sort)
            h = weighted_swiglu(g, u, w, mx.array(self.limit, mx.float32), x)
        y = mx_project(self.w2, h, inds, per_pick=True) if one else None
        if y is None:
            y = _switch(self.w2, h, lhs2, inds, do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv, idx.shape)
        return y


class SharedExpert(nn.Module):
    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        w13 = fuse_pair(self, self.w1, self.w3)
        if w13 is None:
            h = swiglu_out(self.w1(x), self.w3(x), mx.array(self.limit, mx.float32), x)
        else:  # one matmul for w1 and w3, the activation reads both halves
            if not w13.quantized:
                y = x @ w13.weight.T
            else:  # (one token of mxfp8 weights: the microscaled kernel, if asked for)
                y = mx_project(w13, x)
                if y is None:
                    y = mx.quantized_matmul(x, w13.weight, w13.scales, w13.biases,
                                            transpose=True, group_size=w13.group_size,
                                            bits=w13.bits, mode=w13.mode)
            h = swiglu(y, None, self.limit, x)
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
        return combine_moe(*self.branches(x, input_ids), x.dtype)

    def branches(self, x: mx.array, input_ids: mx.array):
        """(routed [..., k, 1, D], shared [..., D]): the weighted routed expert outputs and
        the shared expert's, before `combine_moe` sums them (the decoder block lets the mHC
        kernel do that)."""
        idx, w = self.gate(x, input_ids, expand=True)
        return self.experts.outputs(x, idx, w), self.shared_experts(x)
