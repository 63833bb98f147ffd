"""MoE routing (spec §4.10): a Metal kernel with a CUDA twin, and the ops path.

``route(logits, bias, hidx, k, scale)`` -> (idx [..., k] uint32, weights [..., k] fp32) from the
fp32 router logits: scores ``s = sqrt(softplus(logits))``; picks = top-k of ``s + bias``
(learned layers) or `hidx` (hash layers, the token's row of ``tid2eid``; with ``ids=`` the
whole table, the kernel reading each token's row itself); weights = the unbiased scores of the
picks normalised to sum 1, times `scale` (``expand=True``: shaped [..., k, 1, 1]). On the GPU one launch
(`router_source`); on the CPU, or with ``DSV4_ROUTER_KERNEL=ops``, MLX ops. The picks come
out as uint32, the index type `gather_qmm` takes (no cast before each expert matmul). The
kernel lists the picks best first; the ops path in argpartition's order (the order of the
k experts does not matter).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from . import dispatch
from . import router_source as src

ENV_VAR = "DSV4_ROUTER_KERNEL"
TG = 256
MAX_EXPERTS = 1024  # shared memory: 12 bytes an expert


@partial(mx.compile, shapeless=True)
def _scores(logits):
    return mx.sqrt(nn.softplus(logits))


@partial(mx.compile, shapeless=True)
def _scores_biased(logits, bias):
    s = mx.sqrt(nn.softplus(logits))
    return s, -(s + bias)


@partial(mx.compile, shapeless=True)
def _normalise(w, scale):
    return w / w.sum(axis=-1, keepdims=True) * scale


def route_ops(logits, bias, hidx, k: int, scale: float):
    """The ops path of `route`."""
    if hidx is not None:
        s = _scores(logits)
        idx = hidx.astype(mx.uint32)
    else:
        s, neg = _scores_biased(logits, bias.astype(mx.float32))
        idx = mx.argpartition(neg, kth=k - 1, axis=-1)[..., :k]
    w = mx.take_along_axis(s, idx, axis=-1)
    sc = dispatch.scalar(scale)
    if k == 1:  # MLX 0.32's shapeless compile crashes on a size-1 reduced axis
        return idx, w / w.sum(axis=-1, keepdims=True) * sc
    return idx, _normalise(w, sc)


def route_kernel(logits, bias, hidx, k: int, scale: float, *, backend: str, w_shape=None,
                 ids=None):
    """Kernel path of `route`. logits [..., E] f32; bias [E] (None with `hidx`); `w_shape`:
    the weights' output shape if not [..., k] (the kernel writes them flat); `ids` [...]
    int32 or uint32: `hidx` is the whole table and token t takes its row ids[t]."""
    *lead, E = logits.shape
    N = 1
    for d in lead:
        N *= d
    hashed = hidx is not None
    dummy = dispatch.unused(mx.int32)
    wsh = tuple(w_shape or (*lead, k))
    go = dispatch.launch(
        ("router", backend, logits.shape, k, hashed, ids is not None, wsh),
        lambda: dispatch.Launch(
            backend, src.route_source(backend),
            template=[("E", E), ("K", k), ("TG", TG), ("HASH", hashed), ("ROWS", ids is not None)],
            grid=(N * TG, 1, 1), threadgroup=(TG, 1, 1),
            output_shapes=[(*lead, k), wsh], output_dtypes=[mx.uint32, mx.float32]))
    idx, w = go([logits, dispatch.unused() if hashed else bias, hidx if hashed else dummy,
                 dispatch.vector(scale), dummy if ids is None else ids])
    return idx, w


def _backend(logits, bias, hidx, k, ids=None) -> str:
    backend = dispatch.select_backend(ENV_VAR)
    if backend == "ops" or logits.dtype != mx.float32 or logits.shape[-1] > MAX_EXPERTS:
        return "ops"
    if hidx is None and (bias is None or bias.dtype != mx.float32):
        return "ops"
    if hidx is not None and hidx.dtype != mx.int32:
        return "ops"
    if ids is not None and (ids.dtype not in (mx.int32, mx.uint32)
                            or ids.size * logits.shape[-1] != logits.size
                            or hidx is None or hidx.ndim != 2 or hidx.shape[-1] != k):
        return "ops"
    E = logits.shape[-1]
    rows = ids is not None
    key = (backend, "router", E, k, hidx is not None, bool(rows))

    def probe():
        lg = mx.zeros((1, E), mx.float32)
        h = mx.zeros((1, k), mx.int32) if hidx is not None else None
        mx.eval(route_kernel(lg, None if h is not None else mx.zeros((E,)), h, k, 1.0,
                             backend=backend, ids=mx.zeros((1,), mx.int32) if rows else None))

    return backend if dispatch.kernel_usable(key, probe, f"router ({backend})") else "ops"


def route(logits, bias, hidx, k: int, scale: float, expand: bool = False, ids=None):
    """(idx [..., k] uint32, weights [..., k] fp32); see the module docstring. ``expand``:
    the weights as [..., k, 1, 1] (how the experts' activations take them; the kernel writes
    that shape directly, no view node). ``ids`` (the tokens, [...]): `hidx` is the whole
    ``tid2eid`` table and each token takes its row (inside the kernel on a GPU)."""
    backend = _backend(logits, bias, hidx, k, ids)
    if backend != "ops":
        w_shape = (*logits.shape[:-1], k, 1, 1) if expand else None
        return route_kernel(logits, bias, hidx, k, scale, backend=backend, w_shape=w_shape,
                            ids=ids)
    if ids is not None:
        hidx = hidx[ids]
    idx, w = route_ops(logits, bias, hidx, k, scale)
    return idx, (w[..., None, None] if expand else w)


__all__ = ["route", "route_ops", "route_kernel", "ENV_VAR"]
