"""The token embedding into the mHC streams (`kernels.embed`, spec §4.1, §4.2).

On any machine: the body compiled as C++ with the CPU-emulation dialect, for 8-, 4- and 2-bit
tables with fp32 and bf16 scales and for plain tables: bit for bit against the ops path (MLX's
`Embedding` and a broadcast) and against the single rounding of MLX's CUDA dequantization
(MLX's CPU dequantization rounds twice: within 2 ulps); the Metal source compiled as C++
against the stand-in <metal_stdlib>; the CUDA source with nvcc where there is one; the
dispatch. On a GPU: the kernel against the ops path, and a whole model with the kernel
against ``DSV4_EMBED_KERNEL=ops``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_indexer_kernel import (CXX, NVCC, assert_common_subset, assert_metal_compiles,
                                 assert_nvcc_compiles)

from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import embed as ke
from dsv4_mlx.kernels import embed_source as src


def _bits_of(a: mx.array) -> np.ndarray:
    """An array as the emulator takes it (bf16 as its uint16 bits)."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def _table(V, D, bits, dtype, seed=0):
    w = mx.random.normal((V, D), key=mx.random.key(seed)).astype(dtype)
    if bits is None:
        e = nn.Embedding(V, D)
        e.weight = w
        return e
    e = nn.QuantizedEmbedding(V, D, group_size=64 if D % 64 == 0 else 32, bits=bits)
    e.weight, e.scales, e.biases = mx.quantize(w, e.group_size, bits)
    mx.eval(e.parameters())
    return e


def _emu(emu, e, ids, n):
    q = isinstance(e, nn.QuantizedEmbedding)
    dt = e.scales.dtype if q else e.weight.dtype
    D = e.weight.shape[-1] * 32 // e.bits if q else e.weight.shape[-1]
    name = "bfloat16" if dt == mx.bfloat16 else "float32"
    arrays = [ids.reshape(-1).astype(np.int32), _bits_of(e.weight)]
    tmpl = [("XT", name), ("D", D), ("NS", n), ("TG", 64)]
    if q:
        arrays += [_bits_of(e.scales), _bits_of(e.biases)]
        tmpl += [("BITS", e.bits), ("GS", e.group_size)]
    (X,) = emu.run(src.embed_source("cpp", q), arrays, [(*ids.shape, n, D)], [name], tmpl,
                   (-(-D // 64) * 64, ids.size, 1), 64)
    return X


def _ops(e, ids, n):
    X = ke.embed_streams_ops(e, mx.array(ids), n)
    return _bits_of(mx.contiguous(X))


def _reference(e, ids, n):
    """(q x scale + bias in float64, |q x scale| + |bias|) of the rows, [*ids.shape, n, D]."""
    D = e.weight.shape[-1] * 32 // e.bits
    codes = np.array(mx.dequantize(e.weight, mx.ones_like(e.scales).astype(mx.float32),
                                   mx.zeros_like(e.biases).astype(mx.float32), e.group_size,
                                   e.bits)).astype(np.float64)  # the integer codes
    sc = np.repeat(np.array(e.scales.astype(mx.float32)).astype(np.float64), e.group_size, -1)
    bi = np.repeat(np.array(e.biases.astype(mx.float32)).astype(np.float64), e.group_size, -1)
    exact = (codes * sc + bi)[ids.reshape(-1)].reshape(*ids.shape, 1, D)
    mag = (np.abs(codes * sc) + np.abs(bi))[ids.reshape(-1)].reshape(*ids.shape, 1, D)
    shape = (*ids.shape, n, D)
    return np.broadcast_to(exact, shape), np.broadcast_to(mag, shape)


def _values(bits_or_f32: np.ndarray, dtype) -> np.ndarray:
    if dtype == mx.bfloat16:
        return (bits_or_f32.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits_or_f32.astype(np.float64)


@pytest.mark.parametrize("bits,dtype,D", [(8, mx.float32, 256), (8, mx.bfloat16, 256),
                                          (4, mx.bfloat16, 128), (2, mx.float32, 96),
                                          (None, mx.float32, 100), (None, mx.bfloat16, 64)])
def test_emulated_matches_reference(emu, bits, dtype, D):
    """Plain tables: the ops path bit for bit. Quantized: ``q x scale + bias`` rounded once to
    the table's dtype -- bf16 tables bit for bit as the exact value rounded once (what MLX's
    CUDA dequantization gives, its bf16 multiply-add fused; its CPU path rounds the product
    first and lands within a few ulps of the larger term)."""
    e = _table(50, D, bits, dtype, seed=D)
    ids = np.array([[3, 49, 0, 3, 17]], np.int32)
    got = _emu(emu, e, ids, 4)
    want = _ops(e, ids, 4)
    assert got.shape == want.shape == (1, 5, 4, D)
    if bits is None:
        np.testing.assert_array_equal(got, want)
    else:
        exact, mag = _reference(e, ids, 4)
        g, w = _values(got, dtype), _values(want, dtype)
        if dtype == mx.bfloat16:
            once = np.array(mx.array(exact.astype(np.float32)).astype(mx.bfloat16).view(mx.uint16))
            np.testing.assert_array_equal(got, once)
            assert (np.abs(g - w) <= 2.0 ** -7 * mag).all()  # the CPU's two roundings
            assert (got != want).any()  # which do differ somewhere
        else:
            assert (np.abs(g - exact) <= 2.0 ** -22 * mag).all()
    # not vacuous: other rows differ
    assert not np.array_equal(got[0, 0], got[0, 1])


# --------------------------------------------------------------------------------------------
# Metal and CUDA sources

def _launches(dialect, xt):
    return [
        (src.embed_source(dialect, True),
         [("int32", 2, 1), ("uint32", 2, 129280 * 1024), (xt, 2, 129280 * 64),
          (xt, 2, 129280 * 64)], [xt],
         [("XT", xt), ("D", 4096), ("NS", 4), ("TG", ke.TG), ("BITS", 8), ("GS", 64)]),
        (src.embed_source(dialect, False), [("int32", 2, 1), (xt, 2, 129280 * 4096)], [xt],
         [("XT", xt), ("D", 4096), ("NS", 4), ("TG", ke.TG)]),
    ]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("xt", ["float32", "bfloat16", "float16"])
def test_metal_source_compiles_as_cpp(xt, tmp_path):
    for i, launch in enumerate(_launches("metal", xt)):
        assert_metal_compiles(launch, tmp_path, f"embed{i}_{xt}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    for i, launch in enumerate(_launches("cuda", "bfloat16")):
        assert_nvcc_compiles(launch, tmp_path, f"embed{i}")


def test_bodies_stay_in_the_common_subset():
    for q in (False, True):
        assert_common_subset(src.embed_source("metal", q))


# --------------------------------------------------------------------------------------------
# dispatch and GPU

def test_cpu_uses_ops(clean_dispatch):
    e = _table(20, 64, 8, mx.float32)
    ids = mx.array([[1, 2]], mx.int32)
    np.testing.assert_array_equal(np.array(ke.embed_streams(e, ids, 4)),
                                  np.array(ke.embed_streams_ops(e, ids, 4)))


def test_dispatch_conditions(clean_dispatch, monkeypatch):
    monkeypatch.setattr(dispatch, "select_backend", lambda env=None, default="auto": "ops" if default == "ops" else "cuda")
    monkeypatch.setattr(dispatch, "kernel_usable", lambda key, probe, what: True)
    ids = mx.zeros((1, 1), mx.int32)
    assert ke._backend(_table(20, 64, 8, mx.bfloat16), ids) == "cuda"
    assert ke._backend(_table(20, 64, None, mx.bfloat16), ids) == "cuda"
    assert ke._backend(_table(20, 96, 3, mx.float32), ids) == "ops"  # 3-bit codes cross words
    assert ke._backend(_table(20, 64, 8, mx.float32), ids.astype(mx.uint32)) == "cuda"  # mlx-lm's
    assert ke._backend(_table(20, 64, 8, mx.float32), ids.astype(mx.int64)) == "ops"


def test_env_var_validated(clean_dispatch):
    clean_dispatch.setenv(ke.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=ke.ENV_VAR):
        ke.embed_streams(_table(20, 64, None, mx.float32), mx.zeros((1, 1), mx.int32), 4)


GPU = dispatch.available_backends()
needs_gpu = pytest.mark.skipif(not GPU, reason="no Metal or CUDA backend in this MLX")


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4, None])
def test_gpu_kernel_matches_ops(clean_dispatch, bits):
    with mx.stream(mx.gpu):
        e = _table(1000, 4096, bits, mx.bfloat16)
        ids = mx.array([[5, 999, 0]], mx.int32)
        assert ke._backend(e, ids) == GPU[0]
        got = ke.embed_streams(e, ids, 4)
        want = ke.embed_streams_ops(e, ids, 4)  # MLX's own dequantization on the GPU
        assert got.shape == want.shape == (1, 3, 4, 4096) and got.dtype == want.dtype
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)),
                                      np.array(want.astype(mx.float32)))


@needs_gpu
def test_gpu_model_with_kernel_matches_ops(clean_dispatch):
    from conftest import gpu_logits_kernel_on_off

    got, want = gpu_logits_kernel_on_off(clean_dispatch, ke.ENV_VAR)
    np.testing.assert_array_equal(got, want)
