"""One-token microscaled projections (`kernels.qgemv.mx_gemv_kernel`): the mxfp8 linears and the
mxfp4 routed experts, plain or gathered by expert, against MLX's own dequantization and
`gather_qmm`.

On any machine: the shared body compiled as C++ with the CPU-emulation dialect, every launch shape
the dispatch picks (warps a row, rows a warp group), rows past the last group, repeated and
unsorted expert picks; the Metal source compiled as C++ against the stand-in <metal_stdlib>,
the CUDA source with nvcc where there is one. On a GPU: the kernel against `mx.gather_qmm` /
`mx.quantized_matmul`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_indexer_kernel import (CXX, NVCC, assert_common_subset, assert_metal_compiles,
                                 assert_nvcc_compiles)

from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import qgemv as kq
from dsv4_mlx.kernels import qgemv_source as src

RTOL, ATOL = 1e-5, 1e-5  # fp32 sums of up to 4K products in another order


def _codes(rng, shape, bits):
    """Random codes of every value (no NaN e4m3 codes) packed as MLX packs them."""
    if bits == 8:
        c = rng.integers(0, 256, shape).astype(np.uint8)
        c[(c & 0x7F) == 0x7F] = 0x01
        return c.reshape(*shape[:-1], shape[-1] // 4, 4).view(np.uint32)[..., 0]
    c = rng.integers(0, 16, shape).astype(np.uint8)
    b = (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)
    return b.reshape(*shape[:-1], shape[-1] // 8, 4).view(np.uint32)[..., 0]


def _weights(rng, lead, K, bits, lo=110, hi=140):
    w = mx.array(_codes(rng, (*lead, K), bits))
    s = mx.array(rng.integers(lo, hi, (*lead, K // 32)).astype(np.uint8))
    mode = "mxfp8" if bits == 8 else "mxfp4"
    deq = np.array(mx.dequantize(w, s, group_size=32, bits=bits, mode=mode).astype(mx.float32))
    return w, s, deq


def _emu(emu, w, s, x, bits, inds=None, xpp=False, wpr=None, rw=None, tg=kq.MX_TG):
    O, K = w.shape[-2], x.shape[-1]
    P = 1 if inds is None else len(inds)
    W, R = kq.mx_launch(O, P, K, bits, tg)
    wpr, rw = wpr or W, rw or R
    rows = tg // 32 // wpr * rw
    ks = src.mx_gemv_source("cpp", bits)
    ins = [np.array(w), np.array(s), np.array(x),
           np.zeros(1, np.uint32) if inds is None else np.array(inds, np.uint32)]
    (y,) = emu.run(ks, ins, [(P, O)], ["float32"],
                   [("XT", "float32"), ("OT", "float32"), ("K", K), ("BITS", bits), ("TG", tg),
                    ("WPR", wpr), ("RW", rw), ("GATHER", inds is not None), ("XPP", xpp)],
                   (-(-O // rows) * tg, P, 1), tg)
    return y


def _check(y, want):
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL * np.abs(want).max())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("O,K,wpr,rw,tg", [(300, 1024, None, None, 256), (70, 512, 2, 2, 128),
                                          (9, 256, 1, 1, 64), (40, 2048, 4, 8, 256)])
def test_emulated_plain_matches_dequantized(emu, bits, O, K, wpr, rw, tg):
    """A plain projection (the FP8 linears' case) against numpy on MLX's dequantized weights and
    against `mx.quantized_matmul`: rows past the last group, K split over warps, one row a warp
    group, groups of 64 threads."""
    rng = np.random.default_rng(O + K + bits)
    w, s, deq = _weights(rng, (O,), K, bits)
    x = mx.array(rng.standard_normal((1, K)).astype(np.float32))
    y = _emu(emu, w, s, x, bits, wpr=wpr, rw=rw, tg=tg)
    want = deq.astype(np.float64) @ np.array(x)[0].astype(np.float64)
    _check(y[0], want)
    mode = "mxfp8" if bits == 8 else "mxfp4"
    mlx = np.array(mx.quantized_matmul(x, w, s, transpose=True, group_size=32, bits=bits,
                                       mode=mode))[0]
    _check(y[0], mlx)


@pytest.mark.parametrize("xpp", [False, True])
def test_emulated_gathered_experts_match_gather_qmm(emu, xpp):
    """The routed experts' two projections: six picks (one repeated, unsorted) of eight mxfp4
    experts, x one row (w1/w3) or one row a pick (w2), against `mx.gather_qmm`."""
    rng = np.random.default_rng(7 + xpp)
    E, O, K, P = 8, 96, 512, 6
    w, s, deq = _weights(rng, (E, O), K, 4)
    inds = np.array([5, 1, 5, 0, 7, 2], np.uint32)
    x = mx.array(rng.standard_normal((P if xpp else 1, K)).astype(np.float32))
    y = _emu(emu, w, s, x, 4, inds=inds, xpp=xpp)
    xs = np.array(x).astype(np.float64)
    want = np.stack([deq[e].astype(np.float64) @ xs[p if xpp else 0] for p, e in enumerate(inds)])
    _check(y, want)
    lhs = mx.array(np.arange(P, dtype=np.uint32) if xpp else np.zeros(P, np.uint32))
    g = mx.gather_qmm(x[:, None, :], w, s, None, lhs_indices=lhs, rhs_indices=mx.array(inds),
                      transpose=True, group_size=32, bits=4, mode="mxfp4")
    _check(y, np.array(g).reshape(P, O))


def test_emulated_every_fp4_code_and_scale_ends(emu):
    """Every e2m1 code at every position of a word (the f16-bit decoding: the subnormal 0.5,
    both zeros, the signs), scale bytes 0 (2^-127), 1, 127, 200 and 250: MLX's values (the
    scale applies after the sum; no product overflows)."""
    K, O = 64, 16
    c = np.tile(np.arange(16, dtype=np.uint8), (O, K // 16))
    for o in range(O):
        c[o] = np.roll(c[o], o)
    b = (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)
    w = mx.array(b.reshape(O, K // 8, 4).view(np.uint32)[..., 0])
    e8 = np.full((O, K // 32), 127, np.uint8)
    e8[1, 0], e8[2, 1], e8[3, 0], e8[4, 1] = 0, 1, 250, 200
    s = mx.array(e8)
    x = mx.array(np.linspace(-1, 1, K, dtype=np.float32)[None])
    deq = np.array(mx.dequantize(w, s, group_size=32, bits=4, mode="mxfp4").astype(mx.float32))
    want = deq.astype(np.float64) @ np.array(x)[0].astype(np.float64)
    bound = 1e-6 * (np.abs(deq).astype(np.float64) @ np.abs(np.array(x)[0]))  # a row's own size
    assert (bound > 0).all()
    y = _emu(emu, w, s, x, 4)[0]
    assert np.isfinite(y).all()
    assert (np.abs(y - want) <= bound).all(), np.abs(y - want) / bound


def test_emulated_nan_code(emu):
    """An e4m3 NaN code (S.1111.111) makes its row NaN, as MLX's dequantization does."""
    rng = np.random.default_rng(3)
    w, s, _ = _weights(rng, (8,), 64, 8)
    wn = np.array(w)
    wn[2, 3] = (wn[2, 3] & 0xFFFF00FF) | (0x7F << 8)
    x = mx.array(rng.standard_normal((1, 64)).astype(np.float32))
    y = _emu(emu, mx.array(wn), s, x, 8)[0]
    assert np.isnan(y[2]) and np.isfinite(np.delete(y, 2)).all()


def test_emulated_can_fail(emu):
    """Not vacuous: the experts' scales read from another expert give other sums."""
    rng = np.random.default_rng(4)
    w, s, deq = _weights(rng, (3, 40), 256, 4)
    x = mx.array(rng.standard_normal((1, 256)).astype(np.float32))
    inds = np.array([0, 2], np.uint32)
    s_wrong = mx.array(np.array(s)[::-1].copy())
    y = _emu(emu, w, s_wrong, x, 4, inds=inds)
    want = np.stack([deq[e] @ np.array(x)[0] for e in inds])
    with pytest.raises(AssertionError):
        _check(y, want)


@pytest.mark.parametrize("O,P,K,bits,want", [
    (4096, 6, 4096, 4, (1, 8)), (4096, 6, 2048, 4, (1, 8)), (1024, 1, 4096, 8, (2, 1)),
    (32768, 1, 1024, 8, (1, 8)), (512, 1, 4096, 8, (4, 1)), (4096, 1, 8192, 8, (1, 1))])
def test_launch_choice(O, P, K, bits, want):
    """The launch shapes of Flash's decode projections (experts' w1/w3 and w2; wq_a, wq_b,
    wkv, wo_b)."""
    assert kq.mx_launch(O, P, K, bits) == want
    assert kq.mx_shared_bytes(K, bits) <= 49152


# --------------------------------------------------------------------------------------------
# Metal and CUDA sources

def _launch(dialect, xt, bits, K, O=4096, E=8, gather=True, xpp=False):
    wpr, rw = kq.mx_launch(O, 6 if gather else 1, K, bits)
    lead = E * O if gather else O
    return (src.mx_gemv_source(dialect, bits),
            [("uint32", 3 if gather else 2, lead * K * bits // 32), ("uint8", 3 if gather else 2,
             lead * K // 32), (xt, 2, (6 if xpp else 1) * K), ("uint32", 1, 6)],
            [xt],
            [("XT", xt), ("OT", xt), ("K", K), ("BITS", bits), ("TG", kq.MX_TG), ("WPR", wpr),
             ("RW", rw), ("GATHER", gather), ("XPP", xpp)])


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_metal_source_compiles_as_cpp(tmp_path):
    assert_metal_compiles(_launch("metal", "bfloat16", 4, 4096), tmp_path, "mx4_w13")
    assert_metal_compiles(_launch("metal", "bfloat16", 4, 2048, xpp=True), tmp_path, "mx4_w2")
    assert_metal_compiles(_launch("metal", "float32", 8, 4096, O=1024, gather=False), tmp_path,
                          "mx8")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    assert_nvcc_compiles(_launch("cuda", "bfloat16", 4, 4096), tmp_path, "mx4")
    assert_nvcc_compiles(_launch("cuda", "bfloat16", 8, 4096, O=1024, gather=False), tmp_path,
                         "mx8")


def test_body_stays_in_the_common_subset():
    for bits in (4, 8):
        assert_common_subset(src.mx_gemv_source("metal", bits))


# --------------------------------------------------------------------------------------------
# on a GPU

def _gpu_backend():
    b = dispatch.available_backends()
    return b[0] if b else None


gpu = pytest.mark.skipif(_gpu_backend() is None, reason="no Metal or CUDA backend")


@gpu
@pytest.mark.parametrize("bits,O,K", [(8, 1024, 4096), (8, 32768, 1024), (8, 512, 4096),
                                      (8, 4096, 8192), (8, 100, 96)])
def test_gpu_mx_plain_matches_quantized_matmul(bits, O, K):
    """Within what fp32 sums in another order allow, a row's own bound (1e-5 of the sum of its
    terms' magnitudes: the random codes and scales 2^-17 .. 2^12 make rows whose terms
    cancel), plus a bf16 output's rounding either way."""
    rng = np.random.default_rng(O + K)
    w, s, deq = _weights(rng, (O,), K, bits)
    for dt in (mx.bfloat16, mx.float32):
        x = mx.array(rng.standard_normal((1, K)).astype(np.float32)).astype(dt)
        y = kq.mx_gemv_kernel(w, s, x, bits=bits, backend=_gpu_backend())
        want = mx.quantized_matmul(x, w, s, transpose=True, group_size=32, bits=bits,
                                   mode="mxfp8" if bits == 8 else "mxfp4")
        y, want = np.array(y.astype(mx.float32)), np.array(want.astype(mx.float32))
        terms = np.abs(deq).astype(np.float64) @ np.abs(np.array(x.astype(mx.float32))[0])
        bound = 1e-5 * terms + (2.0 ** -7 * np.abs(want) if dt == mx.bfloat16 else 0)
        assert (np.abs(y - want) <= bound).all(), np.max(np.abs(y - want) / bound)


@gpu
@pytest.mark.parametrize("xpp,K,O", [(False, 4096, 4096), (True, 2048, 4096), (False, 512, 96)])
def test_gpu_mx_gathered_matches_gather_qmm(xpp, K, O):
    rng = np.random.default_rng(K + xpp)
    E, P = 16, 6
    w, s, _ = _weights(rng, (E, O), K, 4)
    inds = mx.array(np.array([9, 3, 9, 0, 15, 4], np.uint32))
    lhs = mx.array(np.arange(P, dtype=np.uint32) if xpp else np.zeros(P, np.uint32))
    x = mx.array(rng.standard_normal((P if xpp else 1, K)).astype(np.float32))
    y = kq.mx_gemv_kernel(w, s, x, bits=4, backend=_gpu_backend(), inds=inds, x_per_pick=xpp)
    want = mx.gather_qmm(x[:, None, :], w, s, None, lhs_indices=lhs, rhs_indices=inds,
                         transpose=True, group_size=32, bits=4, mode="mxfp4").reshape(P, O)
    np.testing.assert_allclose(np.array(y), np.array(want), rtol=1e-5,
                               atol=1e-5 * float(mx.abs(want).max()))


@gpu
def test_gpu_e4m3_hardware_conversion_every_code():
    """The CUDA dialect's hardware e4m3 conversion (byte order, subnormals, NaN): every code,
    one per column, scale 2^0, x one-hot columns -> y is the codes' values."""
    K = 256
    codes = np.arange(256, dtype=np.uint8)
    O = 256
    c = np.zeros((O, K), np.uint8)
    c[np.arange(O), np.arange(O)] = codes  # row o holds code o at column o
    w = mx.array(c.reshape(O, K // 4, 4).view(np.uint32)[..., 0])
    s = mx.array(np.full((O, K // 32), 127, np.uint8))
    x = mx.array(np.ones((1, K), np.float32))
    y = np.array(kq.mx_gemv_kernel(w, s, x, bits=8, backend=_gpu_backend()))[0]
    want = np.array(mx.dequantize(w, s, group_size=32, bits=8, mode="mxfp8")
                    .astype(mx.float32)).sum(axis=1)
    nan = (codes & 0x7F) == 0x7F
    assert np.isnan(y[nan]).all()
    np.testing.assert_array_equal(y[~nan], want[~nan])


# --------------------------------------------------------------------------------------------
# in the model

def _mx_model():
    """The tiny Flash-like model as `dsv4 convert` lays it out: routed experts mxfp4, the
    attention's and the shared expert's linears mxfp8."""
    import mlx.nn as nn
    from conftest import FLASH_LIKE

    from dsv4_mlx.model import Model, ModelArgs
    from dsv4_mlx.random_weights import load_random

    model = load_random(Model(ModelArgs.from_dict(dict(FLASH_LIKE, num_nextn_predict_layers=0))),
                        seed=5)
    nn.quantize(model, group_size=32, bits=4, mode="mxfp4",
                class_predicate=lambda p, m: ".ffn.experts." in p and hasattr(m, "to_quantized"))
    fp8 = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "shared_experts.w1",
           "shared_experts.w2", "shared_experts.w3")
    nn.quantize(model, group_size=32, bits=8, mode="mxfp8",
                class_predicate=lambda p, m: (isinstance(m, nn.Linear) and p.endswith(fp8)
                                              and m.weight.shape[1] % 32 == 0))
    return model


def test_model_decode_through_the_emulated_kernel(emu, clean_dispatch):
    """A whole tiny model with mxfp4 experts and mxfp8 linears, prefill then decode, with the
    backend forced and the kernel's body run by the C++ emulation at every one-token call
    (routed experts' w1/w3 and w2 gathered, the shared expert's fused w1/w3, the swapped
    linears), against the ops path: the same logits within fp32 summation order."""
    from conftest import prefill_then_decode

    model = _mx_model()
    ids = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    want = prefill_then_decode(model, ids, 6)
    calls = []

    def kernel(w, scales, x, *, bits, backend, inds=None, x_per_pick=False):
        calls.append((bits, inds is not None, x_per_pick))
        return mx.array(_emu(emu, w, scales, x.astype(mx.float32), bits,
                             inds=None if inds is None else np.array(inds), xpp=x_per_pick)
                        ).astype(x.dtype)

    clean_dispatch.setattr(dispatch, "select_backend",  # (this family only: the others' ops)
                           lambda env_var=None, default="auto":
                           "cuda" if env_var == kq.MX_ENV_VAR else "ops")
    clean_dispatch.setattr(dispatch, "kernel_usable", lambda key, probe, what: True)
    clean_dispatch.setattr(kq, "mx_gemv_kernel", kernel)
    clean_dispatch.setenv(kq.MX_ENV_VAR, "auto")
    clean_dispatch.setenv("DSV4_COMPILE_DECODE", "0")
    n_lin = kq.use_for_linears(model)
    assert n_lin >= 5
    got = prefill_then_decode(model, ids, 6)
    kinds = set(calls)
    assert {(4, True, False), (4, True, True), (8, False, False)} <= kinds, kinds
    assert len(calls) >= 4 * len(model.layers)  # every decode step, every layer
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@gpu
def test_gpu_model_with_mx_kernel_matches_ops(clean_dispatch):
    """The same model on the GPU, DSV4_MX_GEMV_KERNEL=auto (experts gathered, linears swapped)
    against =ops: prefill then decode."""
    from conftest import gpu_logits_kernel_on_off

    def make():
        model = _mx_model()
        assert kq.use_for_linears(model) >= 5
        return model

    got, want = gpu_logits_kernel_on_off(clean_dispatch, kq.MX_ENV_VAR, make, on="auto")
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
