"""Manifold-constrained hyper-connections, mHC (spec §4.2, §4.3).

The residual is `n` = hc_mult parallel streams X [B, S, n, D]. Per token, parameters come from
the flattened, RMS-normalised streams (fp32):

    mix  = RMSNorm_0(flatten(X)) . fn^T                    # [(2+n) n]
    pre  = sigmoid(mix[:n] * scale[0] + base[:n]) + eps
    post = 2 sigmoid(mix[n:2n] * scale[1] + base[n:2n])
    comb = Sinkhorn(mix[2n:] * scale[2] + base[2n:])       # row j, column k

Sinkhorn: row-wise softmax + eps, one column normalisation, then (iters - 1) x (row, column).
Collapse: h = sum_j pre_j X_j. Expand and mix: X'_k = post_k F + sum_j comb[j, k] X_j
(comb transposed). The final head collapse uses `hc_head_*` with sigmoid only, no Sinkhorn.
"""

from __future__ import annotations

import mlx.core as mx


def _mix(X: mx.array, fn: mx.array, norm_eps: float) -> mx.array:
    B, S, n, D = X.shape
    xf = X.reshape(B, S, n * D).astype(mx.float32)
    rs = mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + norm_eps)
    return (xf @ fn.astype(mx.float32).T) * rs


def sinkhorn(logits: mx.array, iters: int, eps: float) -> mx.array:
    """[..., n, n] -> approximately doubly stochastic, in the reference's order."""
    m = mx.softmax(logits, axis=-1, precise=True) + eps
    m = m / (m.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(axis=-1, keepdims=True) + eps)
        m = m / (m.sum(axis=-2, keepdims=True) + eps)
    return m


def hc_params(X, fn, scale, base, n: int, iters: int, hc_eps: float, norm_eps: float):
    """(pre [B,S,n], post [B,S,n], comb [B,S,n,n]) in fp32."""
    mix = _mix(X, fn, norm_eps)
    scale = scale.astype(mx.float32)
    base = base.astype(mx.float32)
    pre = mx.sigmoid(mix[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2.0 * mx.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    comb = mix[..., 2 * n :] * scale[2] + base[2 * n :]
    comb = sinkhorn(comb.reshape(*comb.shape[:-1], n, n), iters, hc_eps)
    return pre, post, comb


def collapse(X: mx.array, pre: mx.array) -> mx.array:
    """sum_j pre_j X_j in fp32, cast to the streams' dtype -> [B, S, D]."""
    return (pre[..., None] * X.astype(mx.float32)).sum(axis=2).astype(X.dtype)


def expand(X: mx.array, F: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """X'_k = post_k F + sum_j comb[j, k] X_j, in fp32, cast to the streams' dtype."""
    mixed = comb.swapaxes(-1, -2) @ X.astype(mx.float32)  # [B, S, n, D]
    out = post[..., None] * F.astype(mx.float32)[..., None, :] + mixed
    return out.astype(X.dtype)


def hc_head(X, fn, scale, base, hc_eps: float, norm_eps: float) -> mx.array:
    """Final collapse (spec §4.3, last paragraph): sigmoid weights, no Sinkhorn, no post."""
    mix = _mix(X, fn, norm_eps)
    pre = mx.sigmoid(mix * scale.astype(mx.float32)[0] + base.astype(mx.float32)) + hc_eps
    return collapse(X, pre)
