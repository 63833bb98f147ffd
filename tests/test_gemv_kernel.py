"""One-token fp32 projection kernel (`kernels.gemv`, spec §4.0): the shared body against numpy
and the ops path.

On any machine: the body compiled as C++ with the CPU-emulation dialect (single and pair
variants; K not a multiple of the loads a group issues; many rows), the Metal source compiled
as C++ against the stand-in <metal_stdlib>, the CUDA source with nvcc where there is one, the
dispatch. On a GPU: the kernel against the ops path (fp32, bf16 and fp16 x), the callers
(mHC mix, router, compressor pair), and a whole model with the kernel against
``DSV4_GEMV_KERNEL=ops``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_indexer_kernel import (CXX, NVCC, assert_common_subset, assert_metal_compiles,
                                 assert_nvcc_compiles)

from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import gemv as kg
from dsv4_mlx.kernels import gemv_source as src

# fp32 sums of up to 16K products in another order than float64's
RTOL, ATOL = 1e-5, 1e-5


def _emu(emu, Ws, x, tg, rt="float32", scale=None, ape=None, pos=0):
    """Ws fp32, or bf16 as uint16 bits (`bf16_bits`)."""
    K = x.shape[-1]
    pair = len(Ws) == 2
    rows = sum(w.shape[0] for w in Ws)
    wt = "bfloat16" if Ws[0].dtype == np.uint16 else "float32"
    return emu.run(src.gemv_source("cpp", pair, wt == "float32"),
                   [*Ws, x, np.array([1.0 if scale is None else scale], np.float32),
                    np.zeros(1, np.float32) if ape is None else ape, np.array([pos], np.int32)],
                   [(w.shape[0],) for w in Ws], ["float32"] * len(Ws),
                   [("XT", "float32"), ("WT", wt), ("K", K), ("TG", tg), ("O0", Ws[0].shape[0]),
                    ("RT", rt), ("SC", scale is not None),
                    *([("O1", Ws[1].shape[0]), ("M", 0 if ape is None else ape.shape[0])]
                      if pair else [])],
                   (rows * tg, 1, 1), tg)


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """fp32 values that are bf16 numbers -> their bf16 bits (uint16)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    assert not (u & 0xFFFF).any(), "not bf16 numbers"
    return (u >> 16).astype(np.uint16)


def _case(rng, O, K):
    return (rng.standard_normal((O, K)).astype(np.float32),
            rng.standard_normal(K).astype(np.float32))


@pytest.mark.parametrize("O,K,tg", [(24, 16384, 256), (7, 4096, 256), (5, 100, 32),
                                    (3, 1000, 64), (40, 36, 32)])
def test_emulated_matches_numpy(emu, O, K, tg):
    """Loads a thread: 16, 4, 1, 4 (the last group partly past K), 1 (most threads idle)."""
    rng = np.random.default_rng(O + K)
    W, x = _case(rng, O, K)
    (y,) = _emu(emu, [W], x, tg)
    want = W.astype(np.float64) @ x.astype(np.float64)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL * np.abs(want).max())


@pytest.mark.parametrize("O0,O1,K,tg", [(512, 512, 4096, 256), (3, 9, 200, 32)])
def test_emulated_pair_matches_numpy(emu, O0, O1, K, tg):
    rng = np.random.default_rng(O0 + O1)
    W, x = _case(rng, O0, K)
    W2 = rng.standard_normal((O1, K)).astype(np.float32)
    y, y2 = _emu(emu, [W, W2], x, tg)
    for got, w in ((y, W), (y2, W2)):
        want = w.astype(np.float64) @ x.astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * np.abs(want).max())


@pytest.mark.parametrize("pos", [0, 5, 130])
def test_emulated_pair_adds_the_ape_row(emu, pos):
    """The compressor's pair: row pos % m of `ape` added to the gate (second) output only."""
    rng = np.random.default_rng(pos)
    W, x = _case(rng, 6, 256)
    W2 = rng.standard_normal((10, 256)).astype(np.float32)
    ape = rng.standard_normal((4, 10)).astype(np.float32)
    y, y2 = _emu(emu, [W, W2], x, 32, ape=ape, pos=pos)
    y_plain, y2_plain = _emu(emu, [W, W2], x, 32)
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_array_equal(y2, y2_plain + ape[pos % 4])  # the ops path's fp32 add
    assert np.abs(y2 - (y2_plain + ape[(pos + 1) % 4])).max() > 1e-3


def test_emulated_bf16_weights_rounded_and_scaled(emu):
    """`linear_scaled`: bf16 W (the indexer's weights_proj), the sum rounded to bf16 as the
    bf16 linear layer rounds its output, then times the scale in fp32."""
    rng = np.random.default_rng(9)
    O, K = 64, 4096
    Wb = np.array(mx.array(rng.standard_normal((O, K)).astype(np.float32) / 64).astype(
        mx.bfloat16).astype(mx.float32))
    xb = np.array(mx.array(rng.standard_normal(K).astype(np.float32)).astype(mx.bfloat16).astype(
        mx.float32))
    scale = 1.0 / (np.sqrt(128) * np.sqrt(64))
    (y,) = _emu(emu, [bf16_bits(Wb)], xb, 256, rt="bfloat16", scale=float(scale))
    exact = Wb.astype(np.float64) @ xb.astype(np.float64)
    rounded = np.array(mx.array(exact.astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))
    want = rounded * np.float32(scale)
    # the fp32 sum may round to the neighbouring bf16 where `exact` sits near a midpoint
    ulp = np.abs(rounded) * 2.0 ** -7
    assert (np.abs(y - want) <= ulp * scale + 1e-12).all()
    assert (y == want).mean() > 0.95
    # the rounding happens: unrounded sums differ
    (y32,) = _emu(emu, [Wb], xb, 256, scale=float(scale))
    assert (y32 != y).mean() > 0.5
    # the ops path (MLX's bf16 matmul, cast, multiply) within the same ulp
    ops = np.array(kg.linear_scaled_ops(mx.array(Wb).astype(mx.bfloat16),
                                        mx.array(xb).astype(mx.bfloat16)[None], float(scale)))[0]
    assert (np.abs(y - ops) <= ulp * scale + 1e-12).all()


def test_emulated_can_fail(emu):
    """Not vacuous: the pair's second output is its own weight's, not the first's."""
    rng = np.random.default_rng(3)
    W, x = _case(rng, 4, 64)
    W2 = rng.standard_normal((4, 64)).astype(np.float32)
    _, y2 = _emu(emu, [W, W2], x, 32)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(y2, W @ x, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# Metal and CUDA sources

def _launch(dialect, xt, pair, K=16384, O0=24, wt="float32", rt="float32", sc=False, m=0):
    inputs = ([(wt, 2, O0 * K)] * (2 if pair else 1)
              + [(xt, 1, K), ("float32", 1, 1), ("float32", 2 if m else 1, max(m, 1) * O0),
                 ("int32", 1, 1)])
    return (src.gemv_source(dialect, pair, wt == "float32"), inputs, ["float32"] * (2 if pair else 1),
            [("XT", xt), ("WT", wt), ("K", K), ("TG", kg.TG), ("O0", O0), ("RT", rt), ("SC", sc),
             *([("O1", O0), ("M", m)] if pair else [])])


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("xt", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("pair", [False, True])
def test_metal_source_compiles_as_cpp(xt, pair, tmp_path):
    assert_metal_compiles(_launch("metal", xt, pair), tmp_path, f"gemv_{xt}_{pair}")
    if pair:  # the compressor's, with the ape row
        assert_metal_compiles(_launch("metal", xt, pair, m=4), tmp_path, f"gemv_{xt}_ape")
    elif xt != "float32":  # weights_proj: half weights, rounded and scaled
        assert_metal_compiles(_launch("metal", xt, pair, K=4096, O0=64, wt=xt, rt=xt, sc=True),
                              tmp_path, f"gemv_{xt}_scaled")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("pair", [False, True])
def test_cuda_source_compiles_with_nvcc(pair, tmp_path):
    assert_nvcc_compiles(_launch("cuda", "bfloat16", pair), tmp_path, f"gemv_{pair}")


def test_bodies_stay_in_the_common_subset():
    for pair in (False, True):
        for wf32 in (False, True):
            assert_common_subset(src.gemv_source("metal", pair, wf32))


# --------------------------------------------------------------------------------------------
# dispatch

def test_cpu_uses_ops(clean_dispatch):
    rng = np.random.default_rng(0)
    W, x = _case(rng, 6, 64)
    got = kg.matvec(mx.array(W), mx.array(x)[None, None])
    assert got.shape == (1, 1, 6)
    np.testing.assert_array_equal(np.array(got), np.array(kg.matvec_ops(mx.array(W),
                                                                         mx.array(x)[None, None])))


def test_flat_input(clean_dispatch):
    """`matvec_flat` takes the whole of x as the vector (the mHC mix of [1, 1, n, D] streams)."""
    rng = np.random.default_rng(1)
    W, x = _case(rng, 6, 64)
    xm = mx.array(x).reshape(1, 1, 4, 16)
    got = kg.matvec_flat(mx.array(W), xm)
    assert got.shape == (1, 6)
    np.testing.assert_allclose(np.array(got)[0], W.astype(np.float64) @ x, rtol=RTOL, atol=ATOL)


def test_cpu_paths_are_the_layers_ops(clean_dispatch):
    """On the CPU: the pair's ape row and the scaled linear are exactly the ops they replace."""
    rng = np.random.default_rng(2)
    W, x = _case(rng, 6, 64)
    W2, ape = mx.array(rng.standard_normal((8, 64)).astype(np.float32)), mx.array(
        rng.standard_normal((4, 8)).astype(np.float32))
    xm = mx.array(x)[None, None]
    _, g = kg.matvec_pair(mx.array(W), W2, xm, ape, 7)
    np.testing.assert_array_equal(np.array(g), np.array(kg.matvec_ops(W2, xm) + ape[3:4]))
    Wb, xb = mx.array(W).astype(mx.bfloat16), xm.astype(mx.bfloat16)
    np.testing.assert_array_equal(np.array(kg.linear_scaled(Wb, xb, 0.25)),
                                  np.array((xb @ Wb.T).astype(mx.float32) * 0.25))


def test_constant_inputs_are_vectors(clean_dispatch, monkeypatch):
    """The kernel's scale / ape inputs are [1] arrays (a 0-d input is a reference, not a
    pointer, in MLX's Metal signature): no other shape may sit under their shared keys, e.g.
    the router's 0-d scale 1.0 made first (a review finding)."""
    import contextlib

    from dsv4_mlx.kernels import router

    router.route_ops(mx.zeros((1, 8)), mx.zeros((8,)), None, 2, 1.0)  # its ("f32", 1.0)
    seen = []

    def fake_build(backend, ks):
        def run(*, inputs, output_shapes, output_dtypes, **kw):
            seen.append(inputs)
            return [mx.zeros(sh, dt) for sh, dt in zip(output_shapes, output_dtypes)]
        return run

    monkeypatch.setattr(dispatch, "build_kernel", fake_build)
    monkeypatch.setattr(mx, "stream", lambda *_: contextlib.nullcontext())
    kg._launch("cuda", (mx.zeros((2, 8)),), mx.zeros((8,)))
    kg._launch("cuda", (mx.zeros((2, 8)), mx.zeros((3, 8))), mx.zeros((8,)),
               ape=mx.zeros((4, 3)), offset=1)
    for inputs in seen:
        assert all(a.ndim >= 1 for a in inputs), [a.shape for a in inputs]


def test_env_var_validated(clean_dispatch):
    clean_dispatch.setenv(kg.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=kg.ENV_VAR):
        kg.matvec(mx.zeros((2, 8)), mx.zeros((1, 8)))


# --------------------------------------------------------------------------------------------
# on a GPU

GPU = dispatch.available_backends()
needs_gpu = pytest.mark.skipif(not GPU, reason="no Metal or CUDA backend in this MLX")


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("O,K", [(24, 16384), (256, 4096), (9, 100)])
def test_gpu_matches_ops(clean_dispatch, dtype, O, K):
    rng = np.random.default_rng(O + K)
    W, x = _case(rng, O, K)
    with mx.stream(mx.gpu):
        Wm = mx.array(W)
        xm = mx.array(x).astype(getattr(mx, dtype)).reshape(1, 1, K)
        assert kg._backend((Wm,), xm) != "ops"
        got = kg.matvec(Wm, xm)
        want = kg.matvec_ops(Wm, xm)
        assert got.shape == want.shape == (1, 1, O) and got.dtype == mx.float32
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=RTOL,
                                   atol=ATOL * float(mx.abs(want).max()))
        flat = kg.matvec_flat(Wm, xm.reshape(1, 1, 2, K // 2) if K % 2 == 0 else xm)
        np.testing.assert_array_equal(np.array(flat), np.array(got).reshape(1, O))
        W2 = mx.array(rng.standard_normal((O + 3, K)).astype(np.float32))
        g1, g2 = kg.matvec_pair(Wm, W2, xm)
        np.testing.assert_array_equal(np.array(g1), np.array(got))  # same rows, same sums
        w2 = kg.matvec_ops(W2, xm)
        np.testing.assert_allclose(np.array(g2), np.array(w2), rtol=RTOL,
                                   atol=ATOL * float(mx.abs(w2).max()))
        ape = mx.array(rng.standard_normal((4, O + 3)).astype(np.float32))
        _, g3 = kg.matvec_pair(Wm, W2, xm, ape, 6)
        np.testing.assert_array_equal(np.array(g3), np.array(g2 + ape[2:3]))


@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_linear_scaled_matches_ops(clean_dispatch, dtype):
    """The indexer's weights_proj (64 x 4096): kernel vs the half-precision linear + cast +
    multiply, within one output ulp (another summation order may round the other way)."""
    dt = getattr(mx, dtype)
    rng = np.random.default_rng(4)
    with mx.stream(mx.gpu):
        W = mx.array(rng.standard_normal((64, 4096)).astype(np.float32) / 64).astype(dt)
        x = mx.array(rng.standard_normal((1, 1, 4096)).astype(np.float32)).astype(dt)
        assert kg._backend((W,), x, wdtypes=(mx.bfloat16, mx.float16), variant="scaled") != "ops"
        got = np.array(kg.linear_scaled(W, x, 0.011))
        want = np.array(kg.linear_scaled_ops(W, x, 0.011))
        ulp = np.abs(want) * (2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10)
        assert got.shape == want.shape == (1, 1, 64)
        assert (np.abs(got - want) <= ulp + 1e-9).all()


@needs_gpu
def test_gpu_falls_back_where_it_does_not_apply(clean_dispatch):
    """Several tokens, bf16 weights, K not a multiple of 4: the ops path."""
    with mx.stream(mx.gpu):
        assert kg._backend((mx.zeros((4, 64)),), mx.zeros((1, 2, 64))) == "ops"
        assert kg._backend((mx.zeros((4, 64), mx.bfloat16),), mx.zeros((1, 1, 64))) == "ops"
        assert kg._backend((mx.zeros((4, 66)),), mx.zeros((1, 1, 66))) == "ops"


@needs_gpu
def test_gpu_model_with_kernel_matches_ops(clean_dispatch):
    """A whole tiny model (fp32, prefill then decode: the decode steps' mHC mixes, routers and
    compressors go through the kernel) against the same model with DSV4_GEMV_KERNEL=ops."""
    from conftest import gpu_logits_kernel_on_off

    got, want = gpu_logits_kernel_on_off(clean_dispatch, kg.ENV_VAR)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
