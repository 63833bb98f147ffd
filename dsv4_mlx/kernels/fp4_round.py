"""The FP4 round trip of the indexer's queries (spec §4.13 item 3): a Metal kernel with a
CUDA twin, and the ops path.

``query_roundtrip(q, codec, shape)`` is ``codec.roundtrip(q)`` reshaped to `shape`: for the
FP4 indexer codec, the Hadamard rotation then FP4 e2m1 with per-block power-of-two scales
and back. On a GPU the rotation stays MLX's ``hadamard_transform`` and the rest is one
launch (`fp4_round_source`, bit-identical); the output is written in `shape` directly (a
decode step's [B, H, 1, D] rotary layout is already [B, 1, H, D] in memory). Other codecs,
the CPU and ``DSV4_FP4_KERNEL=ops`` take the codec's compiled ops.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..model.kv_formats import FP4IndexCodec
from . import dispatch
from . import fp4_round_source as src

ENV_VAR = "DSV4_FP4_KERNEL"
TG = 256
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def roundtrip_kernel(h: mx.array, dtype, block: int, shape, *, backend: str) -> mx.array:
    """Kernel path: rotated values h (fp32, any shape, blocks of `block` along the flat
    order) -> the round trip in `dtype` and `shape`."""
    n = h.size
    if h.ndim != 4:  # the kernel reads its size from a 4-D shape (the queries' own)
        h = h.reshape(1, 1, 1, n)
    with mx.stream(mx.gpu):
        (y,) = dispatch.build_kernel(backend, src.round_source(backend))(
            inputs=[h],
            template=[("XT", h.dtype), ("OT", dtype), ("BLK", block), ("TG", TG)],
            grid=(-(-n // TG) * TG, 1, 1), threadgroup=(TG, 1, 1),
            output_shapes=[tuple(shape)], output_dtypes=[dtype],
        )
    return y


def kernel_backend(q, codec) -> str:
    """``"metal"``/``"cuda"`` if the kernel serves this round trip, else ``"ops"``."""
    backend = dispatch.select_backend(ENV_VAR)
    if (backend == "ops" or not isinstance(codec, FP4IndexCodec) or q.dtype not in _FLOATS
            or TG % codec.block or q.size == 0):
        return "ops"
    key = (backend, "fp4_round", q.dtype, codec.block)

    def probe():
        mx.eval(roundtrip_kernel(mx.ones((2 * codec.block,), mx.float32), q.dtype, codec.block,
                                 (2 * codec.block,), backend=backend))

    return backend if dispatch.kernel_usable(key, probe, f"FP4 round trip ({backend})") else "ops"


def query_roundtrip(q: mx.array, codec, shape=None) -> mx.array:
    """``codec.roundtrip(q).reshape(shape)`` (`shape` None: q's own)."""
    shape = q.shape if shape is None else tuple(shape)
    backend = kernel_backend(q, codec)
    if backend == "ops":
        y = codec.roundtrip(q)
        return y if y.shape == shape else y.reshape(shape)
    # the rotation exactly as `kv_formats.hadamard` computes it, before its cast back
    h = mx.hadamard_transform(q.astype(mx.float32), scale=1.0 / math.sqrt(q.shape[-1]))
    return roundtrip_kernel(h, q.dtype, codec.block, shape, backend=backend)


__all__ = ["query_roundtrip", "roundtrip_kernel", "kernel_backend", "ENV_VAR"]
