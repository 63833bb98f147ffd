"""One-query attention with sinks over the stored KV (spec §4.8): a Metal kernel with a CUDA
twin, and the ops path.

A decode step attends from one query to the window ring's slots and the compressed keys
(every entry of an HCA layer, the indexer's picks of a CSA layer). The ops path decodes the
ring, gathers and decodes the picks, concatenates them and runs `mx.fast.
scaled_dot_product_attention` with sinks, which for 512-dim heads has no fused kernel on
either GPU backend (MLX composes it from ~15 primitives). The kernels read the stored form
(FP8 codes and scales, or plain values) and the pick indices directly: two launches (the
key splits, then their combination with the sink).

``DSV4_ATTN_KERNEL=auto|metal|cuda|ops`` chooses, as ``DSV4_INDEXER_KERNEL`` does for the
indexer (`dispatch`); a kernel that fails to build warns once and falls back.
"""

from __future__ import annotations

from typing import Dict, Optional

import mlx.core as mx

from ..model.kv_formats import FP8KVCodec, PlainCodec
from . import attention_source as src
from . import dispatch

ENV_VAR = "DSV4_ATTN_KERNEL"
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def kv_mode(codec) -> Optional[str]:
    """The kernel's layout for a KV codec's stored parts, or None if it has none (the FP4
    index codec shares the format name "fp8" but not the layout)."""
    if isinstance(codec, FP8KVCodec):
        return "fp8"
    if isinstance(codec, PlainCodec):
        return "plain"
    return None


def _arrays(mode: str, parts: Dict[str, mx.array]):
    if mode == "fp8":
        return [parts["nope"], parts["scale"], parts["rope"]]
    return [parts["kv"]]


TG = 128        # threads a group of the split kernel: TG / 32 warps, one key a warp at a time
HG = 2          # heads a group (each lane holds 2 x HG x C / 32 floats in registers)
SPL = 64        # keys a split
# keys a warp loads at once (all in flight before the math): 1 measured best over the six cases
# of bench/attention.py once the loads of a round were issued together (H100, ncu, split
# kernel: 492 us in all vs 511 for 2 and 555 for 4; bench/results/attention_ncu_20261207d.log)
KU = 1
# the next round's loads issued during this round's math (0: each round loads, then computes):
# off until measured (bench/attention.py --pf 0,1 under ncu)
PF = 0
COMBINE_TG = 128
# Past this many compressed keys (dense HCA entries, ~256K tokens of context at rate 128) the
# ops path's matmuls beat the kernel's split loop on an H100 (bench/attention.py: kernel
# 1.6x faster with 512 dense entries, 2x slower with 8192); the kernel serves up to here.
MAX_COMPRESSED_KEYS = 2048


def shared_bytes(C: int, tg: int = TG, hg: int = HG, spl: int = SPL) -> int:
    """Shared (threadgroup) memory of the split kernel for head dim C."""
    return 4 * (spl + 2 * (tg // 32) * hg + hg * C)


def num_splits(nkeys: int, spl: int = SPL) -> int:
    return max(1, -(-nkeys // spl))


def sink_decode_kernel(q, ring, nring: int, comp, ncomp: int, idx, sinks, scale: float, *,
                       mode: str, nope: int, block: int, backend: str, rope=None, offset: int = 0,
                       out_shape=None, tg: int = None, hg: int = None, spl: int = None,
                       ku: int = None, pf: int = None):
    """q [B, H, 1, C]; ring: stored parts [B, W, ...]; comp: stored parts [B, CAP, ...] (or
    None); idx [B, k] int32 picks (None: the first `ncomp` entries, dense); sinks [H].
    -> [B, H, 1, C] in q's dtype, through the inverse of `rope` at position `offset` if
    given; `out_shape`: another shape of the same row-major output (the grouped output
    projection's [G, 1, H C / G] for one token: no reshape node). Two launches: the splits,
    then their combination (with the inverse RoPE).
    ``tg``, ``hg``, ``spl``, ``ku``, ``pf``: launch parameters (threads, heads and keys a
    group, keys a warp at once, the next round's loads during this round's math; default the
    module's `TG`, `HG`, `SPL`, `KU`, `PF`), for tuning."""
    tg, hg, spl, ku = tg or TG, hg or HG, spl or SPL, ku or KU
    pf = PF if pf is None else int(bool(pf))
    B, H, _, C = q.shape
    ring_a = _arrays(mode, ring)
    W = ring_a[0].shape[1]
    comp_a = _arrays(mode, comp) if comp is not None else ring_a
    if [x.dtype for x in comp_a] != [x.dtype for x in ring_a]:  # (one pointer type each)
        raise ValueError("the ring and the compressed keys must be stored in the same dtypes, "
                         f"got {[x.dtype for x in ring_a]} and {[x.dtype for x in comp_a]}")
    if comp is None:
        ncomp = 0
    sparse = idx is not None
    if sparse:
        ncomp = idx.shape[-1]
    else:
        idx = dispatch.unused(mx.int32)
    S = num_splits(W + ncomp, spl)
    NG = -(-H // hg)
    meta = mx.array([nring, ncomp], mx.int32)  # 8 bytes: see the kernel's note on host arrays
    fp = dispatch.vector(scale)
    split = dispatch.launch(
        ("attn_split", backend, mode, q.dtype, q.shape, ring_a[-1].dtype, W, nope, block, tg, hg,
         spl, ku, pf, sparse, S),
        lambda: dispatch.Launch(
            backend, src.decode_source(backend, mode),
            template=[("QT", q.dtype), ("KV", ring_a[-1].dtype), ("C", C), ("NOPE", nope),
                      ("BLK", block), ("W", W), ("TG", tg), ("HG", hg), ("SPL", spl),
                      ("KU", ku), ("SPARSE", sparse), ("PF", pf)],
            grid=(NG * S * tg, B, 1), threadgroup=(tg, 1, 1),
            output_shapes=[(B, H, S), (B, H, S), (B, H, S, C)],
            output_dtypes=[mx.float32] * 3))
    pm, pl, pacc = split([q, *ring_a, *comp_a, idx, meta, fp])
    if rope is None:
        invf, pos = dispatch.unused(), dispatch.unused(mx.int32)
    else:
        invf, pos = rope.inv_freq_f32(), dispatch.position(offset)
    rd = 0 if rope is None else rope.dims
    oshape = tuple(out_shape or (B, H, 1, C))
    combine = dispatch.launch(
        ("attn_combine", backend, q.dtype, B, H, C, S, rd, oshape),
        lambda: dispatch.Launch(
            backend, src.combine_source(backend),
            template=[("QT", q.dtype), ("C", C), ("TG", COMBINE_TG), ("RD", rd)],
            grid=(H * COMBINE_TG, B, 1), threadgroup=(COMBINE_TG, 1, 1),
            output_shapes=[oshape], output_dtypes=[q.dtype]))
    (o,) = combine([pm, pl, pacc, sinks.astype(mx.float32), invf, pos])
    return o


def _codec_consts(codec):
    if isinstance(codec, FP8KVCodec):
        return codec.nope, codec.block
    return 0, 1


def kernel_backend(q, codec, ncomp: int = 0, rope=None) -> str:
    """``"metal"``/``"cuda"`` if the kernel serves this query, KV format and number of
    compressed keys (and the inverse of `rope`, if given), else ``"ops"``."""
    backend = dispatch.select_backend(ENV_VAR)
    mode = kv_mode(codec)
    if backend == "ops" or mode is None or q.dtype not in _FLOATS or ncomp > MAX_COMPRESSED_KEYS:
        return "ops"
    C = q.shape[-1]
    nope, block = _codec_consts(codec)
    if C % 4 or (mode == "fp8" and (nope % 4 or block % 4)):  # it loads 4 dims at a time
        return "ops"
    rd = 0 if rope is None else rope.dims
    if rd % 2 or rd > C:
        return "ops"
    key = (backend, "attn", mode, q.dtype, C, nope, block, rd)

    def probe():
        qq = mx.zeros((1, 1, 1, C), q.dtype)
        ring = codec.encode(mx.ones((1, 2, C), q.dtype))
        o = sink_decode_kernel(qq, ring, 2, ring, 1, mx.zeros((1, 1), mx.int32), mx.zeros((1,)),
                               1.0, mode=mode, nope=nope, block=block, backend=backend,
                               rope=rope, offset=1)
        mx.eval(o)

    return backend if dispatch.kernel_usable(key, probe, f"decode attention ({backend})") else "ops"


def sink_decode(q, ring, nring: int, comp, ncomp: int, idx, sinks, scale: float, codec,
                backend: str, **launch):
    """The kernel path for a `kernel_backend` result other than ``"ops"``; ``launch``: the
    other keywords of `sink_decode_kernel` (``rope``/``offset``, launch overrides)."""
    nope, block = _codec_consts(codec)
    return sink_decode_kernel(q, ring, nring, comp, ncomp, idx, sinks, scale, mode=kv_mode(codec),
                              nope=nope, block=block, backend=backend, **launch)


__all__ = ["ENV_VAR", "kernel_backend", "sink_decode", "sink_decode_kernel", "kv_mode"]
