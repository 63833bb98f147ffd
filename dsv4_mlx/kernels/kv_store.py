"""The decode step's KV store into the window ring (spec §4.13 item 2): a Metal kernel with a
CUDA twin, and the ops path.

``store_token(cache_ring, kv, slot, codec)`` -> the new ring parts, with one token's KV
[B, 1, C] encoded into slot `slot`. For the FP8 layout on a GPU one launch
(`kv_store_source`) replaces the encode chain (~9 launches) and the three slice updates; the
bf16 layout, the CPU, and ``DSV4_KV_STORE_KERNEL=ops`` take the ops path (the codec's encode
and a slice update).
"""

from __future__ import annotations

from typing import Dict

import mlx.core as mx

from ..model.kv_formats import FP8KVCodec
from . import dispatch
from . import kv_store_source as src

ENV_VAR = "DSV4_KV_STORE_KERNEL"
TG = 128
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def store_kernel(ring: Dict[str, mx.array], kv: mx.array, slot: int, codec: FP8KVCodec, *,
                 backend: str) -> Dict[str, mx.array]:
    """Kernel path: ring parts {nope [B, W, NOPE] u8, scale [B, W, NB] u8, rope [B, W, R]},
    kv [B, 1, C] -> the new parts."""
    codes, scl, rope = ring["nope"], ring["scale"], ring["rope"]
    B, W, _ = codes.shape
    C = kv.shape[-1]
    with mx.stream(mx.gpu):
        oc, os_, orope = dispatch.build_kernel(backend, src.store_source(backend))(
            inputs=[kv, codes, scl, rope, mx.array([slot], mx.int32)],
            template=[("KT", kv.dtype), ("C", C), ("NOPE", codec.nope), ("BLK", codec.block),
                      ("W", W), ("TG", TG)],
            grid=(W * TG, B, 1), threadgroup=(TG, 1, 1),
            output_shapes=[codes.shape, scl.shape, rope.shape],
            output_dtypes=[codes.dtype, scl.dtype, rope.dtype],
        )
    return {"nope": oc, "scale": os_, "rope": orope}


def kernel_backend(ring, kv, codec) -> str:
    """``"metal"``/``"cuda"`` if the kernel serves this store, else ``"ops"``."""
    backend = dispatch.select_backend(ENV_VAR)
    if (backend == "ops" or not isinstance(codec, FP8KVCodec) or ring is None
            or kv.shape[1] != 1 or kv.dtype not in _FLOATS or ring["rope"].dtype != kv.dtype):
        return "ops"
    C, W = kv.shape[-1], ring["nope"].shape[1]
    key = (backend, "kv_store", kv.dtype, C, codec.nope, codec.block, W)

    def probe():
        r = {"nope": mx.zeros((1, W, codec.nope), mx.uint8),
             "scale": mx.zeros((1, W, codec.nope // codec.block), mx.uint8),
             "rope": mx.zeros((1, W, C - codec.nope), kv.dtype)}
        mx.eval(store_kernel(r, mx.zeros((1, 1, C), kv.dtype), 0, codec, backend=backend))

    return backend if dispatch.kernel_usable(key, probe, f"KV store ({backend})") else "ops"


__all__ = ["store_kernel", "kernel_backend", "ENV_VAR"]
