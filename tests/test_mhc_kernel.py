"""Fused mHC kernels (spec §4.2, §4.3): the shared body against the ops path.

On any machine: the body compiled as C++ with the CPU-emulation dialect and run against
`model.mhc`'s ops (parameters, Sinkhorn, collapse, expand); the Metal source compiled as C++
against the stand-in <metal_stdlib>; the CUDA source with nvcc where there is one; the
dispatch. On a GPU: the kernels against the ops path, and a whole model with the kernels
against the same model with ``DSV4_MHC_KERNEL=ops``.
"""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest
from test_indexer_kernel import CXX, NVCC, assert_metal_compiles, assert_nvcc_compiles

from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import mhc as km
from dsv4_mlx.kernels import mhc_source as src
from dsv4_mlx.model import mhc as ops
from dsv4_mlx.model.layers import RMSNorm

RTOL, ATOL = 2e-5, 2e-6


def _case(rng, N, n, D, sharp=1.0):
    X = rng.standard_normal((N, n, D)).astype(np.float32)
    fn = (rng.standard_normal(((2 + n) * n, n * D)) * sharp / np.sqrt(n * D)).astype(np.float32)
    scale = (rng.uniform(0.5, 2.0, 3) * sharp).astype(np.float32)
    base = rng.standard_normal((2 + n) * n).astype(np.float32)
    return X, fn, scale, base


def _ops_pre(X, fn, scale, base, iters, hc_eps=1e-6, norm_eps=1e-6):
    Xm = mx.array(X)[None]
    n = X.shape[1]
    pre, post, comb = ops.hc_params(Xm, mx.array(fn), mx.array(scale), mx.array(base), n, iters,
                                    hc_eps, norm_eps)
    h = ops.collapse(Xm, pre)
    return [np.array(a[0]) for a in (h, post, comb)]


def _emu_pre(emu, X, fn, scale, base, iters, tg, hc_eps=1e-6, norm_eps=1e-6, wn=None,
             out_eps=1e-6, head=False, sink=km.PRE_SINK, reg=km.PRE_REG):
    N, n, D = X.shape
    mixraw = (X.reshape(N, n * D).astype(np.float64) @ fn.T.astype(np.float64)).astype(np.float32)
    eps = np.array([hc_eps, norm_eps, out_eps], np.float32)
    return emu.run(src.pre_source("cpp"),
                   [X, mixraw, scale, base, eps, np.zeros(1, np.float32) if wn is None else wn],
                   [(N, D), (1,), (1,)] if head else [(N, D), (N, n), (N, n, n)], ["float32"] * 3,
                   [("XT", "float32"), ("NS", n), ("D", D), ("ITERS", iters), ("TG", tg),
                    ("HEAD", head), ("NORM", wn is not None), ("SINK", sink), ("REG", reg)],
                   (N * tg, 1, 1), tg)


@pytest.mark.parametrize("N,n,D,iters,tg", [(3, 4, 64, 20, 32), (5, 4, 72, 20, 32),
                                            (2, 2, 40, 3, 64), (1, 4, 256, 1, 256),
                                            (1, 4, 4096, 20, 512), (2, 3, 64, 5, 32),
                                            (1, 4, 4096, 2, 128)])
def test_emulated_pre_matches_ops(emu, N, n, D, iters, tg):
    """Values a thread held in registers (D a multiple of TG, <= 64 a thread: 8, 4, 32, and
    6 - not a multiple of 4 - a thread) or read twice (D not a multiple of TG, 128 a
    thread)."""
    rng = np.random.default_rng(N * 100 + D)
    X, fn, scale, base = _case(rng, N, n, D)
    got = _emu_pre(emu, X, fn, scale, base, iters, tg)
    want = _ops_pre(X, fn, scale, base, iters)
    for name, g, w in zip(("h", "post", "comb"), got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=name)
    # comb is doubly stochastic up to the Sinkhorn residual after `iters` rounds
    np.testing.assert_allclose(got[2].sum(axis=-2), 1.0, atol=1e-5)


@pytest.mark.parametrize("N,n,D,tg", [(3, 4, 64, 32), (2, 4, 4096, 512), (2, 3, 72, 16)])
def test_emulated_head_matches_ops(emu, N, n, D, tg):
    """The HEAD variant (final collapse: sigmoid weights of an n-row projection, no Sinkhorn)
    against `model.mhc.hc_head`."""
    rng = np.random.default_rng(N + D)
    X = rng.standard_normal((N, n, D)).astype(np.float32)
    fn = (rng.standard_normal((n, n * D)) / np.sqrt(n * D)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 1).astype(np.float32)
    base = rng.standard_normal(n).astype(np.float32)
    h, _, _ = _emu_pre(emu, X, fn, scale, base, 1, tg, head=True)
    # against hc_head's formula in float64 (MLX's fp32 CPU matmul of the mix is itself ~5e-6
    # off at D = 4096, the kernel ~4e-7), and the ops path loosely (same formula, not a typo)
    x64 = X.astype(np.float64).reshape(N, n * D)
    rs = 1.0 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
    pre = 1.0 / (1.0 + np.exp(-((x64 @ fn.T.astype(np.float64)) * rs * scale[0] + base))) + 1e-6
    ref = (pre[:, :, None] * X.astype(np.float64)).sum(1)
    np.testing.assert_allclose(h, ref, rtol=RTOL, atol=ATOL)
    want = ops.hc_head(mx.array(X)[None], mx.array(fn), mx.array(scale), mx.array(base), 1e-6,
                       1e-6)
    np.testing.assert_allclose(h, np.array(want[0]), rtol=1e-4, atol=1e-5)
    # not vacuous: the pre-variant's weights (other logits) give another collapse
    plain = ops.collapse(mx.array(X)[None], mx.full((1, N, n), 1.0 / n))
    assert np.abs(h - np.array(plain[0])).max() > 100 * ATOL


@pytest.mark.parametrize("N,n,D,tg,head", [(3, 4, 64, 32, False), (1, 4, 4096, 512, False),
                                            (2, 4, 72, 32, False), (2, 3, 100, 32, True),
                                            (1, 4, 4096, 512, True)])
def test_emulated_pre_with_norm_matches_ops(emu, N, n, D, tg, head):
    """NORM: the collapse comes out through the block's RMSNorm (weight, eps) as
    `mx.fast.rms_norm` computes it, from registers (KEEP) or read back (D not a multiple of
    TG); with HEAD, the model's final norm after the head collapse."""
    rng = np.random.default_rng(N * 7 + D)
    X, fn, scale, base = _case(rng, N, n, D)
    if head:
        fn, scale, base = fn[:n], scale[:1], base[:n]
    wn = rng.uniform(0.5, 1.5, D).astype(np.float32)
    got = _emu_pre(emu, X, fn, scale, base, 20, tg, wn=wn, out_eps=1e-2, head=head)
    if head:
        h = ops.hc_head(mx.array(X)[None], mx.array(fn), mx.array(scale), mx.array(base), 1e-6,
                        1e-6)[0]
    else:
        h = mx.array(_ops_pre(X, fn, scale, base, 20)[0])
    want = np.array(mx.fast.rms_norm(h, mx.array(wn), 1e-2))
    np.testing.assert_allclose(got[0], want, rtol=1e-4 if head else RTOL,
                               atol=1e-5 if head else ATOL)
    if not head:  # the parameters are unchanged by the norm
        plain = _emu_pre(emu, X, fn, scale, base, 20, tg)
        for g, w in zip(got[1:], plain[1:]):
            np.testing.assert_array_equal(g, w)
    # not vacuous: the mix norm's eps (1e-6) in place of the output norm's is caught
    other = np.array(mx.fast.rms_norm(h, mx.array(wn), 1e-6))
    assert np.abs(got[0] - other).max() > 100 * ATOL


@pytest.mark.parametrize("N,n,D,tg,norm", [(2, 4, 4096, 512, False), (3, 4, 64, 32, True),
                                            (2, 3, 72, 64, False), (1, 2, 256, 128, True)])
def test_emulated_pre_variants_give_the_same_bits(emu, N, n, D, tg, norm):
    """Who runs the Sinkhorn (every warp, warp 0, thread 0) and whether the values stay in
    registers change only the speed: h, post and comb are bit-identical across all six."""
    rng = np.random.default_rng(N * 11 + D)
    X, fn, scale, base = _case(rng, N, n, D, sharp=4.0)
    wn = rng.uniform(0.5, 1.5, D).astype(np.float32) if norm else None
    outs = {(sink, reg): _emu_pre(emu, X, fn, scale, base, 20, tg, wn=wn, sink=sink, reg=reg)
            for sink in (0, 1, 2) for reg in (False, True)}
    ref = outs[(km.PRE_SINK, km.PRE_REG)]
    for key, got in outs.items():
        for name, g, w in zip(("h", "post", "comb"), got, ref):
            np.testing.assert_array_equal(g, w, err_msg=f"{name} SINK/REG {key}")
    want = _ops_pre(X, fn, scale, base, 20)
    np.testing.assert_allclose(ref[2], want[2], rtol=RTOL, atol=ATOL)
    # not vacuous: two rounds instead of 20 change comb
    fewer = _emu_pre(emu, X, fn, scale, base, 2, tg, wn=wn, sink=1)
    assert not np.array_equal(fewer[2], ref[2])


def test_emulated_pre_sharp_logits(emu):
    """Large logits (softmax saturates; the max subtraction matters)."""
    rng = np.random.default_rng(7)
    X, fn, scale, base = _case(rng, 4, 4, 64, sharp=30.0)
    got = _emu_pre(emu, X, fn, scale, base, 20, 64)
    want = _ops_pre(X, fn, scale, base, 20)
    assert np.isfinite(got[2]).all()
    for name, g, w in zip(("h", "post", "comb"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_emulated_pre_can_fail(emu):
    """The comparison is not vacuous: one Sinkhorn round fewer is caught."""
    rng = np.random.default_rng(3)
    X, fn, scale, base = _case(rng, 3, 4, 64, sharp=4.0)
    got = _emu_pre(emu, X, fn, scale, base, 2, 32)
    want = _ops_pre(X, fn, scale, base, 3)
    assert np.abs(got[2] - want[2]).max() > 100 * ATOL


@pytest.mark.parametrize("N,n,D,tg", [(3, 4, 64, 32), (2, 4, 70, 32), (1, 2, 16, 256)])
def test_emulated_post_matches_ops(emu, N, n, D, tg):
    rng = np.random.default_rng(D)
    X = rng.standard_normal((N, n, D)).astype(np.float32)
    F = rng.standard_normal((N, D)).astype(np.float32)
    post = rng.uniform(0, 2, (N, n)).astype(np.float32)
    comb = rng.uniform(0, 1, (N, n, n)).astype(np.float32)
    (Y,) = emu.run(src.post_source("cpp"), [X, F, post, comb, np.zeros(1, np.float32)],
                   [(N, n, D)], ["float32"],
                   [("XT", "float32"), ("FT", "float32"), ("RT", "float32"), ("KR", 0), ("NS", n),
                    ("D", D), ("TG", tg)],
                   (-(-D // tg) * tg, N, 1), tg)
    want = ops.expand(mx.array(X)[None], mx.array(F)[None], mx.array(post)[None],
                      mx.array(comb)[None])
    np.testing.assert_allclose(Y, np.array(want[0]), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("N,n,D,k,tg", [(3, 4, 64, 6, 32), (2, 4, 70, 1, 32), (1, 2, 16, 8, 256)])
def test_emulated_post_with_moe_parts_matches_ops(emu, N, n, D, k, tg):
    """After the MoE: F = the shared expert's output, R = the k routed outputs; the kernel
    combines them as `combine_moe` does, then expands."""
    rng = np.random.default_rng(D + k)
    X = rng.standard_normal((N, n, D)).astype(np.float32)
    F = rng.standard_normal((N, D)).astype(np.float32)
    R = rng.standard_normal((N, k, 1, D)).astype(np.float32)
    post = rng.uniform(0, 2, (N, n)).astype(np.float32)
    comb = rng.uniform(0, 1, (N, n, n)).astype(np.float32)
    (Y,) = emu.run(src.post_source("cpp"), [X, F, post, comb, R], [(N, n, D)], ["float32"],
                   [("XT", "float32"), ("FT", "float32"), ("RT", "float32"), ("KR", k), ("NS", n),
                    ("D", D), ("TG", tg)],
                   (-(-D // tg) * tg, N, 1), tg)
    Xm = mx.array(X)[None]
    want = ops.expand(Xm, km.combine_moe(mx.array(R)[None], mx.array(F)[None], Xm.dtype),
                      mx.array(post)[None], mx.array(comb)[None])
    np.testing.assert_allclose(Y, np.array(want[0]), rtol=RTOL, atol=ATOL)
    # and the routed outputs matter (not vacuous)
    plain = ops.expand(Xm, mx.array(F)[None], mx.array(post)[None], mx.array(comb)[None])
    assert np.abs(Y - np.array(plain[0])).max() > 100 * ATOL


# --------------------------------------------------------------------------------------------
# Metal and CUDA sources

_VARIANTS = [(xt, ft) for xt in ("float32", "bfloat16", "float16") for ft in (xt, "float32")]


def _launches(dialect, xt, ft):
    """(name, source, inputs, output dtypes, template) of both kernels at Flash sizes."""
    return [
        *[(f"pre{'_norm' * norm}_D{D}_sink{sink}_reg{int(reg)}", src.pre_source(dialect),
           [(xt, 3, 65536), ("float32", 2, 24), ("float32", 1, 3), ("float32", 1, 24),
            ("float32", 1, 3), (xt, 1, 4096)], [xt, "float32", "float32"],
           [("XT", xt), ("NS", 4), ("D", D), ("ITERS", 20), ("TG", km.PRE_TG),
            ("HEAD", False), ("NORM", norm), ("SINK", sink), ("REG", reg)])
          for norm in (False, True) for D in (4096, 1000)
          for sink, reg in ((km.PRE_SINK, km.PRE_REG), (0, False), (1, True))],
        *[(f"head{'_norm' * norm}", src.pre_source(dialect),
           [(xt, 3, 65536), ("float32", 2, 4), ("float32", 1, 1), ("float32", 1, 4),
            ("float32", 1, 3), (xt, 1, 4096)], [xt, "float32", "float32"],
           [("XT", xt), ("NS", 4), ("D", 4096), ("ITERS", 1), ("TG", km.PRE_TG),
            ("HEAD", True), ("NORM", norm), ("SINK", km.PRE_SINK), ("REG", km.PRE_REG)])
          for norm in (False, True)],
        ("post", src.post_source(dialect),
         [(xt, 3, 65536), (ft, 2, 4096), ("float32", 2, 4), ("float32", 3, 16),
          ("float32", 1, 1)], [xt],
         [("XT", xt), ("FT", ft), ("RT", "float32"), ("KR", 0), ("NS", 4), ("D", 4096),
          ("TG", 256)]),
        ("post_moe", src.post_source(dialect),
         [(xt, 3, 65536), (ft, 2, 4096), ("float32", 2, 4), ("float32", 3, 16),
          (xt, 4, 6 * 4096)], [xt],
         [("XT", xt), ("FT", ft), ("RT", xt), ("KR", 6), ("NS", 4), ("D", 4096),
          ("TG", 256)]),
    ]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("xt,ft", _VARIANTS)
def test_metal_sources_compile_as_cpp(xt, ft, tmp_path):
    for name, ks, inputs, outs, tmpl in _launches("metal", xt, ft):
        code = assert_metal_compiles((ks, inputs, outs, tmpl), tmp_path, f"mhc_{name}_{xt}_{ft}")
        assert "[[threadgroup_position_in_grid]]" in code


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    for name, ks, inputs, outs, tmpl in _launches("cuda", "bfloat16", "bfloat16"):
        assert_nvcc_compiles((ks, inputs, outs, tmpl), tmp_path, name)


# --------------------------------------------------------------------------------------------
# dispatch


def test_cpu_uses_ops(clean_dispatch):
    rng = np.random.default_rng(0)
    X, fn, scale, base = _case(rng, 2, 4, 32)
    Xm = mx.array(X)[None]
    h, post, comb = km.hc_pre(Xm, mx.array(fn), mx.array(scale), mx.array(base), 4, 20, 1e-6, 1e-6)
    want = _ops_pre(X, fn, scale, base, 20)
    for g, w in zip((h, post, comb), want):
        np.testing.assert_array_equal(np.array(g[0]), w)  # the very same ops


def test_more_streams_than_a_warp_holds_use_ops(clean_dispatch):
    """The pre kernel holds the n x n Sinkhorn matrix in one warp's 32 lanes: n = 6 must go
    to the ops path (and n = 4 to the kernel) even where a GPU kernel would be chosen."""
    calls = []
    clean_dispatch.setattr(dispatch, "select_backend", lambda env_var=None, default="auto": "ops" if default == "ops" else "cuda")
    clean_dispatch.setattr(dispatch, "kernel_usable", lambda key, probe, what: True)
    clean_dispatch.setattr(km, "hc_pre_kernel", lambda *a, **k: calls.append(a[0].shape[2]))
    for n in (6, 4):
        rng = np.random.default_rng(n)
        X, fn, scale, base = _case(rng, 1, n, 32)
        km.hc_pre(mx.array(X)[None], mx.array(fn), mx.array(scale), mx.array(base), n, 20,
                  1e-6, 1e-6)
    assert calls == [4]


def test_env_var_validated(clean_dispatch):
    clean_dispatch.setenv(km.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=km.ENV_VAR):
        km.hc_post(mx.zeros((1, 1, 4, 8)), mx.zeros((1, 1, 8)), mx.zeros((1, 1, 4)),
                   mx.zeros((1, 1, 4, 4)))


# --------------------------------------------------------------------------------------------
# on a GPU

GPU = dispatch.available_backends()
needs_gpu = pytest.mark.skipif(not GPU, reason="no Metal or CUDA backend in this MLX")


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("N,D", [(1, 4096), (7, 4096), (3, 1000)])
def test_gpu_kernels_match_ops(clean_dispatch, dtype, N, D):
    backend = GPU[0]
    dt = getattr(mx, dtype)
    rng = np.random.default_rng(N + D)
    X, fn, scale, base = _case(rng, N, 4, D)
    with mx.stream(mx.gpu):
        Xm = mx.array(X)[None].astype(dt)
        args = (mx.array(fn), mx.array(scale), mx.array(base))
        got = km.hc_pre_kernel(Xm, *args, 20, 1e-6, 1e-6, backend=backend)
        pre, post, comb = ops.hc_params(Xm, *args, 4, 20, 1e-6, 1e-6)
        want = (ops.collapse(Xm, pre), post, comb)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
        for name, g, w in zip(("h", "post", "comb"), got, want):
            np.testing.assert_allclose(np.array(g.astype(mx.float32)),
                                       np.array(w.astype(mx.float32)), err_msg=name, **tol)
        F = mx.array(rng.standard_normal((1, N, D)).astype(np.float32)).astype(dt)
        y = km.hc_post_kernel(Xm, F, post, comb, backend=backend)
        w = ops.expand(Xm, F, post, comb)
        np.testing.assert_allclose(np.array(y.astype(mx.float32)), np.array(w.astype(mx.float32)),
                                   **tol)
        # through the block's RMSNorm (NORM): against the ops collapse then mx.fast.rms_norm
        norm = RMSNorm(D, 1e-5)
        norm.weight = mx.array(rng.uniform(0.5, 1.5, D).astype(np.float32))
        hn, post_n, comb_n = km.hc_pre_kernel(Xm, *args, 20, 1e-6, 1e-6, backend=backend,
                                              norm=norm)
        np.testing.assert_allclose(np.array(hn.astype(mx.float32)),
                                   np.array(norm(want[0]).astype(mx.float32)), err_msg="normed",
                                   **tol)
        assert np.array_equal(np.array(post_n), np.array(got[1]))
        R = mx.array(rng.standard_normal((1, N, 6, 1, D)).astype(np.float32)).astype(dt)
        y = km.hc_post_kernel(Xm, F, post, comb, R, backend=backend)
        w = ops.expand(Xm, km.combine_moe(R, F, Xm.dtype), post, comb)
        np.testing.assert_allclose(np.array(y.astype(mx.float32)), np.array(w.astype(mx.float32)),
                                   **tol)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("N", [1, 5])
def test_gpu_head_matches_ops(clean_dispatch, dtype, N):
    """The head collapse through the kernel (one token: its mix through the GEMV kernel)."""
    dt = getattr(mx, dtype)
    rng = np.random.default_rng(N)
    n, D = 4, 4096
    with mx.stream(mx.gpu):
        X = mx.array(rng.standard_normal((1, N, n, D)).astype(np.float32)).astype(dt)
        fn = mx.array((rng.standard_normal((n, n * D)) / np.sqrt(n * D)).astype(np.float32))
        scale = mx.array(rng.uniform(0.5, 2.0, 1).astype(np.float32))
        base = mx.array(rng.standard_normal(n).astype(np.float32))
        assert km._usable(GPU[0], X, n, D, 1, head=True)
        got = km.hc_head(X, fn, scale, base, 1e-6, 1e-6)
        want = ops.hc_head(X, fn, scale, base, 1e-6, 1e-6)
        assert got.shape == want.shape == (1, N, D) and got.dtype == dt
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(np.array(got.astype(mx.float32)),
                                   np.array(want.astype(mx.float32)), **tol)
        norm = RMSNorm(D, 1e-6)
        norm.weight = mx.array(rng.uniform(0.5, 1.5, D).astype(np.float32))
        assert km._usable(GPU[0], X, n, D, 1, head=True, norm=True)
        got = km.hc_head(X, fn, scale, base, 1e-6, 1e-6, norm)
        np.testing.assert_allclose(np.array(got.astype(mx.float32)),
                                   np.array(norm(want).astype(mx.float32)), **tol)


@needs_gpu
def test_gpu_model_with_kernels_matches_ops(clean_dispatch):
    """A whole tiny model (fp32, prefill then decode) with the mHC kernels against the same
    model with DSV4_MHC_KERNEL=ops."""
    from conftest import gpu_logits_kernel_on_off

    got, want = gpu_logits_kernel_on_off(clean_dispatch, km.ENV_VAR)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert np.abs(got - want).max() < 1e-3
