"""Fused mHC steps (spec §4.2, §4.3): a Metal kernel with a CUDA twin, and the ops path.

``hc_pre(X, ...)`` -> (h, post, comb): parameter generation with Sinkhorn and the collapse
(and the RMSNorm that follows it in the block, with ``norm=``);
``hc_post(X, F, post, comb)`` -> X': expand and mix. On the GPU each is one kernel launch
(plus the `fn` projection matmul for `hc_pre`) instead of the ~250 primitives of the ops
path; on the CPU, or with ``DSV4_MHC_KERNEL=ops``, they are `model.mhc`'s ops.

``DSV4_MHC_KERNEL=auto|metal|cuda|ops`` chooses, as ``DSV4_INDEXER_KERNEL`` does for the
indexer (`dispatch`); a kernel that fails to build warns once and falls back.
"""

from __future__ import annotations

import mlx.core as mx

from ..model import mhc as ops
from ..model.layers import RMSNorm
from . import dispatch
from . import mhc_source as src
from .gemv import matvec_flat

ENV_VAR = "DSV4_MHC_KERNEL"
PRE_TG = 512  # one group a token; 512 measured best of 256/512/1024 (bench/mhc.py, H100)
# Who runs the pre kernel's Sinkhorn (2: every warp, 1: warp 0, 0: thread 0) and whether a
# thread keeps its stream values in registers: the same bits either way, only the speed differs
# (`bench/mhc.py --sink --reg` times each on a GPU; H100, 2026-12-07: 17.8 us a call with
# these, the best of the six; 22.5 us with 94ebe39's SINK 0 and no registers).
PRE_SINK = 2
PRE_REG = True
POST_TG = 256
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
def hc_pre_kernel(X, fn, scale, base, iters: int, hc_eps: float, norm_eps: float, *, backend: str,
                  head: bool = False, norm=None):
    """Kernel path of `hc_pre`. X [B, S, n, D]; fn [(2+n)n, nD] f32. The kernel indexes its
    (row-contiguous) arrays flat, so they go in and out in the model's shapes (no reshapes).
    ``head``: the final head collapse instead (fn [n, nD], scale [1]; only h is meaningful).
    ``norm`` (an `RMSNorm`): h comes out through it (`mx.fast.rms_norm`'s numerics)."""
    B, S, n, D = X.shape
    N = B * S
    if N == 1:  # one token: [1, M] from the streams as they are (read flat, converted)
        mixraw = matvec_flat(fn, X)
    else:
        mixraw = X.reshape(N, n * D).astype(mx.float32) @ fn.astype(mx.float32).T  # [N, M]
    return hc_pre_from_mix(X, mixraw, scale, base, iters, hc_eps, norm_eps, backend=backend,
                           head=head, norm=norm)


def hc_pre_from_mix(X, mixraw, scale, base, iters: int, hc_eps: float, norm_eps: float, *,
                    backend: str, head: bool = False, norm=None):
    """The pre kernel's launch alone, on the projected logits `mixraw` [N, M] f32 (what
    `hc_pre_kernel` computes first): for timing the two apart (`bench/mhc.py`)."""
    B, S, n, D = X.shape
    N = B * S
    out_eps = norm.eps if norm is not None else 0.0
    eps = dispatch.vector(hc_eps, norm_eps, out_eps)
    wn = (norm.weight.astype(X.dtype) if norm is not None
          else dispatch.unused())
    go = dispatch.launch(
        ("mhc_pre", backend, X.dtype, X.shape, iters, head, norm is not None, PRE_TG, PRE_SINK,
         PRE_REG),
        lambda: dispatch.Launch(
            backend, src.pre_source(backend),
            template=[("XT", X.dtype), ("NS", n), ("D", D), ("ITERS", iters), ("TG", PRE_TG),
                      ("HEAD", head), ("NORM", norm is not None), ("SINK", PRE_SINK),
                      ("REG", PRE_REG)],
            grid=(N * PRE_TG, 1, 1), threadgroup=(PRE_TG, 1, 1),
            output_shapes=[(B, S, D), (1,), (1,)] if head else [(B, S, D), (B, S, n), (B, S, n, n)],
            output_dtypes=[X.dtype, mx.float32, mx.float32]))
    h, post, comb = go([X, mixraw, scale.astype(mx.float32), base.astype(mx.float32), eps, wn])
    return h, post, comb


def hc_post_kernel(X, F, post, comb, routed=None, *, backend: str):
    """Kernel path of `hc_post`. X [B, S, n, D], F [B, S, D], post [B, S, n], comb [B, S, n, n];
    routed [B, S, k, 1, D] or None."""
    B, S, n, D = X.shape
    N = B * S
    R = dispatch.unused() if routed is None else routed
    KR = 0 if routed is None else routed.shape[2]
    go = dispatch.launch(
        ("mhc_post", backend, X.dtype, X.shape, F.dtype, R.dtype, KR),
        lambda: dispatch.Launch(
            backend, src.post_source(backend),
            template=[("XT", X.dtype), ("FT", F.dtype), ("RT", R.dtype), ("KR", KR), ("NS", n),
                      ("D", D), ("TG", POST_TG)],
            grid=(-(-D // POST_TG) * POST_TG, N, 1), threadgroup=(POST_TG, 1, 1),
            output_shapes=[(B, S, n, D)], output_dtypes=[X.dtype]))
    (Y,) = go([X, F, post, comb, R])
    return Y


def _backend(X) -> str:
    backend = dispatch.select_backend(ENV_VAR)
    if backend == "ops" or X.dtype not in _FLOATS:
        return "ops"
    return backend


def _usable(backend: str, X, n: int, D: int, iters: int, F_dtype=None, head: bool = False,
            norm: bool = False) -> bool:
    if n * n > 32 and PRE_SINK:  # the pre kernel's Sinkhorn holds the n x n matrix in one
        return False                # warp's lanes
    key = (backend, "mhc", X.dtype, F_dtype, n, D, iters, bool(head), bool(norm))

    def probe():
        x = mx.zeros((1, 1, n, D), X.dtype)
        rms = RMSNorm(D) if norm else None
        if head:
            mx.eval(hc_pre_kernel(x, mx.zeros((n, n * D), mx.float32), mx.ones((1,)),
                                  mx.zeros((n,)), 1, 1e-6, 1e-6, backend=backend, head=True,
                                  norm=rms))
            return
        fn = mx.zeros(((2 + n) * n, n * D), mx.float32)
        h, post, comb = hc_pre_kernel(x, fn, mx.ones((3,)), mx.zeros(((2 + n) * n,)), iters,
                                      1e-6, 1e-6, backend=backend, norm=rms)
        y = hc_post_kernel(x, mx.zeros((1, 1, D), F_dtype or X.dtype), post, comb, backend=backend)
        mx.eval(h, y)

    return dispatch.kernel_usable(key, probe, f"mHC ({backend})")


def _normed(h, norm):
    return h if norm is None else norm(h)


def hc_pre(X, fn, scale, base, n: int, iters: int, hc_eps: float, norm_eps: float, norm=None):
    """(h [B,S,D] in X's dtype, post [B,S,n] f32, comb [B,S,n,n] f32): the parameters of
    §4.3 from the streams X [B,S,n,D] and the collapse ``h = sum_j pre_j X_j``; with `norm`
    (the block's `RMSNorm` after the collapse) h is ``norm(h)``, fused on a GPU."""
    backend = _backend(X)
    if backend != "ops" and _usable(backend, X, n, X.shape[-1], iters, norm=norm is not None):
        return hc_pre_kernel(X, fn, scale, base, iters, hc_eps, norm_eps, backend=backend,
                             norm=norm)
    pre, post, comb = ops.hc_params(X, fn, scale, base, n, iters, hc_eps, norm_eps)
    return _normed(ops.collapse(X, pre), norm), post, comb


def hc_head(X, fn, scale, base, hc_eps: float, norm_eps: float, norm=None):
    """The final head collapse (`model.mhc.hc_head`), through `norm` if given: on a GPU the
    pre kernel's HEAD variant (with the one-token mix through `gemv`), two launches instead
    of ~20 ops."""
    backend = _backend(X)
    n = X.shape[2]
    if (backend != "ops" and fn.shape == (n, X.shape[2] * X.shape[3])
            and _usable(backend, X, n, X.shape[-1], 1, head=True, norm=norm is not None)):
        return hc_pre_kernel(X, fn, scale, base, 1, hc_eps, norm_eps, backend=backend,
                             head=True, norm=norm)[0]
    return _normed(ops.hc_head(X, fn, scale, base, hc_eps, norm_eps), norm)


def combine_moe(routed, shared, dtype):
    """The MoE's output from its parts (ops): the routed outputs [.., k, 1, D] summed in fp32,
    plus the shared expert's [.., D], in `dtype`."""
    y = routed.squeeze(-2).astype(mx.float32).sum(axis=-2) + shared.astype(mx.float32)
    return y.astype(dtype)


def hc_post(X, F, post, comb, routed=None):
    """``X'_k = post_k F + sum_j comb[j, k] X_j`` in fp32, in X's dtype. With `routed`
    [B, S, k, 1, D] (the MoE's weighted expert outputs), F is the shared expert's output and
    the block output is `combine_moe(routed, F)` (fused into the kernel on a GPU)."""
    backend = _backend(X)
    if (backend != "ops" and F.dtype in _FLOATS
            and (routed is None or routed.dtype in _FLOATS)
            and _usable(backend, X, X.shape[2], X.shape[-1], 1, F.dtype)):
        return hc_post_kernel(X, F, post, comb, routed, backend=backend)
    if routed is not None:
        F = combine_moe(routed, F, X.dtype)
    return ops.expand(X, F, post, comb)


__all__ = ["hc_pre", "hc_post", "hc_head", "combine_moe", "hc_pre_kernel", "hc_post_kernel",
           "ENV_VAR"]
