"""One-token 8-bit affine projection kernel (`kernels.qgemv`, the output head): the shared body
against numpy and MLX's quantized matmul; and the dispatch of the microscaled layers' kernel
(its body: `test_mxgemv_kernel.py`).

On any machine: the body compiled as C++ with the CPU-emulation dialect (the head's layout from
`mx.quantize`; rows not a multiple of a group's; K smaller than a warp's
loads), the Metal source compiled as C++ against the stand-in <metal_stdlib>, the CUDA source
with nvcc where there is one, the dispatch (the head on by default, the mxfp8 linears opt-in). On a GPU: the
kernel against `mx.quantized_matmul`, and a whole model with it against the ops path.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_indexer_kernel import (CXX, NVCC, assert_common_subset, assert_metal_compiles,
                                 assert_nvcc_compiles)

from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import qgemv as kq
from dsv4_mlx.kernels import qgemv_source as src

RTOL, ATOL = 1e-5, 1e-5  # fp32 sums of up to 4K products in another order


def _quantized(rng, O, K, gs, dtype=mx.float32):
    W = mx.array(rng.standard_normal((O, K)).astype(np.float32) / np.sqrt(K))
    w, s, b = mx.quantize(W, group_size=gs, bits=8, mode="affine")
    s, b = s.astype(dtype), b.astype(dtype)
    Wdq = mx.dequantize(w, s, b, group_size=gs, bits=8, mode="affine").astype(mx.float32)
    return w, s, b, np.array(Wdq)


def _emu(emu, w, s, b, x, gs, rw=kq.RW, tg=kq.TG):
    O, K = w.shape[0], x.shape[-1]
    rows = (tg // 32) * rw
    (y,) = emu.run(src.qgemv_source("cpp"), [np.array(a) for a in (w, s, b, x)],
                   [(O,)], ["float32"],
                   [("XT", "float32"), ("ST", "float32"), ("OT", "float32"), ("K", K),
                    ("GS", gs), ("TG", tg), ("RW", rw)],
                   (-(-O // rows) * tg, 1, 1), tg)
    return y


@pytest.mark.parametrize("O,K,gs,rw,tg", [(300, 4096, 64, 8, 256), (7, 160, 32, 2, 64),
                                          (70, 2048, 64, 1, 32), (33, 512, 128, 4, 128)])
def test_emulated_matches_numpy(emu, O, K, gs, rw, tg):
    """Rows past the last (a partial group), K below one load a lane (160: 10 chunks for 32
    lanes), one row a warp, group size 128."""
    rng = np.random.default_rng(O + K)
    w, s, b, Wdq = _quantized(rng, O, K, gs)
    x = mx.array(rng.standard_normal(K).astype(np.float32))
    y = _emu(emu, w, s, b, x, gs, rw, tg)
    want = Wdq.astype(np.float64) @ np.array(x).astype(np.float64)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL * np.abs(want).max())
    mlx = np.array(mx.quantized_matmul(x[None], w, s, b, transpose=True, group_size=gs, bits=8,
                                       mode="affine"))[0]
    np.testing.assert_allclose(y, mlx, rtol=RTOL, atol=ATOL * np.abs(want).max())


def test_emulated_can_fail(emu):
    """Not vacuous: the codes read with the wrong group size give other values."""
    rng = np.random.default_rng(2)
    w, s, b, Wdq = _quantized(rng, 40, 256, 32)
    x = mx.array(rng.standard_normal(256).astype(np.float32))
    s64, b64 = s[:, ::2], b[:, ::2]  # a plausible but wrong [O, K/64] layout
    y = _emu(emu, w, s64, b64, x, 64)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(y, Wdq @ np.array(x), rtol=1e-3)


# --------------------------------------------------------------------------------------------
# Metal and CUDA sources

def _launch(dialect, xt, K=4096, O=129280, gs=64):
    return (src.qgemv_source(dialect),
            [("uint32", 2, O * K // 4), (xt, 2, O * K // gs), (xt, 2, O * K // gs), (xt, 1, K)],
            [xt],
            [("XT", xt), ("ST", xt), ("OT", xt), ("K", K), ("GS", gs), ("TG", kq.TG),
             ("RW", kq.RW)])


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("xt", ["float32"])
def test_metal_source_compiles_as_cpp(xt, tmp_path):
    assert_metal_compiles(_launch("metal", xt), tmp_path, f"qgemv_{xt}")
    assert_metal_compiles(_launch("metal", xt, K=7168), tmp_path, f"qgemv_{xt}_pro")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    assert_nvcc_compiles(_launch("cuda", "float32"), tmp_path, "qgemv")


def test_body_stays_in_the_common_subset():
    assert_common_subset(src.qgemv_source("metal"))


# --------------------------------------------------------------------------------------------
# dispatch

def _head(rng, O=64, K=256, dtype=mx.float32):
    lin = nn.Linear(K, O, bias=False)
    lin.weight = mx.array(rng.standard_normal((O, K)).astype(np.float32) / 16)
    q = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=8)
    q.scales, q.biases = q.scales.astype(dtype), q.biases.astype(dtype)
    return q


def test_defaults(clean_dispatch):
    """Unset, the head's variable means auto (measured faster than MLX's on a GPU; the ops
    path on a CPU) and the microscaled layers' means the ops path (opt-in), whatever the
    device; each is set apart from the other."""
    assert dispatch.requested(kq.ENV_VAR, kq.DEFAULT) == "auto"
    assert dispatch.requested(kq.MX_ENV_VAR, kq.MX_DEFAULT) == "ops"
    assert dispatch.select_backend(kq.MX_ENV_VAR, kq.MX_DEFAULT) == "ops"
    if mx.default_device() == mx.cpu:  # (on a GPU machine: auto picks the GPU's kernel)
        assert dispatch.select_backend(kq.ENV_VAR, kq.DEFAULT) == "ops"
    clean_dispatch.setenv(kq.MX_ENV_VAR, "auto")
    assert dispatch.requested(kq.MX_ENV_VAR, kq.MX_DEFAULT) == "auto"
    assert dispatch.requested(kq.ENV_VAR, kq.DEFAULT) == "auto"
    clean_dispatch.setenv(kq.ENV_VAR, "ops")
    assert dispatch.select_backend(kq.ENV_VAR, kq.DEFAULT) == "ops"
    assert dispatch.requested(kq.MX_ENV_VAR, kq.MX_DEFAULT) == "auto"


def test_cpu_is_the_layer(clean_dispatch):
    rng = np.random.default_rng(0)
    head = _head(rng)
    y = mx.array(rng.standard_normal((1, 1, 256)).astype(np.float32))
    for value in (None, "auto", "ops"):
        if value is None:
            clean_dispatch.delenv(kq.ENV_VAR, raising=False)
        else:
            clean_dispatch.setenv(kq.ENV_VAR, value)
        np.testing.assert_array_equal(np.array(kq.head_logits(head, y)), np.array(head(y)))


def test_env_var_validated(clean_dispatch):
    clean_dispatch.setenv(kq.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=kq.ENV_VAR):
        kq.head_logits(_head(np.random.default_rng(1)), mx.zeros((1, 1, 256)))


def _mxfp8_model():
    from conftest import FLASH_LIKE

    from dsv4_mlx.model import Model, ModelArgs
    from dsv4_mlx.random_weights import load_random

    model = load_random(Model(ModelArgs.from_dict(dict(FLASH_LIKE, num_nextn_predict_layers=0))),
                        seed=3)
    fp8 = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "shared_experts.w2")
    nn.quantize(model, group_size=32, bits=8, mode="mxfp8",
                class_predicate=lambda p, m: (isinstance(m, nn.Linear) and p.endswith(fp8)
                                              and m.weight.shape[1] % 32 == 0))
    return model


def test_linears_swapped_only_when_asked(clean_dispatch):
    """Unset: no module changes class. Set: every mxfp8 linear becomes the one-token class,
    and on the CPU (ops path) the logits stay bit-identical."""
    from conftest import prefill_then_decode

    model = _mxfp8_model()
    n_fp8 = sum(1 for _, m in model.named_modules()
                if isinstance(m, nn.QuantizedLinear) and m.mode == "mxfp8")
    assert n_fp8 >= 5
    ids = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    before = prefill_then_decode(model, ids, 6)
    assert kq.use_for_linears(model) == 0
    assert not any(isinstance(m, kq.OneTokenQuantizedLinear) for _, m in model.named_modules())
    clean_dispatch.setenv(kq.ENV_VAR, "auto")  # (the head's variable alone swaps nothing)
    assert kq.use_for_linears(model) == 0
    clean_dispatch.setenv(kq.MX_ENV_VAR, "auto")
    assert kq.use_for_linears(model) == n_fp8
    assert kq.use_for_linears(model) == 0  # (already swapped)
    np.testing.assert_array_equal(np.array(prefill_then_decode(model, ids, 6)), np.array(before))


def test_one_token_calls_go_to_the_kernel(clean_dispatch):
    """With the backend forced (as on a GPU): one-token calls of a swapped linear go to the
    microscaled kernel (8-bit codes, the layer's codes and scales), several tokens stay on
    MLX's matmul."""
    rng = np.random.default_rng(4)
    lin = nn.Linear(256, 96)
    lin.weight = mx.array(rng.standard_normal((96, 256)).astype(np.float32) / 16)
    q = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=8, mode="mxfp8")
    calls = []

    def kernel(w, scales, x, *, bits, backend, inds=None, x_per_pick=False):
        calls.append((bits, backend, x.shape, inds, x_per_pick))
        return mx.quantized_matmul(x, w, scales, None, transpose=True, group_size=32, bits=8,
                                   mode="mxfp8")

    clean_dispatch.setattr(dispatch, "select_backend",
                           lambda env_var=None, default="auto": "cuda")
    clean_dispatch.setattr(dispatch, "kernel_usable", lambda key, probe, what: True)
    clean_dispatch.setattr(kq, "mx_gemv_kernel", kernel)
    clean_dispatch.setenv(kq.MX_ENV_VAR, "auto")

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = q

    h = Holder()
    assert kq.use_for_linears(h) == 1 and isinstance(h.proj, kq.OneTokenQuantizedLinear)
    x1 = mx.array(rng.standard_normal((1, 1, 256)).astype(np.float32)).astype(mx.bfloat16)
    want1 = nn.QuantizedLinear.__call__(h.proj, x1)
    got1 = h.proj(x1)
    assert calls == [(8, "cuda", (1, 256), None, False)]
    assert got1.shape == want1.shape == (1, 1, 96)
    np.testing.assert_array_equal(np.array(got1.astype(mx.float32)),
                                  np.array(want1.astype(mx.float32)))
    x3 = mx.zeros((1, 3, 256), mx.bfloat16)
    assert h.proj(x3).shape == (1, 3, 96) and len(calls) == 1  # several tokens: MLX's


# --------------------------------------------------------------------------------------------
# on a GPU

GPU = dispatch.available_backends()
needs_gpu = pytest.mark.skipif(not GPU, reason="no Metal or CUDA backend in this MLX")


@needs_gpu
@pytest.mark.parametrize("dtype,O,K", [("float32", 129280, 4096), ("float32", 1000, 7168),
                                       ("float32", 333, 1024)])
def test_gpu_matches_quantized_matmul(clean_dispatch, dtype, O, K):
    dt = getattr(mx, dtype)
    rng = np.random.default_rng(O)
    with mx.stream(mx.gpu):
        head = _head(rng, O, K, dt)
        y = mx.array(rng.standard_normal((1, 1, K)).astype(np.float32)).astype(dt)
        assert kq._backend(head, y) != "ops"
        got = kq.head_logits(head, y)
        want = head(y)
        assert got.shape == want.shape == (1, 1, O) and got.dtype == want.dtype
        g, w = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL * np.abs(w).max())


@needs_gpu
def test_gpu_falls_back_where_it_does_not_apply(clean_dispatch):
    rng = np.random.default_rng(3)
    with mx.stream(mx.gpu):
        head = _head(rng)
        assert kq._backend(head, mx.zeros((1, 2, 256))) == "ops"  # two tokens
        assert kq._backend(head, mx.zeros((1, 1, 256), mx.bfloat16)) == "ops"  # bf16 x
        assert kq._backend(_head(rng, dtype=mx.bfloat16), mx.zeros((1, 1, 256))) == "ops"
        assert kq._backend(nn.Linear(256, 8), mx.zeros((1, 1, 256))) == "ops"


@needs_gpu
def test_gpu_model_with_kernel_matches_ops(clean_dispatch):
    """A whole tiny model with an 8-bit head (fp32 scales, as `sanitize` leaves it), prefill
    then decode, the kernel against DSV4_QGEMV_KERNEL=ops."""
    from conftest import FLASH_LIKE, gpu_logits_kernel_on_off

    from dsv4_mlx.model import Model, ModelArgs
    from dsv4_mlx.random_weights import load_random

    def make():
        model = load_random(Model(ModelArgs.from_dict(dict(FLASH_LIKE,
                                                           num_nextn_predict_layers=0))), seed=2)
        nn.quantize(model, group_size=64, bits=8, class_predicate=lambda p, m: p == "head")
        model.head.scales = model.head.scales.astype(mx.float32)
        model.head.biases = model.head.biases.astype(mx.float32)
        return model

    got, want = gpu_logits_kernel_on_off(clean_dispatch, kq.ENV_VAR, make)  # (on by default)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


@needs_gpu
def test_gpu_model_with_mxfp8_linears_matches_ops(clean_dispatch):
    """A whole tiny model with mxfp8 linears swapped in (`use_for_linears`), prefill then
    decode: the decode steps' one-token projections through the kernel, against
    DSV4_MX_GEMV_KERNEL=ops."""
    from conftest import gpu_logits_kernel_on_off

    def make():
        model = _mxfp8_model()
        assert kq.use_for_linears(model) >= 5
        return model

    got, want = gpu_logits_kernel_on_off(clean_dispatch, kq.MX_ENV_VAR, make, on="auto")
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
