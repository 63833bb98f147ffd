"""One-token projections with fp32 outputs (spec §4.0): a Metal kernel with a CUDA twin, and
the ops path.

``matvec(W, x)`` -> ``x @ W.T`` in fp32 for one token x [..., K] (all leading sizes 1), W fp32
[O, K]; ``matvec_pair(W, W2, x, ape)`` -> both products of two weights that share x, in one
launch (with the compressor's `ape` row added to the second); ``linear_scaled(W, x, scale)`` ->
a half-precision linear layer's output in fp32 times `scale`.
On the GPU one kernel (`gemv_source`) that also converts x; on the CPU, or with
``DSV4_GEMV_KERNEL=ops``, MLX's ``W @ x`` with x a column. The kernel sums in another order
than MLX's GEMV (fp32 both).
"""

from __future__ import annotations

import mlx.core as mx

from . import dispatch
from . import gemv_source as src

ENV_VAR = "DSV4_GEMV_KERNEL"
TG = 256
MAX_PER = 32  # float4 loads a thread held at once (K <= 4 * TG * MAX_PER = 32,768)
_X_DTYPES = (mx.float32, mx.bfloat16, mx.float16)


def matvec_ops(W: mx.array, x: mx.array) -> mx.array:
    """The ops path: ``W @ x`` with x as a column, in fp32, shaped [..., O]."""
    y = W.astype(mx.float32) @ x.reshape(-1, 1).astype(mx.float32)
    return y.reshape(*x.shape[:-1], W.shape[0])


def _make_launch(backend, Ws, x, lead, round_to, scale, ape) -> dispatch.Launch:
    """The launch for these shapes (a step makes ~17 of these calls)."""
    pair = len(Ws) == 2
    O0 = Ws[0].shape[0]
    O1 = Ws[1].shape[0] if pair else 0
    return dispatch.Launch(
        backend, src.gemv_source(backend, pair, Ws[0].dtype == mx.float32),
        template=[("XT", x.dtype), ("WT", Ws[0].dtype), ("K", x.size), ("TG", TG), ("O0", O0),
                  ("RT", round_to or mx.float32), ("SC", scale is not None),
                  *([("O1", O1), ("M", 0 if ape is None else ape.shape[0])] if pair else [])],
        grid=((O0 + O1) * TG, 1, 1), threadgroup=(TG, 1, 1),
        output_shapes=[(*lead, w.shape[0]) for w in Ws], output_dtypes=[mx.float32] * len(Ws))


def _launch(backend, Ws, x, out_lead=None, round_to=None, scale=None, ape=None, offset=0):
    lead = x.shape[:-1] if out_lead is None else out_lead
    go = dispatch.launch(
        ("gemv", backend, x.dtype, x.size, lead, round_to, scale is not None,
         None if ape is None else ape.shape, *[(w.dtype, w.shape) for w in Ws]),
        lambda: _make_launch(backend, Ws, x, lead, round_to, scale, ape))
    sc = dispatch.unused() if scale is None else dispatch.vector(scale)
    if ape is None:
        ape_in, pos = dispatch.unused(), dispatch.unused(mx.int32)
    else:
        ape_in, pos = ape.astype(mx.float32), dispatch.position(offset)
    return go([*Ws, x, sc, ape_in, pos])


def _backend(Ws, x, K=None, wdtypes=(mx.float32,), variant: str = "") -> str:
    """The backend for these weights and x, or "ops". `variant` ("ape": the pair with the
    compressor's ape row; "scaled": rounded and scaled half weights) picks the template the
    build probe compiles."""
    backend = dispatch.select_backend(ENV_VAR)
    K = x.shape[-1] if K is None else K
    if backend == "ops" or x.size != K or x.dtype not in _X_DTYPES:
        return "ops"
    if K % 4 or -(-K // (4 * TG)) > MAX_PER:
        return "ops"
    wt = Ws[0].dtype
    if any(w.dtype != wt or w.dtype not in wdtypes or w.ndim != 2 or w.shape[1] != K for w in Ws):
        return "ops"
    key = (backend, "gemv", x.dtype, wt, K, len(Ws), variant)

    def probe():
        ws = [mx.zeros((2, K), wt) for _ in Ws]
        kw = {}
        if variant == "ape":
            kw = dict(ape=mx.zeros((4, 2), mx.float32), offset=5)
        elif variant == "scaled":
            kw = dict(round_to=wt, scale=0.5)
        mx.eval(_launch(backend, ws, mx.zeros((K,), x.dtype), **kw))

    return backend if dispatch.kernel_usable(key, probe, f"GEMV ({backend})") else "ops"


def matvec(W: mx.array, x: mx.array) -> mx.array:
    """``x @ W.T`` in fp32, [..., O], for one token x [..., K] (W [O, K])."""
    backend = _backend((W,), x)
    if backend == "ops":
        return matvec_ops(W, x)
    return _launch(backend, (W,), x)[0]


def matvec_flat(W: mx.array, x: mx.array) -> mx.array:
    """``W @ x.flatten()`` in fp32 as [1, O]: all of x (any shape, W.shape[1] values) is the
    one token's input vector (the kernel reads it flat: no reshape node)."""
    K = W.shape[1]
    backend = _backend((W,), x, K)
    if backend == "ops":
        return matvec_ops(W, x.reshape(1, K))
    return _launch(backend, (W,), x, out_lead=(1,))[0]


def add_ape_row(y: mx.array, ape: mx.array, offset: int) -> mx.array:
    """The ops form of the pair's `ape`: y + row ``offset % M`` of ape [M, O] in fp32."""
    r = offset % ape.shape[0]
    return y + ape.astype(mx.float32)[r: r + 1]


def matvec_pair(W: mx.array, W2: mx.array, x: mx.array, ape=None,
                offset: int = 0) -> tuple[mx.array, mx.array]:
    """(``x @ W.T``, ``x @ W2.T``) in fp32 for one token x, in one launch on a GPU. With `ape`
    [M, O2]: row ``offset % M`` (fp32) is added to the second (the compressor's gate)."""
    backend = _backend((W, W2), x, variant="" if ape is None else "ape")
    if backend == "ops":
        y2 = matvec_ops(W2, x)
        return matvec_ops(W, x), (y2 if ape is None else add_ape_row(y2, ape, offset))
    y, y2 = _launch(backend, (W, W2), x, ape=ape, offset=offset)
    return y, y2


def linear_scaled_ops(W: mx.array, x: mx.array, scale: float) -> mx.array:
    """The ops path of `linear_scaled`: the linear layer in W's dtype, then fp32 x scale."""
    return (x @ W.T).astype(mx.float32) * scale


def linear_scaled(W: mx.array, x: mx.array, scale: float) -> mx.array:
    """``float32(x @ W.T) * scale`` for one token x [..., K] and W [O, K] in x's (half)
    dtype, as a linear layer in that dtype computes it (fp32 sums, output rounded to the
    dtype) followed by the multiply: one kernel on a GPU instead of the matmul, its views, a
    cast and a multiply (the indexer's `weights_proj`)."""
    backend = "ops" if W.dtype != x.dtype else _backend((W,), x, wdtypes=(mx.bfloat16, mx.float16),
                                                        variant="scaled")
    if backend == "ops":
        return linear_scaled_ops(W, x, scale)
    return _launch(backend, (W,), x, round_to=W.dtype, scale=scale)[0]


__all__ = ["matvec", "matvec_flat", "matvec_pair", "matvec_ops", "add_ape_row", "linear_scaled",
           "linear_scaled_ops", "ENV_VAR"]
