"""One decode token's query and KV normalisation with RoPE (spec §4.5, §4.4): a Metal kernel
with a CUDA twin, and the ops path.

``norm_rope(q, kv, kv_norm, q_eps, rope, offset)``: q [1, 1, H*C] (`wq_b`'s output) and kv
[1, 1, C] (`wkv`'s) -> (q [1, H, 1, C], kv [1, 1, C]): the per-head unweighted RMSNorm of the
query, `kv_norm` on the KV, then RoPE at position `offset` on both. On the GPU one launch
(`norm_rope_source`) instead of four -- and with the FP8 window ring, the same launch also
stores the KV into it (instead of the KV store kernel); on the CPU, or with
``DSV4_NORM_ROPE_KERNEL=ops``, the `mx.fast` ops the attention uses for any number of tokens.
"""

from __future__ import annotations

import mlx.core as mx

from ..model.kv_formats import FP8KVCodec
from ..model.layers import RMSNorm, rms_norm_0
from . import dispatch
from . import norm_rope_source as src

ENV_VAR = "DSV4_NORM_ROPE_KERNEL"
MAX_TG = 128
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def launch_shape(C: int) -> tuple[int, int, int] | None:
    """(PER, TG, P2) for rows of C values: PER (even) contiguous values a thread, TG = C / PER
    threads (at most `MAX_TG`), P2 the power of two >= TG; None if C has no such split."""
    for per in range(2, 65, 2):
        if C % per == 0 and C // per <= MAX_TG:
            tg = C // per
            return per, tg, 1 << (tg - 1).bit_length()
    return None


def norm_rope_ops(q, kv, kv_norm, q_eps: float, rope, offset: int):
    """The ops path of `norm_rope` (the attention's own ops for one token)."""
    C = kv.shape[-1]
    B = q.shape[0]
    qh = rms_norm_0(q.reshape(B, q.shape[-1] // C, 1, C), q_eps)
    return rope(qh, offset=offset), rope(kv_norm(kv), offset=offset)


def norm_rope_kernel(q, kv, kv_norm, q_eps: float, rope, offset: int, *, backend: str):
    """Kernel path of `norm_rope` (one token: q [1, 1, H*C], kv [1, 1, C], the same dtype)."""
    C = kv.shape[-1]
    H = q.shape[-1] // C
    per, tg, p2 = launch_shape(C)
    eps = dispatch.vector(q_eps, kv_norm.eps)
    go = dispatch.launch(
        ("norm_rope", backend, q.dtype, H, C, rope.dims),
        lambda: dispatch.Launch(
            backend, src.norm_rope_source(backend),
            template=[("XT", q.dtype), ("H", H), ("C", C), ("RD", rope.dims), ("PER", per),
                      ("TG", tg), ("P2", p2)],
            grid=((H + 1) * tg, 1, 1), threadgroup=(tg, 1, 1),
            output_shapes=[(1, H, 1, C), (1, 1, C)], output_dtypes=[q.dtype, q.dtype]))
    qo, kvo = go([q, kv, kv_norm.weight.astype(q.dtype), rope.inv_freq_f32(),
                  dispatch.position(offset), eps])
    return qo, kvo


def norm_rope_store_kernel(q, kv, kv_norm, q_eps: float, rope, offset: int, ring, codec, *,
                           backend: str):
    """The store variant: (q [1, H, 1, C], the new ring parts) with the KV written into slot
    ``offset % W`` of the FP8 window ring {nope [1, W, NOPE] u8, scale, rope [1, W, R]}."""
    C = kv.shape[-1]
    H = q.shape[-1] // C
    per, tg, p2 = launch_shape(C)
    codes, scl, rp = ring["nope"], ring["scale"], ring["rope"]
    W = codes.shape[1]
    eps = dispatch.vector(q_eps, kv_norm.eps)
    go = dispatch.launch(
        ("norm_rope_store", backend, q.dtype, H, C, rope.dims, codec.nope, codec.block,
         codes.shape, codes.dtype, scl.shape, scl.dtype, rp.shape, rp.dtype),
        lambda: dispatch.Launch(
            backend, src.norm_rope_source(backend, True),
            template=[("XT", q.dtype), ("H", H), ("C", C), ("RD", rope.dims), ("PER", per),
                      ("TG", tg), ("P2", p2), ("NOPE", codec.nope), ("BLK", codec.block),
                      ("W", W)],
            grid=((H + W) * tg, 1, 1), threadgroup=(tg, 1, 1),
            output_shapes=[(1, H, 1, C), codes.shape, scl.shape, rp.shape],
            output_dtypes=[q.dtype, codes.dtype, scl.dtype, rp.dtype]))
    qo, oc, os_, orope = go([q, kv, kv_norm.weight.astype(q.dtype), rope.inv_freq_f32(),
                             dispatch.position(offset), eps, codes, scl, rp])
    return qo, {"nope": oc, "scale": os_, "rope": orope}


def _backend(q, kv, rope) -> str:
    backend = dispatch.select_backend(ENV_VAR)
    C = kv.shape[-1]
    if (backend == "ops" or q.dtype not in _FLOATS or kv.dtype != q.dtype or q.size != q.shape[-1]
            or kv.size != C or q.shape[-1] % C or launch_shape(C) is None or rope.dims > C
            or rope.dims % 2):
        return "ops"
    H = q.shape[-1] // C
    key = (backend, "norm_rope", q.dtype, H, C, rope.dims)

    def probe():
        mx.eval(norm_rope_kernel(mx.zeros((1, 1, H * C), q.dtype), mx.zeros((1, 1, C), q.dtype),
                                 RMSNorm(C), 1e-6, rope, 0, backend=backend))

    return backend if dispatch.kernel_usable(key, probe, f"norm + RoPE ({backend})") else "ops"


def _store_backend(q, kv, rope, cache) -> str:
    """The backend of the store variant for this decode step's `cache`, or "ops": it needs
    the plain variant's conditions, the FP8 ring, and the KV store kernel (which it replaces,
    ``DSV4_KV_STORE_KERNEL``) to apply."""
    from . import kv_store

    backend = _backend(q, kv, rope)
    ring, codec = cache.ring, cache.codec
    if (backend == "ops" or not isinstance(codec, FP8KVCodec) or ring is None
            or ring["nope"].shape[0] != 1 or codec.nope % 2 or codec.nope + codec.rope != kv.shape[-1]
            or kv_store.kernel_backend(ring, kv, codec) == "ops"):
        return "ops"
    C, W = kv.shape[-1], ring["nope"].shape[1]
    H = q.shape[-1] // C
    key = (backend, "norm_rope_store", q.dtype, H, C, rope.dims, codec.nope, codec.block, W)

    def probe():
        r = {"nope": mx.zeros((1, W, codec.nope), mx.uint8),
             "scale": mx.zeros((1, W, codec.nope // codec.block), mx.uint8),
             "rope": mx.zeros((1, W, C - codec.nope), q.dtype)}
        mx.eval(norm_rope_store_kernel(mx.zeros((1, 1, H * C), q.dtype),
                                       mx.zeros((1, 1, C), q.dtype), RMSNorm(C), 1e-6, rope, 1, r,
                                       codec, backend=backend))

    ok = dispatch.kernel_usable(key, probe, f"norm + RoPE + KV store ({backend})")
    return backend if ok else "ops"


def norm_rope(q, kv, kv_norm, q_eps: float, rope, offset: int, cache=None):
    """(q [1, H, 1, C], kv [1, 1, C]); see the module docstring. With the decode step's
    `cache` (a `LayerCache` at position `offset`) the KV may go straight into its FP8 ring in
    the same launch: then kv comes back as None and ``cache.ring`` holds the new ring."""
    if cache is not None:
        backend = _store_backend(q, kv, rope, cache)
        if backend != "ops":
            qo, cache.ring = norm_rope_store_kernel(q, kv, kv_norm, q_eps, rope, offset,
                                                    cache.ring, cache.codec, backend=backend)
            return qo, None
    backend = _backend(q, kv, rope)
    if backend != "ops":
        return norm_rope_kernel(q, kv, kv_norm, q_eps, rope, offset, backend=backend)
    return norm_rope_ops(q, kv, kv_norm, q_eps, rope, offset)


__all__ = ["norm_rope", "norm_rope_ops", "norm_rope_kernel", "norm_rope_store_kernel",
           "launch_shape", "ENV_VAR"]
