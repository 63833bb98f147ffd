"""One decode token's query and KV normalisation with RoPE (spec §4.5, §4.4): a Metal kernel
with a CUDA twin, and the ops path.

``norm_rope(q, kv, kv_norm, q_eps, rope, offset)``: q [1, 1, H*C] (`wq_b`'s output) and kv
[1, 1, C] (`wkv`'s) -> (q [1, H, 1, C], kv [1, 1, C]): the per-head unweighted RMSNorm of the
query, `kv_norm` on the KV, then RoPE at position `offset` on both. On the GPU one launch
(`norm_rope_source`) instead of four; on the CPU, or with ``DSV4_NORM_ROPE_KERNEL=ops``, the
`mx.fast` ops the attention uses for any number of tokens.
"""

from __future__ import annotations

import mlx.core as mx

from ..model.layers import rms_norm_0
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
    eps = dispatch.const(("f32_2", q_eps, kv_norm.eps),
                         lambda: mx.array([q_eps, kv_norm.eps], mx.float32))
    with mx.stream(mx.gpu):
        qo, kvo = dispatch.build_kernel(backend, src.norm_rope_source(backend))(
            inputs=[q, kv, kv_norm.weight.astype(q.dtype), rope.inv_freq_f32(),
                    dispatch.position(offset), eps],
            template=[("XT", q.dtype), ("H", H), ("C", C), ("RD", rope.dims), ("PER", per),
                      ("TG", tg), ("P2", p2)],
            grid=((H + 1) * tg, 1, 1), threadgroup=(tg, 1, 1),
            output_shapes=[(1, H, 1, C), (1, 1, C)], output_dtypes=[q.dtype, q.dtype],
        )
    return qo, kvo


def _backend(q, kv, rope) -> str:
    backend = dispatch.select_backend(ENV_VAR)
    C = kv.shape[-1]
    if (backend == "ops" or q.dtype not in _FLOATS or kv.dtype != q.dtype or q.size != q.shape[-1]
            or kv.size != C or q.shape[-1] % C or launch_shape(C) is None or rope.dims > C
            or rope.dims % 2):
        return "ops"
    H = q.shape[-1] // C
    key = f"{backend}/norm_rope/{q.dtype}/H{H}/C{C}/R{rope.dims}"

    def probe():
        class _Norm:
            weight, eps = mx.ones((C,)), 1e-6

        mx.eval(norm_rope_kernel(mx.zeros((1, 1, H * C), q.dtype), mx.zeros((1, 1, C), q.dtype),
                                 _Norm(), 1e-6, rope, 0, backend=backend))

    return backend if dispatch.kernel_usable(key, probe, f"norm + RoPE ({backend})") else "ops"


def norm_rope(q, kv, kv_norm, q_eps: float, rope, offset: int):
    """(q [1, H, 1, C], kv [1, 1, C]); see the module docstring."""
    backend = _backend(q, kv, rope)
    if backend != "ops":
        return norm_rope_kernel(q, kv, kv_norm, q_eps, rope, offset, backend=backend)
    return norm_rope_ops(q, kv, kv_norm, q_eps, rope, offset)


__all__ = ["norm_rope", "norm_rope_ops", "norm_rope_kernel", "launch_shape", "ENV_VAR"]
