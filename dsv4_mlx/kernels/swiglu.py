"""The experts' clamped SwiGLU (spec §4.10): a Metal kernel with a CUDA twin, and the ops path.

``swiglu(y, w, limit, dtype)``: y [..., 2I] is the fused ``w1``/``w3`` projection (gate, then
up), w the routing weights ([..., 1, 1] against y's rows, or None for the shared expert) ->
``silu(min(gate, limit)) * clip(up, -limit, limit) [* w]`` in fp32, as `dtype`, [..., I].
On the GPU one launch (`swiglu_source`) reading both halves in place; on the CPU, or with
``DSV4_SWIGLU_KERNEL=ops``, the compiled ops on the two halves (views).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from . import dispatch
from . import swiglu_source as src

ENV_VAR = "DSV4_SWIGLU_KERNEL"
TG = 256
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    g = mx.minimum(gate.astype(mx.float32), limit)
    u = mx.clip(up.astype(mx.float32), -limit, limit)
    return nn.silu(g) * u


# fused elementwise chains (mx.compile: one launch each instead of 5-10)
@partial(mx.compile, shapeless=True)
def swiglu_out(gate, up, limit, dtype_like):
    return clamped_swiglu(gate, up, limit).astype(dtype_like.dtype)


@partial(mx.compile, shapeless=True)
def weighted_swiglu(gate, up, w, limit, dtype_like):
    """w [..., k, 1, 1]: the routing weights as `route(expand=True)` gives them (an expand
    inside the compiled function would stay a node of its own)."""
    return (clamped_swiglu(gate, up, limit) * w).astype(dtype_like.dtype)


def _limit(limit: float) -> mx.array:
    return dispatch.scalar(float(limit))


def swiglu_ops(y, w, limit: float, like):
    """The ops path: the compiled chain on the two halves of y."""
    I = y.shape[-1] // 2
    g, u = y[..., :I], y[..., I:]
    if w is None:
        return swiglu_out(g, u, _limit(limit), like)
    return weighted_swiglu(g, u, w, _limit(limit), like)


def swiglu_kernel(y, w, limit: float, dtype, *, backend: str):
    """Kernel path of `swiglu`."""
    I = y.shape[-1] // 2
    R = y.size // (2 * I)
    lim = dispatch.vector(float(limit))
    wi = dispatch.unused() if w is None else w
    go = dispatch.launch(
        ("swiglu", backend, y.dtype, y.shape, dtype, w is not None),
        lambda: dispatch.Launch(
            backend, src.swiglu_source(backend),
            template=[("YT", y.dtype), ("OT", dtype), ("I", I), ("TG", TG),
                      ("WEIGHTED", w is not None)],
            grid=(-(-I // TG) * TG, R, 1), threadgroup=(TG, 1, 1),
            output_shapes=[(*y.shape[:-1], I)], output_dtypes=[dtype]))
    (h,) = go([y, wi, lim])
    return h


def _backend(y, w, dtype) -> str:
    backend = dispatch.select_backend(ENV_VAR)
    if (backend == "ops" or y.dtype not in _FLOATS or dtype not in _FLOATS or y.shape[-1] % 2
            or (w is not None and (w.dtype != mx.float32 or w.size * y.shape[-1] != y.size))):
        return "ops"
    key = (backend, "swiglu", y.dtype, dtype, w is not None)

    def probe():
        mx.eval(swiglu_kernel(mx.zeros((1, 4), y.dtype), None if w is None else mx.ones((1,)),
                              7.0, dtype, backend=backend))

    return backend if dispatch.kernel_usable(key, probe, f"SwiGLU ({backend})") else "ops"


def swiglu(y, w, limit: float, like):
    """[..., I] in like's dtype; see the module docstring."""
    backend = _backend(y, w, like.dtype)
    if backend != "ops":
        return swiglu_kernel(y, w, limit, like.dtype, backend=backend)
    return swiglu_ops(y, w, limit, like)


__all__ = ["swiglu", "swiglu_ops", "swiglu_kernel", "clamped_swiglu", "swiglu_out",
           "weighted_swiglu", "ENV_VAR"]
