"""The FP4 round trip of indexer queries (`kernels.fp4_round`, spec §4.13 item 3).

On any machine: the body compiled as C++ with the CPU-emulation dialect and run against the
ops path's FP4 encode and decode, bit for bit, on random values and on every e2m1 rounding
edge (ties between codes, zeros and negative zeros, blocks whose maximum is below the scale
floor, values clipped at 6, very different block scales, a partial last group); the Metal
source compiled as C++ against the stand-in <metal_stdlib>; the CUDA source with nvcc where
there is one; the dispatch. On a GPU: the kernel path against the codec's round trip bit for
bit, and a whole model with the kernel against ``DSV4_FP4_KERNEL=ops``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_indexer_kernel import (CXX, NVCC, assert_common_subset, assert_metal_compiles,
                                 assert_nvcc_compiles)

from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import fp4_round as fr
from dsv4_mlx.kernels import fp4_round_source as src
from dsv4_mlx.model.kv_formats import FP4IndexCodec, FP8KVCodec, fp4_decode, fp4_encode

GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def _edge_values(n, rng):
    """Values on and around the e2m1 rounding edges (as they are when the block's scale is
    2^0), with their signs, and zeros of both signs."""
    mids = (GRID[1:] + GRID[:-1]) / 2
    pool = np.concatenate([GRID, mids, np.nextafter(mids, np.float32(np.inf)),
                           np.nextafter(mids, np.float32(-np.inf))]).astype(np.float32)
    v = rng.choice(pool, n) * rng.choice(np.array([1.0, -1.0], np.float32), n)
    v[rng.random(n) < 0.05] = -0.0
    return v.astype(np.float32)


def _case(seed, n, block, kind):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    if kind == "edges":
        x = _edge_values(n, rng)
        x[::block] = 6.0  # scale 2^0 in every block: the values round as they are
        x[block + 1], x[2 * block + 1] = 6.5, -1e3  # but two blocks clip / rescale
    elif kind == "tiny":  # block maxima below the 6 * 2^-126 floor, and exact zeros
        x *= np.float32(1e-39)
        x[: 2 * block] = 0.0
    elif kind == "wide":  # very different block scales
        x *= np.repeat(10.0 ** rng.integers(-30, 30, n // block), block).astype(np.float32)
    return x


def _ops(x, block):
    p, s = fp4_encode(mx.array(x)[None], block)
    return np.array(fp4_decode(p, s, block, mx.float32))[0]


def _emu(emu, x, block, tg):
    n = x.size
    (y,) = emu.run(src.round_source("cpp"), [x.reshape(1, 1, 1, n)], [(n,)], ["float32"],
                   [("XT", "float32"), ("OT", "float32"), ("BLK", block), ("TG", tg)],
                   (-(-n // tg) * tg, 1, 1), tg)
    return y


@pytest.mark.parametrize("n,block,kind,tg", [
    (8192, 32, "random", 256), (4096, 32, "edges", 256), (2048, 32, "tiny", 256),
    (4096, 32, "wide", 256), (32 * 37, 32, "random", 256),  # a partial last group
    (16 * 40, 16, "edges", 64),  # tiny models: blocks of 16
])
def test_emulated_roundtrip_is_bit_exact(emu, n, block, kind, tg):
    x = _case(n + block, n, block, kind)
    got, want = _emu(emu, x, block, tg), _ops(x, block)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # -0 too


def test_emulated_roundtrip_can_fail(emu):
    """Not vacuous: a shifted block size is caught."""
    x = _case(1, 4096, 32, "wide")
    assert not np.array_equal(_emu(emu, x, 16, 256), _ops(x, 32))


def test_query_roundtrip_ops_path_is_the_codec():
    codec = FP4IndexCodec(128)
    q = mx.array(np.random.default_rng(3).standard_normal((1, 4, 1, 128)).astype(np.float32))
    got = fr.query_roundtrip(q, codec, (1, 1, 4, 128))
    np.testing.assert_array_equal(np.array(got), np.array(codec.roundtrip(q)).reshape(1, 1, 4, 128))


# --------------------------------------------------------------------------------------------
# Metal and CUDA sources

def _launch(dialect, ot):
    return (src.round_source(dialect), [("float32", 4, 8192)], [ot],
            [("XT", "float32"), ("OT", ot), ("BLK", 32), ("TG", fr.TG)])


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("ot", ["float32", "bfloat16", "float16"])
def test_metal_source_compiles_as_cpp(ot, tmp_path):
    assert_metal_compiles(_launch("metal", ot), tmp_path, f"fp4_round_{ot}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    assert_nvcc_compiles(_launch("cuda", "bfloat16"), tmp_path, "fp4_round")


def test_body_stays_in_the_common_subset():
    assert_common_subset(src.round_source("metal"))


# --------------------------------------------------------------------------------------------
# dispatch

def test_cpu_and_other_codecs_use_ops(clean_dispatch):
    q = mx.zeros((1, 1, 4, 128))
    assert fr.kernel_backend(q, FP4IndexCodec(128)) == "ops"
    assert fr.kernel_backend(q, FP8KVCodec(128, 64)) == "ops"


def test_env_var_validated(clean_dispatch):
    clean_dispatch.setenv(fr.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=fr.ENV_VAR):
        fr.kernel_backend(mx.zeros((1, 1, 4, 128)), FP4IndexCodec(128))


# --------------------------------------------------------------------------------------------
# on a GPU

GPU = dispatch.available_backends()
needs_gpu = pytest.mark.skipif(not GPU, reason="no Metal or CUDA backend in this MLX")


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["random", "edges", "tiny", "wide"])
def test_gpu_kernel_is_bit_exact(clean_dispatch, dtype, kind):
    dt = getattr(mx, dtype)
    codec = FP4IndexCodec(128)
    x = _case(7, 64 * 128 * 3, 32, kind).reshape(3, 64, 128)
    with mx.stream(mx.gpu):
        q = mx.array(x).astype(dt)
        got = fr.query_roundtrip(q, codec)
        assert fr.kernel_backend(q, codec) == GPU[0]
        want = codec.roundtrip(q)
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)).view(np.uint32),
                                      np.array(want.astype(mx.float32)).view(np.uint32))
        # the rounding alone, on values placed on the edges (no rotation in between)
        h = mx.array(x.reshape(-1))
        y = fr.roundtrip_kernel(h, mx.float32, 32, (h.size,), backend=GPU[0])
        np.testing.assert_array_equal(np.array(y).view(np.uint32), _ops(x.reshape(-1), 32).view(np.uint32))


@needs_gpu
def test_gpu_model_with_fp4_kernel_matches_ops(clean_dispatch):
    """A whole tiny model (fp32, prefill then decode, fp8 KV) with the kernel against the same
    model with DSV4_FP4_KERNEL=ops: the queries are the same bits, so the logits are."""
    from conftest import gpu_logits_kernel_on_off

    got, want = gpu_logits_kernel_on_off(clean_dispatch, fr.ENV_VAR)
    np.testing.assert_array_equal(got, want)
