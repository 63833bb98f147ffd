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
from test_indexer_kernel import (CXX, NVCC, assert_common_subset, assert_metal_compiles,
                                 assert_nvcc_compiles)

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


def _emu_store(emu, q, kv, norm, q_eps, rope, pos, ring, codec):
    C = kv.shape[-1]
    H = q.shape[-1] // C
    W = ring["nope"].shape[1]
    per, tg, p2 = kn.launch_shape(C)
    return emu.run(src.norm_rope_source("cpp", True),
                   [q, kv, np.array(norm.weight), np.array(rope.inv_freq_f32()),
                    np.array([pos], np.int32), np.array([q_eps, norm.eps], np.float32),
                    ring["nope"], ring["scale"], ring["rope"]],
                   [(1, H, 1, C), ring["nope"].shape, ring["scale"].shape, ring["rope"].shape],
                   ["float32", "uint8", "uint8", "float32"],
                   [("XT", "float32"), ("H", H), ("C", C), ("RD", rope.dims), ("PER", per),
                    ("TG", tg), ("P2", p2), ("NOPE", codec.nope), ("BLK", codec.block),
                    ("W", W)], ((H + W) * tg, 1, 1), tg)


@pytest.mark.parametrize("H,C,R,W,pos", [(64, 512, 64, 128, 4100), (4, 64, 16, 8, 13),
                                         (3, 40, 8, 6, 6),
                                         (3, 42, 8, 6, 9)])  # 34 codes a row: the byte-loop copy
def test_emulated_store_matches_ops(emu, H, C, R, W, pos):
    """The store variant: q as the plain variant's, and the ring as `LayerCache.store_token`
    leaves it (the ops path's encode of the ops path's KV into slot pos % W; every other slot
    copied through)."""
    from dsv4_mlx.cache import LayerCache
    from dsv4_mlx.model.kv_formats import FP8KVCodec

    rng = np.random.default_rng(pos)
    q, kv, norm = _case(rng, H, C)
    rope = _rope(R, yarn=True)
    codec = FP8KVCodec(C, R)
    old = {k: np.array(v) for k, v in codec.encode(mx.array(
        rng.standard_normal((1, W, C)).astype(np.float32))).items()}
    qo, *ring = _emu_store(emu, q, kv, norm, 1e-6, rope, pos, old, codec)
    q_ops, kv_ops = kn.norm_rope_ops(mx.array(q), mx.array(kv), norm, 1e-6, rope, pos)
    np.testing.assert_allclose(qo, np.array(q_ops), rtol=RTOL, atol=ATOL)
    c = LayerCache(W, 0, C, 0, R, "fp8")
    c.ring, c.offset = {k: mx.array(v) for k, v in old.items()}, pos
    c.store_token(kv_ops)
    want = {k: np.array(v) for k, v in c.ring.items()}
    got = dict(zip(("nope", "scale", "rope"), ring))
    slot = pos % W
    for k in want:  # the other slots bit for bit
        np.testing.assert_array_equal(np.delete(got[k], slot, axis=1),
                                      np.delete(want[k], slot, axis=1), err_msg=k)
    # the token's slot: the same scales; codes equal but where the KV's fp32 values (another
    # summation order in the norm) sit on an e4m3 rounding edge, there one code apart
    np.testing.assert_array_equal(got["scale"][:, slot], want["scale"][:, slot])
    np.testing.assert_allclose(got["rope"][:, slot], want["rope"][:, slot], rtol=RTOL, atol=ATOL)
    dg = np.array(codec.decode({k: mx.array(v[:, slot:slot + 1]) for k, v in got.items()}))
    dw = np.array(codec.decode({k: mx.array(v[:, slot:slot + 1]) for k, v in want.items()}))
    assert (got["nope"][:, slot] == want["nope"][:, slot]).mean() > 0.99
    np.testing.assert_allclose(dg, dw, rtol=0.07, atol=1e-6)  # one e4m3 step at most
    # not vacuous: the slot was written (it differs from the old ring's)
    assert (got["nope"][:, slot] != old["nope"][:, slot]).mean() > 0.5


def test_store_dispatch_needs_the_fp8_ring_and_the_store_kernel(clean_dispatch, monkeypatch):
    """The store variant serves a decode step with the FP8 ring when the KV store kernel
    would (``DSV4_KV_STORE_KERNEL=ops`` turns it off too); the bf16 ring keeps the plain one."""
    from dsv4_mlx.cache import LayerCache

    monkeypatch.setattr(dispatch, "select_backend", lambda env=None, default="auto": "ops" if default == "ops" else "cuda")
    monkeypatch.setattr(dispatch, "kernel_usable", lambda key, probe, what: True)
    from dsv4_mlx.kernels import kv_store
    q, kv, rope = mx.zeros((1, 1, 4 * 64), mx.bfloat16), mx.zeros((1, 1, 64), mx.bfloat16), _rope(16)
    fp8 = LayerCache(8, 0, 64, 0, 16, "fp8")
    fp8.ring = fp8.codec.encode(mx.zeros((1, 8, 64), mx.bfloat16))
    assert kn._store_backend(q, kv, rope, fp8) == "cuda"
    bf16 = LayerCache(8, 0, 64, 0, 16, "bf16")
    bf16.ring = bf16.codec.encode(mx.zeros((1, 8, 64), mx.bfloat16))
    assert kn._store_backend(q, kv, rope, bf16) == "ops"
    monkeypatch.setattr(kv_store.dispatch, "select_backend",
                        lambda env=None, default="auto":
                        "ops" if env == kv_store.ENV_VAR or default == "ops" else "cuda")
    assert kn._store_backend(q, kv, rope, fp8) == "ops"


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


def _launch_store(dialect, xt):
    ks, inputs, outs, tmpl = _launch(dialect, xt)
    return (src.norm_rope_source(dialect, True),
            inputs + [("uint8", 3, 128 * 448), ("uint8", 3, 128 * 7), (xt, 3, 128 * 64)],
            [xt, "uint8", "uint8", xt], tmpl + [("NOPE", 448), ("BLK", 64), ("W", 128)])


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("xt", ["float32", "bfloat16", "float16"])
def test_metal_source_compiles_as_cpp(xt, tmp_path):
    code = assert_metal_compiles(_launch("metal", xt), tmp_path, f"norm_rope_{xt}")
    assert "metal::fast::cos" in code  # as MLX's rope kernel
    assert_metal_compiles(_launch_store("metal", xt), tmp_path, f"norm_rope_store_{xt}")


def test_bodies_stay_in_the_common_subset():
    for store in (False, True):
        assert_common_subset(src.norm_rope_source("metal", store))


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    assert_nvcc_compiles(_launch("cuda", "bfloat16"), tmp_path, "norm_rope")
    assert_nvcc_compiles(_launch_store("cuda", "bfloat16"), tmp_path, "norm_rope_store")


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
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_store_matches_ops(clean_dispatch, dtype):
    """The store variant on the GPU: q as the plain kernel's, the ring as the plain kernel's
    KV through the KV store kernel (the same bits: both round the KV to the dtype first)."""
    from dsv4_mlx.cache import LayerCache

    dt = getattr(mx, dtype)
    rng = np.random.default_rng(11)
    H, C, R, W, pos = 64, 512, 64, 128, 5000
    q, kv, norm = _case(rng, H, C)
    rope = _rope(R, yarn=True)
    with mx.stream(mx.gpu):
        qm, kvm = mx.array(q).astype(dt), mx.array(kv).astype(dt)
        norm.weight = norm.weight.astype(dt)
        old = rng.standard_normal((1, W, C)).astype(np.float32)
        caches = []
        for _ in range(2):
            c = LayerCache(W, 0, C, 0, R, "fp8")
            c.ring, c.offset = c.codec.encode(mx.array(old).astype(dt)), pos
            caches.append(c)
        assert kn._store_backend(qm, kvm, rope, caches[0]) == GPU[0]
        got_q, none = kn.norm_rope(qm, kvm, norm, 1e-6, rope, pos, caches[0])
        assert none is None
        want_q, want_kv = kn.norm_rope_kernel(qm, kvm, norm, 1e-6, rope, pos, backend=GPU[0])
        caches[1].store_token(want_kv)
        np.testing.assert_array_equal(np.array(got_q.astype(mx.float32)),
                                      np.array(want_q.astype(mx.float32)))
        for k in ("nope", "scale", "rope"):
            np.testing.assert_array_equal(np.array(caches[0].ring[k].astype(mx.float32)),
                                          np.array(caches[1].ring[k].astype(mx.float32)), err_msg=k)


@needs_gpu
def test_gpu_model_with_kernel_matches_ops(clean_dispatch):
    """A whole tiny model (fp32, prefill then decode) with the kernel against the same model
    with DSV4_NORM_ROPE_KERNEL=ops."""
    from conftest import gpu_logits_kernel_on_off

    got, want = gpu_logits_kernel_on_off(clean_dispatch, kn.ENV_VAR)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
