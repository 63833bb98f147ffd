"""The decode step's FP8 KV store into the ring (`kernels.kv_store`, spec §4.13 item 2).

On any machine: the body compiled as C++ with the CPU-emulation dialect and run against the
ops path (the codec's encode + a slice update), bit for bit, on random values and on every
e4m3 rounding edge (ties between codes, subnormals, zeros, blocks whose maximum is below the
scale floor, values at 448 after scaling); the Metal source compiled as C++ against the
stand-in <metal_stdlib>; the CUDA source with nvcc where there is one; the dispatch. On a
GPU: the kernel against the ops path bit for bit, and a whole model with the kernel against
``DSV4_KV_STORE_KERNEL=ops``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_indexer_kernel import (CXX, NVCC, assert_common_subset, assert_metal_compiles,
                                 assert_nvcc_compiles)

from dsv4_mlx.cache import LayerCache
from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import kv_store as ks
from dsv4_mlx.kernels import kv_store_source as src
from dsv4_mlx.model.kv_formats import FP8KVCodec


def _edge_values(n, rng):
    """Values whose scaled form lands on e4m3 rounding edges: with a block maximum of 448 the
    scale is 2^0, so each value is rounded as it is."""
    codes = np.arange(256, dtype=np.uint8)
    grid = np.array(mx.from_fp8(mx.array(codes), dtype=mx.float32))
    grid = np.unique(grid[np.isfinite(grid)])
    mids = (grid[1:] + grid[:-1]) / 2
    pool = np.concatenate([grid, mids, np.nextafter(mids, np.inf, dtype=np.float32),
                           np.nextafter(mids, -np.inf, dtype=np.float32), [0.0, -0.0]])
    return rng.choice(pool.astype(np.float32), n)


def _ring_case(seed, B, W, C, R, kind):
    rng = np.random.default_rng(seed)
    codec = FP8KVCodec(C, R)
    old = rng.standard_normal((B, W, C)).astype(np.float32)
    ring = {k: np.array(v) for k, v in codec.encode(mx.array(old)).items()}
    kv = rng.standard_normal((B, 1, C)).astype(np.float32)
    nope, blk = codec.nope, codec.block
    if kind == "edges":
        kv[..., :nope] = _edge_values(B * nope, rng).reshape(B, 1, nope)
        kv[..., :nope:blk] = 448.0  # scale 2^0 in every block: the values round as they are
    elif kind == "tiny":  # block maxima below the 1e-4 floor, subnormal codes
        kv[..., :nope] *= 1e-6
    elif kind == "wide":  # very different block scales
        kv[..., :nope] *= np.repeat(10.0 ** rng.integers(-8, 8, (B, 1, nope // blk)), blk, axis=-1)
    return codec, ring, kv


def _ops_store(codec, ring, kv, slot, W):
    c = LayerCache(W, 0, kv.shape[-1], 0, codec.rope, "fp8")
    c.ring = {k: mx.array(v) for k, v in ring.items()}
    c.offset = slot
    c.update_ring(codec.encode(mx.array(kv)))
    return {k: np.array(v) for k, v in c.ring.items()}


def _emu_store(emu, codec, ring, kv, slot, tg):
    B, W, _ = ring["nope"].shape
    C = kv.shape[-1]
    out = emu.run(src.store_source("cpp"),
                  [kv.reshape(B, C), ring["nope"], ring["scale"], ring["rope"],
                   np.array([slot], np.int32)],
                  [ring["nope"].shape, ring["scale"].shape, ring["rope"].shape],
                  ["uint8", "uint8", "float32"],
                  [("KT", "float32"), ("C", C), ("NOPE", codec.nope), ("BLK", codec.block),
                   ("W", W), ("TG", tg)], (W * tg, B, 1), tg)
    return dict(zip(("nope", "scale", "rope"), out))


@pytest.mark.parametrize("B,W,C,R,slot,kind,tg", [
    (1, 16, 512, 64, 5, "random", 128), (2, 8, 512, 64, 7, "edges", 128),
    (1, 8, 512, 64, 0, "tiny", 64), (2, 4, 512, 64, 3, "wide", 128),
    (1, 8, 64, 16, 2, "edges", 32),  # tiny model: 48 non-RoPE dims, blocks of 16
    (1, 6, 42, 8, 1, "random", 32),  # 34 codes a row: not whole words, the byte-loop copy
])
def test_emulated_store_is_bit_exact(emu, B, W, C, R, slot, kind, tg):
    codec, ring, kv = _ring_case(B * 100 + W + C, B, W, C, R, kind)
    got = _emu_store(emu, codec, ring, kv, slot, tg)
    want = _ops_store(codec, ring, kv, slot, W)
    for k in ("nope", "scale", "rope"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the new slot changed, the others are the old ring
    assert not np.array_equal(got["nope"][:, slot], ring["nope"][:, slot])
    others = [w for w in range(W) if w != slot]
    np.testing.assert_array_equal(got["nope"][:, others], ring["nope"][:, others])


def test_emulated_store_can_fail(emu):
    """Not vacuous: the wrong slot is caught."""
    codec, ring, kv = _ring_case(1, 1, 8, 512, 64, "random")
    got = _emu_store(emu, codec, ring, kv, 3, 128)
    want = _ops_store(codec, ring, kv, 4, 8)
    assert not np.array_equal(got["nope"], want["nope"])


# --------------------------------------------------------------------------------------------
# Metal and CUDA sources

def _launch(dialect, kt):
    inputs = [(kt, 2, 512), ("uint8", 3, 128 * 448), ("uint8", 3, 128 * 7), (kt, 3, 128 * 64),
              ("int32", 1, 1)]
    return (src.store_source(dialect), inputs, ["uint8", "uint8", kt],
            [("KT", kt), ("C", 512), ("NOPE", 448), ("BLK", 64), ("W", 128), ("TG", ks.TG)])


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("kt", ["float32", "bfloat16", "float16"])
def test_metal_source_compiles_as_cpp(kt, tmp_path):
    assert_metal_compiles(_launch("metal", kt), tmp_path, f"kv_store_{kt}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    assert_nvcc_compiles(_launch("cuda", "bfloat16"), tmp_path, "kv_store")


# --------------------------------------------------------------------------------------------
# dispatch

def test_cpu_uses_ops(clean_dispatch):
    codec, ring, kv = _ring_case(2, 1, 8, 512, 64, "random")
    assert ks.kernel_backend({k: mx.array(v) for k, v in ring.items()}, mx.array(kv), codec) == "ops"
    c = LayerCache(8, 0, 512, 0, 64, "fp8")
    c.ring = {k: mx.array(v) for k, v in ring.items()}
    c.offset = 13
    c.store_token(mx.array(kv))
    want = _ops_store(codec, ring, kv, 13 % 8, 8)
    for k in want:
        np.testing.assert_array_equal(np.array(c.ring[k]), want[k])


def test_env_var_validated(clean_dispatch):
    clean_dispatch.setenv(ks.ENV_VAR, "tpu")
    codec, ring, kv = _ring_case(2, 1, 8, 512, 64, "random")
    with pytest.raises(ValueError, match=ks.ENV_VAR):
        ks.kernel_backend({k: mx.array(v) for k, v in ring.items()}, mx.array(kv), codec)


# --------------------------------------------------------------------------------------------
# on a GPU

GPU = dispatch.available_backends()
needs_gpu = pytest.mark.skipif(not GPU, reason="no Metal or CUDA backend in this MLX")


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["random", "edges", "tiny", "wide"])
def test_gpu_kernel_is_bit_exact(clean_dispatch, dtype, kind):
    codec, ring, kv = _ring_case(5, 2, 128, 512, 64, kind)
    dt = getattr(mx, dtype)
    with mx.stream(mx.gpu):
        r = {k: mx.array(v) for k, v in ring.items()}
        r["rope"] = r["rope"].astype(dt)
        x = mx.array(kv).astype(dt)
        got = ks.store_kernel(r, x, 77, codec, backend=GPU[0])
        c = LayerCache(128, 0, 512, 0, 64, "fp8")
        c.ring, c.offset = dict(r), 77
        c.update_ring(codec.encode(x))
        for k in ("nope", "scale", "rope"):
            np.testing.assert_array_equal(np.array(got[k].astype(mx.float32) if k == "rope" else got[k]),
                                          np.array(c.ring[k].astype(mx.float32) if k == "rope" else c.ring[k]),
                                          err_msg=k)


@needs_gpu
def test_gpu_model_with_kv_store_kernel_matches_ops(clean_dispatch):
    """A whole tiny model (fp32, prefill then decode, fp8 KV) with the store kernel against the
    same model with DSV4_KV_STORE_KERNEL=ops: the stored bytes are the same, so the logits are."""
    from conftest import gpu_logits_kernel_on_off

    got, want = gpu_logits_kernel_on_off(clean_dispatch, ks.ENV_VAR)
    np.testing.assert_array_equal(got, want)


def test_body_stays_in_the_common_subset():
    assert_common_subset(src.store_source("metal"))
