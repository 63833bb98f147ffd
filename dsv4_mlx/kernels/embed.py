"""The token embedding into the mHC streams (spec §4.1, §4.2): a Metal kernel with a CUDA
twin, and the ops path.

``embed_streams(embed, ids, n)`` -> X [B, S, n, D]: each token's embedding row in all n
residual streams. On the GPU one launch (`embed_source`) for a plain or an affine-quantized
table (MLX's `QuantizedEmbedding`); on the CPU, or with ``DSV4_EMBED_KERNEL=ops``, the
embedding layer and a broadcast.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import dispatch
from . import embed_source as src

ENV_VAR = "DSV4_EMBED_KERNEL"
TG = 256
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def embed_streams_ops(embed, ids, n: int):
    h = embed(ids)
    B, S, D = h.shape
    return mx.broadcast_to(h[:, :, None, :], (B, S, n, D))


def _quantized(embed) -> bool:
    return isinstance(embed, nn.QuantizedEmbedding)


def embed_streams_kernel(embed, ids, n: int, *, backend: str):
    """Kernel path of `embed_streams` (ids int32 or uint32)."""
    q = _quantized(embed)
    if q:
        D = embed.weight.shape[-1] * 32 // embed.bits
        dt = embed.scales.dtype
        inputs = [ids, embed.weight, embed.scales, embed.biases]
        tmpl = [("XT", dt), ("D", D), ("NS", n), ("TG", TG), ("BITS", embed.bits),
                ("GS", embed.group_size)]
    else:
        D, dt = embed.weight.shape[-1], embed.weight.dtype
        inputs = [ids, embed.weight]
        tmpl = [("XT", dt), ("D", D), ("NS", n), ("TG", TG)]
    with mx.stream(mx.gpu):
        (X,) = dispatch.build_kernel(backend, src.embed_source(backend, q))(
            inputs=inputs, template=tmpl,
            grid=(-(-D // TG) * TG, ids.size, 1), threadgroup=(TG, 1, 1),
            output_shapes=[(*ids.shape, n, D)], output_dtypes=[dt],
        )
    return X


def _backend(embed, ids) -> str:
    backend = dispatch.select_backend(ENV_VAR)
    if backend == "ops" or ids.dtype not in (mx.int32, mx.uint32):  # (mlx-lm samples uint32)
        return "ops"
    if _quantized(embed):
        if (embed.mode != "affine" or embed.get("biases") is None or embed.bits not in (2, 4, 8)
                or embed.scales.dtype not in _FLOATS or embed.biases.dtype != embed.scales.dtype
                or embed.weight.dtype != mx.uint32):
            return "ops"
        key = (backend, "embed", embed.bits, embed.group_size, embed.scales.dtype)
    elif isinstance(embed, nn.Embedding) and embed.weight.dtype in _FLOATS:
        key = (backend, "embed", embed.weight.dtype)
    else:
        return "ops"

    def probe():
        mx.eval(embed_streams_kernel(embed, mx.zeros((1, 1), mx.int32), 2, backend=backend))

    return backend if dispatch.kernel_usable(key, probe, f"embedding ({backend})") else "ops"


def embed_streams(embed, ids, n: int):
    """X [*ids.shape, n, D]; see the module docstring."""
    backend = _backend(embed, ids)
    if backend != "ops":
        return embed_streams_kernel(embed, ids, n, backend=backend)
    return embed_streams_ops(embed, ids, n)


__all__ = ["embed_streams", "embed_streams_ops", "embed_streams_kernel", "ENV_VAR"]
