"""Lightning-indexer scoring and top-k (spec §4.7): the function a custom kernel replaces.

``score[t, w] = sum_h wI[t, h] * relu(qI[t, h] . KI[w])`` over visible entries
``w < visible[t]``; invisible entries score -inf; the top-k selection keeps
``k = min(topk, N)`` entries and marks any invisible pick as -1.

This module holds the pure-MLX-ops path. The Metal and CUDA kernels (a later issue) plug in
behind `indexer_topk` with the same signature and semantics.
"""

from __future__ import annotations

import mlx.core as mx


def indexer_scores_ops(q: mx.array, w: mx.array, keys: mx.array) -> mx.array:
    """q [B, T, H, d], w [B, T, H] (already scaled), keys [B, N, d] -> scores [B, T, N] fp32."""
    q = q.astype(mx.float32)
    keys = keys.astype(mx.float32)
    s = q @ keys[:, None].swapaxes(-1, -2)  # [B, T, H, N]
    s = mx.maximum(s, 0.0) * w.astype(mx.float32)[..., None]
    return s.sum(axis=2)


def indexer_topk_ops(
    q: mx.array, w: mx.array, keys: mx.array, visible: mx.array, topk: int
) -> mx.array:
    """Top-k entry indices per query, [B, T, k] int32, -1 where the pick is not visible.

    `visible` [T] (int32): the number of entries query t may see.
    """
    N = keys.shape[1]
    k = min(topk, N)
    idx_range = mx.arange(N)
    invisible = idx_range[None, :] >= visible[:, None]  # [T, N]
    if k == N:
        # every entry is selected; only visibility matters
        idx = mx.broadcast_to(idx_range.astype(mx.int32), (q.shape[0], q.shape[1], N))
    else:
        scores = indexer_scores_ops(q, w, keys)
        scores = mx.where(invisible[None], -mx.inf, scores)
        idx = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
    return mx.where(idx >= visible[None, :, None], -1, idx)


def indexer_topk(q, w, keys, visible, topk):
    """Dispatch point: the pure-ops path until the GPU kernels land."""
    return indexer_topk_ops(q, w, keys, visible, topk)
