"""One-token fp32 projections (spec §4.0): a Metal kernel with a CUDA twin, and the ops path.

``matvec(W, x)`` -> ``x @ W.T`` in fp32 for one token x [..., K] (all leading sizes 1), W fp32
[O, K]; ``matvec_pair(W, W2, x)`` -> both products of two weights that share x, in one launch.
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


def _launch(backend, Ws, x, out_lead=None):
    K = x.size
    O0 = Ws[0].shape[0]
    lead = x.shape[:-1] if out_lead is None else out_lead
    rows = sum(w.shape[0] for w in Ws)
    pair = len(Ws) == 2
    with mx.stream(mx.gpu):
        return dispatch.build_kernel(backend, src.gemv_source(backend, pair))(
            inputs=[*Ws, x],
            template=[("XT", x.dtype), ("K", K), ("TG", TG), ("O0", O0)],
            grid=(rows * TG, 1, 1), threadgroup=(TG, 1, 1),
            output_shapes=[(*lead, w.shape[0]) for w in Ws],
            output_dtypes=[mx.float32] * len(Ws),
        )


def _backend(Ws, x, K=None) -> str:
    backend = dispatch.select_backend(ENV_VAR)
    K = x.shape[-1] if K is None else K
    if backend == "ops" or x.size != K or x.dtype not in _X_DTYPES:
        return "ops"
    if K % 4 or -(-K // (4 * TG)) > MAX_PER:
        return "ops"
    if any(w.dtype != mx.float32 or w.ndim != 2 or w.shape[1] != K for w in Ws):
        return "ops"
    key = f"{backend}/gemv/{x.dtype}/K{K}/n{len(Ws)}"

    def probe():
        ws = [mx.zeros((2, K), mx.float32) for _ in Ws]
        mx.eval(_launch(backend, ws, mx.zeros((K,), x.dtype)))

    return backend if dispatch.kernel_usable(key, probe, f"fp32 GEMV ({backend})") else "ops"


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


def matvec_pair(W: mx.array, W2: mx.array, x: mx.array) -> tuple[mx.array, mx.array]:
    """(``x @ W.T``, ``x @ W2.T``) in fp32 for one token x, in one launch on a GPU."""
    backend = _backend((W, W2), x)
    if backend == "ops":
        return matvec_ops(W, x), matvec_ops(W2, x)
    y, y2 = _launch(backend, (W, W2), x)
    return y, y2


__all__ = ["matvec", "matvec_flat", "matvec_pair", "matvec_ops", "ENV_VAR"]
