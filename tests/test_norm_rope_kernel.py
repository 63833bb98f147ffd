"""One token's query/KV norm + RoPE kernel (`kernels.norm_rope`, spec §4.5, §4.4): the shared
body against the ops path.

On any machine: the body compiled as C++ with the CPU-emulation dialect and run against the
ops path (`mx.fast.rms_norm` and `mx.fast.rope`, as the attention uses them) at several row
sizes, RoPE widths and positions; the Metal source compiled as C++ against the stand-in
<metal_stdlib>; the CUDA source with nvcc where there is one; the dispatch. On a GPU: the
kernel against the ops path, and a whole model with the kernel against
``DSV4_NORM_ROPE_KERNEL=ops``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_indexer_kernel import CXX, NVCC, assert_metal_compiles, assert_nvcc_compiles

from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import norm_rope as kn
from dsv4_mlx.kernels import norm_rope_source as src
from dsv4_mlx.model.layers import RMSNorm
from dsv4_mlx.model.rope import RoPE, inv_freq_plain, inv_freq_yarn

# fp32: the sums of squares run in another order than MLX's, and cos/sin of the same fp32
# angle may differ by an ulp between the C library and MLX's CPU rope
RTOL, ATOL = 1e-5, 1e-6


def _rope(rd, yarn=False):
    inv = (inv_freq_yarn(160000.0, rd, 16.0, 65536, 32, 1) if yarn
           else inv_freq_plain(10000.0, rd))
    return RoPE(inv, rd)


def _case(rng, H, C):
    q = (rng.standard_normal((1, 1, H * C)) * rng.uniform(0.1, 5.0)).astype(np.float32)
    kv = (rng.standard_normal((1, 1, C)) * 3).astype(np.float32)
    norm = RMSNorm(C, 1e-2)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, C).astype(np.float32))
    return q, kv, norm


def _emu(emu, q, kv, norm, q_eps, rope, pos):
    C = kv.shape[-1]
    H = q.shape[-1] // C
    per, tg, p2 = kn.launch_shape(C)
    qo, kvo = emu.run(src.norm_rope_source("cpp"),
                      [q, kv, np.array(norm.weight), np.array(rope.inv_freq_f32()),
                       np.array([pos], np.int32), np.array([q_eps, norm.eps], np.float32)],
                      [(1, H, 1, C), (1, 1, C)], ["float32", "float32"],
                      [("XT", "float32"), ("H", H), ("C", C), ("RD", rope.dims), ("PER", per),
                       ("TG", tg), ("P2", p2)], ((H + 1) * tg, 1, 1), tg)
    return qo, kvo


def _ops(q, kv, norm, q_eps, rope, pos):
    qo, kvo = kn.norm_rope_ops(mx.array(q), mx.array(kv), norm, q_eps, rope, pos)
    return np.array(qo), np.array(kvo)


@pytest.mark.parametrize("H,C,rd,pos,yarn", [
    (64, 512, 64, 0, False), (64, 512, 64, 4095, True), (8, 512, 64, 524287, True),
    (4, 64, 16, 17, False), (3, 40, 8, 100, False), (2, 1000, 64, 33, True),
    (5, 96, 96, 7, False),  # RoPE over the whole row
])
def test_emulated_matches_ops(emu, H, C, rd, pos, yarn):
    """Row sizes splitting as 4 values x 128 threads (Flash/Pro), 2 x 32, 2 x 20 (threads not
    a power of two), 8 x 125; positions up to 512K."""
    rng = np.random.default_rng(H * C + pos)
    q, kv, norm = _case(rng, H, C)
    rope = _rope(rd, yarn)
    got = _emu(emu, q, kv, norm, 1e-6, rope, pos)
    want = _ops(q, kv, norm, 1e-6, rope, pos)
    for name, g, w in zip(("q", "kv"), got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=name)


def test_emulated_can_fail(emu):
    """Not vacuous: the query's eps in place of the KV's, and the position one off, are caught;
    the leading (non-RoPE) dims come out as the plain norm."""
    rng = np.random.default_rng(1)
    q, kv, norm = _case(rng, 4, 64)
    rope = _rope(16)
    got = _emu(emu, q, kv, norm, 1e-6, rope, 300)
    other_eps = RMSNorm(64, 1e-6)
    other_eps.weight = norm.weight
    assert np.abs(got[1] - _ops(q, kv, other_eps, 1e-6, rope, 300)[1]).max() > 100 * ATOL
    assert np.abs(got[0] - _ops(q, kv, norm, 1e-6, rope, 301)[0]).max() > 100 * ATOL
    plain = np.array(mx.fast.rms_norm(mx.array(q).reshape(1, 4, 1, 64), None, 1e-6))
    np.testing.assert_array_equal(got[0][..., :48] == 0, plain[..., :48] == 0)
    np.testing.assert_allclose(got[0][..., :48], plain[..., :48], rtol=RTOL, atol=ATOL)
    assert np.abs(got[0][..., 48:] - plain[..., 48:]).max() > 100 * ATOL


def test_launch_shape():
    assert kn.launch_shape(512) == (4, 128, 128)
    assert kn.launch_shape(40) == (2, 20, 32)
    assert kn.launch_shape(1000) == (8, 125, 128)
    assert kn.launch_shape(63) is None


# --------------------------------------------------------------------------------------------
# Metal and CUDA sources

def _launch(dialect, xt):
    return (src.norm_rope_source(dialect),
            [(xt, 3, 64 * 512), (xt, 3, 512), (xt, 1, 512), ("float32", 1, 32), ("int32", 1, 1),
             ("float32", 1, 2)], [xt, xt],
            [("XT", xt), ("H", 64), ("C", 512), ("RD", 64), ("PER", 4), ("TG", 128), ("P2", 128)])


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("xt", ["float32", "bfloat16", "float16"])
def test_metal_source_compiles_as_cpp(xt, tmp_path):
    code = assert_metal_compiles(_launch("metal", xt), tmp_path, f"norm_rope_{xt}")
    assert "metal::precise::cos" in code


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    assert_nvcc_compiles(_launch("cuda", "bfloat16"), tmp_path, "norm_rope")


# --------------------------------------------------------------------------------------------
# dispatch


def test_cpu_uses_ops(clean_dispatch):
    """On the CPU `norm_rope` is the attention's own ops (the very same values)."""
    rng = np.random.default_rng(0)
    q, kv, norm = _case(rng, 4, 64)
    rope = _rope(16)
    got = kn.norm_rope(mx.array(q), mx.array(kv), norm, 1e-6, rope, 9)
    want = _ops(q, kv, norm, 1e-6, rope, 9)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.array(g), w)


def test_env_var_validated(clean_dispatch):
    clean_dispatch.setenv(kn.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=kn.ENV_VAR):
        kn.norm_rope(mx.zeros((1, 1, 64)), mx.zeros((1, 1, 64)), RMSNorm(64), 1e-6, _rope(16), 0)


# --------------------------------------------------------------------------------------------
# on a GPU

GPU = dispatch.available_backends()
needs_gpu = pytest.mark.skipif(not GPU, reason="no Metal or CUDA backend in this MLX")


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("H,C,rd,pos", [(64, 512, 64, 4095), (8, 512, 64, 300000), (3, 40, 8, 5)])
def test_gpu_kernel_matches_ops(clean_dispatch, dtype, H, C, rd, pos):
    dt = getattr(mx, dtype)
    rng = np.random.default_rng(H + C + pos)
    q, kv, norm = _case(rng, H, C)
    rope = _rope(rd, yarn=True)
    with mx.stream(mx.gpu):
        qm, kvm = mx.array(q).astype(dt), mx.array(kv).astype(dt)
        norm.weight = norm.weight.astype(dt)
        assert kn._backend(qm, kvm, rope) == GPU[0]
        got = kn.norm_rope_kernel(qm, kvm, norm, 1e-6, rope, pos, backend=GPU[0])
        want = kn.norm_rope_ops(qm, kvm, norm, 1e-6, rope, pos)
        # bf16: one ulp where the sum order moves a rounding (values up to ~4)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-2, atol=2e-2)
        for name, g, w in zip(("q", "kv"), got, want):
            assert g.shape == w.shape and g.dtype == dt, name
            np.testing.assert_allclose(np.array(g.astype(mx.float32)),
                                       np.array(w.astype(mx.float32)), err_msg=name, **tol)


@needs_gpu
def test_gpu_model_with_kernel_matches_ops(clean_dispatch):
    """A whole tiny model (fp32, prefill then decode) with the kernel against the same model
    with DSV4_NORM_ROPE_KERNEL=ops."""
    from conftest import gpu_logits_kernel_on_off

    got, want = gpu_logits_kernel_on_off(clean_dispatch, kn.ENV_VAR)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
