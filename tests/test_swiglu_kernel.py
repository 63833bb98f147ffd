"""The experts' fused gate/up projection and its SwiGLU (`model.moe.fuse_pair`,
`kernels.swiglu`, spec §4.10).

On any machine: the kernel body compiled as C++ with the CPU-emulation dialect against the ops
path (the compiled chain on the two halves), with and without routing weights, the clamp
active; the Metal source compiled as C++ against the stand-in <metal_stdlib>; the CUDA source
with nvcc where there is one; `fuse_pair` (views into one buffer, no second copy, the logits
of a whole model -- unquantized, and mixed mxfp4/mxfp8 -- bit for bit those of the unfused
projections). On a GPU: the kernel against the ops path, and a whole model with the kernel
against ``DSV4_SWIGLU_KERNEL=ops``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import PRO_LIKE, prefill_then_decode, tiny_config
from test_indexer_kernel import (CXX, NVCC, assert_common_subset, assert_metal_compiles,
                                 assert_nvcc_compiles)

from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import swiglu as ksw
from dsv4_mlx.kernels import swiglu_source as src
from dsv4_mlx.model import Model, ModelArgs
from dsv4_mlx.model import moe
from dsv4_mlx.random_weights import load_random

# fp32: exp of the same argument in the C library vs MLX's CPU exp
RTOL, ATOL = 1e-6, 1e-6


def _emu(emu, y, w, limit, tg=64):
    R, I2 = y.shape
    I = I2 // 2
    (h,) = emu.run(src.swiglu_source("cpp"),
                   [y, np.zeros(1, np.float32) if w is None else w,
                    np.array([limit], np.float32)], [(R, I)], ["float32"],
                   [("YT", "float32"), ("OT", "float32"), ("I", I), ("TG", tg),
                    ("WEIGHTED", w is not None)], (-(-I // tg) * tg, R, 1), tg)
    return h


@pytest.mark.parametrize("R,I,weighted,limit", [(6, 128, True, 10.0), (3, 100, False, 10.0),
                                                (4, 64, True, 0.5), (1, 2048, False, 7.0)])
def test_emulated_matches_ops(emu, R, I, weighted, limit):
    """Rows of routed (weighted) and shared experts; I not a multiple of the group; a limit
    that clamps many gates and ups."""
    rng = np.random.default_rng(R * I)
    y = (rng.standard_normal((R, 2 * I)) * 3).astype(np.float32)
    w = rng.uniform(0.1, 2.0, R).astype(np.float32) if weighted else None
    got = _emu(emu, y, w, limit)
    like = mx.zeros((1,), mx.float32)
    want = ksw.swiglu_ops(mx.array(y), None if w is None else mx.array(w)[:, None], limit, like)
    np.testing.assert_allclose(got, np.array(want), rtol=RTOL, atol=ATOL)
    if limit < 1:  # not vacuous: the clamp matters here
        loose = ksw.swiglu_ops(mx.array(y), None if w is None else mx.array(w)[:, None], 100.0,
                               like)
        assert np.abs(got - np.array(loose)).max() > 1e-2


def test_emulated_halves_not_swapped(emu):
    rng = np.random.default_rng(0)
    y = rng.standard_normal((2, 64)).astype(np.float32)
    got = _emu(emu, y, None, 10.0)
    swapped = np.concatenate([y[:, 32:], y[:, :32]], axis=1)
    other = np.array(ksw.swiglu_ops(mx.array(swapped), None, 10.0, mx.zeros((1,))))
    assert np.abs(got - other).max() > 1e-2


# --------------------------------------------------------------------------------------------
# fuse_pair


def _model(cfg, quantize):
    model = load_random(Model(ModelArgs.from_dict(dict(cfg, num_nextn_predict_layers=0))), seed=5)
    if quantize:
        def pred(path, m):
            if ".ffn.experts." in path:
                return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
            if ".shared_experts." in path:
                return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
            return False
        nn.quantize(model, class_predicate=pred)
        mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("cfg,quantize", [(tiny_config(), False), (tiny_config(), True),
                                          (PRO_LIKE, True)], ids=["flash", "flash-q", "pro-q"])
def test_fused_pairs_give_the_same_logits(cfg, quantize, monkeypatch):
    """One matmul for w1 and w3 computes every output row as the two did: the logits of a
    prefill and decode steps are bit for bit those of the unfused projections (routed experts
    gathered, sorted in prefill; the shared expert), with the SwiGLU clamp active (Pro-like)."""
    ids = mx.array([[(7 * i + 3) % 97 for i in range(20)]])
    with monkeypatch.context() as m:  # the unfused projections
        m.setattr(moe, "fuse_pair", lambda owner, a, b: None)
        unfused = _model(cfg, quantize)
        want = prefill_then_decode(unfused, ids, 14)
        assert "_fused13" not in unfused.layers[0].ffn.experts.__dict__
    model = _model(cfg, quantize)
    got = prefill_then_decode(model, ids, 14)
    ffn = model.layers[0].ffn
    assert "_fused13" in ffn.experts.__dict__ and "_fused13" in ffn.shared_experts.__dict__
    np.testing.assert_array_equal(got, want)


def test_fused_pair_keeps_the_names_as_views():
    """After fusion w1/w3 are still the model's parameters (checkpoint names, same values),
    now views into the fused buffer: no second copy of the experts."""
    from mlx.utils import tree_flatten

    model = _model(tiny_config(), True)
    ex = model.layers[2].ffn.experts
    before = {k: np.array(v) for k, v in tree_flatten(ex.parameters())}
    f = moe.fuse_pair(ex, ex.w1, ex.w3)
    assert f is moe.fuse_pair(ex, ex.w1, ex.w3)  # cached while the parameters stay
    after = {k: np.array(v) for k, v in tree_flatten(ex.parameters())}
    assert sorted(before) == sorted(after)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    I = ex.w1.weight.shape[-2]
    assert f.weight.shape == (ex.w1.weight.shape[0], 2 * I, ex.w1.weight.shape[-1])
    np.testing.assert_array_equal(np.array(f.weight[:, I:]), after["w3.weight"])
    # new parameters (a reload) make a new fusion
    ex.w1.weight = mx.array(np.array(ex.w1.weight))
    assert moe.fuse_pair(ex, ex.w1, ex.w3) is not f


def test_mismatched_pairs_are_not_fused():
    model = _model(tiny_config(), False)
    sh = model.layers[0].ffn.shared_experts
    nn.quantize(sh, class_predicate=lambda p, m: p == "w1")
    assert moe.fuse_pair(sh, sh.w1, sh.w3) is None


# --------------------------------------------------------------------------------------------
# Metal and CUDA sources

def _launch(dialect, yt, weighted):
    return (src.swiglu_source(dialect),
            [(yt, 4, 6 * 2 * 2048), ("float32", 4, 6), ("float32", 1, 1)], [yt],
            [("YT", yt), ("OT", yt), ("I", 2048), ("TG", ksw.TG), ("WEIGHTED", weighted)])


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("yt", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("weighted", [False, True])
def test_metal_source_compiles_as_cpp(yt, weighted, tmp_path):
    assert_metal_compiles(_launch("metal", yt, weighted), tmp_path, f"swiglu_{yt}_{weighted}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    for weighted in (False, True):
        assert_nvcc_compiles(_launch("cuda", "bfloat16", weighted), tmp_path, f"swiglu_{weighted}")


def test_body_stays_in_the_common_subset():
    assert_common_subset(src.swiglu_source("metal"))


# --------------------------------------------------------------------------------------------
# dispatch and GPU

def test_cpu_uses_ops(clean_dispatch):
    y = mx.array(np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32))
    np.testing.assert_array_equal(np.array(ksw.swiglu(y, None, 10.0, y)),
                                  np.array(ksw.swiglu_ops(y, None, 10.0, y)))


def test_env_var_validated(clean_dispatch):
    clean_dispatch.setenv(ksw.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=ksw.ENV_VAR):
        ksw.swiglu(mx.zeros((1, 8)), None, 1.0, mx.zeros((1,)))


GPU = dispatch.available_backends()
needs_gpu = pytest.mark.skipif(not GPU, reason="no Metal or CUDA backend in this MLX")


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weighted", [False, True])
def test_gpu_kernel_matches_ops(clean_dispatch, dtype, weighted):
    dt = getattr(mx, dtype)
    rng = np.random.default_rng(3)
    with mx.stream(mx.gpu):
        y = mx.array((rng.standard_normal((1, 6, 1, 2 * 2048)) * 3).astype(np.float32)).astype(dt)
        w = mx.array(rng.uniform(0.1, 2, (1, 6, 1, 1)).astype(np.float32)) if weighted else None
        assert ksw._backend(y, w, dt) == GPU[0]
        got = ksw.swiglu(y, w, 7.0, y)
        want = ksw.swiglu_ops(y, w, 7.0, y)
        assert got.shape == want.shape == (1, 6, 1, 2048) and got.dtype == dt
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(np.array(got.astype(mx.float32)),
                                   np.array(want.astype(mx.float32)), **tol)


@needs_gpu
def test_gpu_model_with_kernel_matches_ops(clean_dispatch):
    from conftest import gpu_logits_kernel_on_off

    got, want = gpu_logits_kernel_on_off(clean_dispatch, ksw.ENV_VAR)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
