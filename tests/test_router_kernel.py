"""MoE router kernel (`kernels.router`, spec §4.10): the shared body against the ops path.

On any machine: the body compiled as C++ with the CPU-emulation dialect and run against the
ops path (learned top-k with bias, hash routing, ties, NaN-free extremes, k = E); the Metal
source compiled as C++ against the stand-in <metal_stdlib>; the CUDA source with nvcc where
there is one; the dispatch. On a GPU: the kernel against the ops path, and a whole model with
the kernel against ``DSV4_ROUTER_KERNEL=ops``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_indexer_kernel import (CXX, NVCC, assert_common_subset, assert_metal_compiles,
                                 assert_nvcc_compiles)

from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import router as kr
from dsv4_mlx.kernels import router_source as src

# weights: fp32 scores normalised; the kernel's sum runs in another order than MLX's
RTOL, ATOL = 1e-6, 1e-7


def _emu_route(emu, logits, bias, hidx, k, scale, tg, ids=None):
    N, E = logits.shape
    hashed = hidx is not None
    return emu.run(src.route_source("cpp"),
                   [logits, np.zeros(1, np.float32) if hashed else bias,
                    hidx if hashed else np.zeros(1, np.int32), np.array([scale], np.float32),
                    np.zeros(1, np.int32) if ids is None else ids],
                   [(N, k), (N, k)], ["uint32", "float32"],
                   [("E", E), ("K", k), ("TG", tg), ("HASH", hashed), ("ROWS", ids is not None)],
                   (N * tg, 1, 1), tg)


def _ops_route(logits, bias, hidx, k, scale):
    idx, w = kr.route_ops(mx.array(logits), None if bias is None else mx.array(bias),
                          None if hidx is None else mx.array(hidx), k, scale)
    return np.array(idx), np.array(w)


def _check(got, want, what=""):
    """Same pick sets per token; the weight of each pick equal."""
    (gi, gw), (wi, ww) = got, want
    assert gi.dtype == np.uint32 and wi.dtype == np.uint32
    for t in range(gi.shape[0]):
        assert set(gi[t].tolist()) == set(wi[t].tolist()), f"{what} token {t}: {gi[t]} vs {wi[t]}"
        assert len(set(gi[t].tolist())) == gi.shape[1], f"{what} token {t}: repeated pick {gi[t]}"
        g = dict(zip(gi[t].tolist(), gw[t].tolist()))
        w = dict(zip(wi[t].tolist(), ww[t].tolist()))
        np.testing.assert_allclose([g[e] for e in sorted(g)], [w[e] for e in sorted(w)],
                                   rtol=RTOL, atol=ATOL, err_msg=f"{what} token {t}")


@pytest.mark.parametrize("N,E,k,tg", [(5, 256, 6, 256), (3, 384, 6, 256), (4, 64, 8, 32),
                                      (2, 8, 8, 16), (3, 300, 1, 64)])
def test_emulated_learned_matches_ops(emu, N, E, k, tg):
    rng = np.random.default_rng(E + k)
    logits = (rng.standard_normal((N, E)) * 3).astype(np.float32)
    bias = (rng.standard_normal(E) * 0.5).astype(np.float32)
    got = _emu_route(emu, logits, bias, None, k, 1.5, tg)
    _check(got, _ops_route(logits, bias, None, k, 1.5), f"E={E} k={k}")
    # the kernel lists picks best first (by biased score)
    b = np.sqrt(np.logaddexp(logits, 0)) + bias
    for t in range(N):
        v = b[t, got[0][t].astype(np.int64)]
        assert np.all(np.diff(v) <= 0)


def test_emulated_extremes(emu):
    """Very large and very negative logits (softplus saturates both ways), a bias that beats
    every score, and exact ties between experts (the lower expert wins in the kernel)."""
    E, k = 64, 6
    logits = np.zeros((3, E), np.float32)
    logits[0] = np.linspace(-200, 200, E)
    logits[1, ::2] = 80.0
    logits[1, 1::2] = -80.0
    bias = np.zeros(E, np.float32)
    bias[[5, 9]] = 1e3
    got = _emu_route(emu, logits, bias, None, k, 2.5, 64)
    want = _ops_route(logits[:2], bias, None, k, 2.5)
    _check((got[0][:2], got[1][:2]), want)
    # token 2: all logits 0, only the biased two stand out; the rest tie -> lowest experts
    assert got[0][2].tolist() == [5, 9, 0, 1, 2, 3]
    np.testing.assert_allclose(got[1][2], np.full(k, 2.5 / k), rtol=1e-6)
    assert np.isfinite(got[1]).all()


@pytest.mark.parametrize("N,E,k", [(4, 256, 6), (1, 16, 2)])
def test_emulated_hash_matches_ops(emu, N, E, k):
    rng = np.random.default_rng(N)
    logits = (rng.standard_normal((N, E)) * 2).astype(np.float32)
    hidx = np.stack([rng.permutation(E)[:k] for _ in range(N)]).astype(np.int32)
    got = _emu_route(emu, logits, None, hidx, k, 1.5, 64)
    assert (got[0] == hidx.astype(np.uint32)).all()  # the given experts, in the given order
    _check(got, _ops_route(logits, None, hidx, k, 1.5))


def test_emulated_hash_rows_of_the_table(emu):
    """ROWS: the kernel takes the whole tid2eid table and each token's id (no gather before
    it); the same as the gathered rows, and as `route(..., ids=)`'s ops path."""
    rng = np.random.default_rng(5)
    N, E, k, V = 5, 64, 6, 50
    logits = (rng.standard_normal((N, E)) * 2).astype(np.float32)
    table = np.stack([rng.permutation(E)[:k] for _ in range(V)]).astype(np.int32)
    ids = np.array([3, 49, 0, 3, 17], np.int32)
    got = _emu_route(emu, logits, None, table, k, 1.5, 64, ids=ids)
    assert (got[0] == table[ids].astype(np.uint32)).all()
    _check(got, _emu_route(emu, logits, None, table[ids], k, 1.5, 64))
    wi, ww = kr.route(mx.array(logits), None, mx.array(table), k, 1.5, ids=mx.array(ids))
    _check(got, (np.array(wi), np.array(ww)))
    wi, we = kr.route(mx.array(logits), None, mx.array(table), k, 1.5, True, mx.array(ids))
    assert we.shape == (N, k, 1, 1)
    np.testing.assert_array_equal(np.array(we)[..., 0, 0], np.array(ww))
    # uint32 ids (mlx-lm's sampled tokens) read the same rows
    got_u = emu.run(src.route_source("cpp"),
                    [logits, np.zeros(1, np.float32), table, np.array([1.5], np.float32),
                     ids.astype(np.uint32)], [(N, k), (N, k)], ["uint32", "float32"],
                    [("E", E), ("K", k), ("TG", 64), ("HASH", True), ("ROWS", True)],
                    (N * 64, 1, 1), 64)
    np.testing.assert_array_equal(got_u[0], got[0])


def test_emulated_can_fail(emu):
    """The comparison is not vacuous: without the bias the picks change."""
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((4, 64)).astype(np.float32)
    bias = (rng.standard_normal(64) * 2).astype(np.float32)
    got = _emu_route(emu, logits, np.zeros(64, np.float32), None, 6, 1.0, 64)
    with pytest.raises(AssertionError):
        _check(got, _ops_route(logits, bias, None, 6, 1.0))


# --------------------------------------------------------------------------------------------
# Metal and CUDA sources

def _launch(dialect, hashed, E=256, k=6, rows=False):
    inputs = [("float32", 2, 4 * E), ("float32", 1, 1 if hashed else E),
              ("int32", 2 if hashed else 1, (129280 if rows else 4) * k if hashed else 1),
              ("float32", 1, 1), ("int32", 1, 4 if rows else 1)]
    return (src.route_source(dialect), inputs, ["uint32", "float32"],
            [("E", E), ("K", k), ("TG", kr.TG), ("HASH", hashed), ("ROWS", rows)])


_VARIANTS = [(False, False), (True, False), (True, True)]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("hashed,rows", _VARIANTS)
def test_metal_source_compiles_as_cpp(hashed, rows, tmp_path):
    assert_metal_compiles(_launch("metal", hashed, rows=rows), tmp_path, f"router_{hashed}_{rows}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("hashed,rows", _VARIANTS)
def test_cuda_source_compiles_with_nvcc(hashed, rows, tmp_path):
    assert_nvcc_compiles(_launch("cuda", hashed, rows=rows), tmp_path, f"router_{hashed}_{rows}")


# --------------------------------------------------------------------------------------------
# dispatch

def test_cpu_uses_ops(clean_dispatch):
    rng = np.random.default_rng(0)
    logits = mx.array(rng.standard_normal((2, 3, 32)).astype(np.float32))
    bias = mx.array(rng.standard_normal(32).astype(np.float32))
    idx, w = kr.route(logits, bias, None, 4, 1.5)
    ri, rw = kr.route_ops(logits, bias, None, 4, 1.5)
    assert idx.dtype == mx.uint32
    np.testing.assert_array_equal(np.array(idx), np.array(ri))
    np.testing.assert_array_equal(np.array(w), np.array(rw))


def test_env_var_validated(clean_dispatch):
    clean_dispatch.setenv(kr.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=kr.ENV_VAR):
        kr.route(mx.zeros((1, 8)), mx.zeros((8,)), None, 2, 1.0)


# --------------------------------------------------------------------------------------------
# on a GPU

GPU = dispatch.available_backends()
needs_gpu = pytest.mark.skipif(not GPU, reason="no Metal or CUDA backend in this MLX")


@needs_gpu
@pytest.mark.parametrize("N,E,k,hashed", [(1, 256, 6, False), (1, 256, 6, True), (37, 256, 6, False),
                                          (5, 384, 6, False), (9, 64, 8, True), (3, 1024, 16, False)])
def test_gpu_kernel_matches_ops(clean_dispatch, N, E, k, hashed):
    rng = np.random.default_rng(N * E + k)
    logits = (rng.standard_normal((1, N, E)) * 3).astype(np.float32)
    bias = None if hashed else (rng.standard_normal(E) * 0.5).astype(np.float32)
    hidx = np.stack([rng.permutation(E)[:k] for _ in range(N)])[None].astype(np.int32) if hashed else None
    with mx.stream(mx.gpu):
        args = (mx.array(logits), None if bias is None else mx.array(bias),
                None if hidx is None else mx.array(hidx))
        gi, gw = kr.route_kernel(*args, k, 1.5, backend=GPU[0])
        wi, ww = kr.route_ops(*args, k, 1.5)
        got = (np.array(gi)[0], np.array(gw)[0])
        want = (np.array(wi)[0], np.array(ww)[0])
        if hashed:  # the table and the token ids instead of the gathered rows
            table = mx.array(np.concatenate([hidx[0], hidx[0][::-1]]))
            ids = mx.array(np.arange(N, dtype=np.int32)[None])
            ri, rw = kr.route_kernel(args[0], None, table, k, 1.5, backend=GPU[0], ids=ids,
                                     w_shape=(1, N, k, 1, 1))
            np.testing.assert_array_equal(np.array(ri), np.array(gi))
            np.testing.assert_array_equal(np.array(rw)[..., 0, 0], np.array(gw))
    _check(got, want)


@needs_gpu
def test_gpu_model_with_router_kernel_matches_ops(clean_dispatch):
    """A whole tiny model (fp32, prefill then decode) with the router kernel against the same
    model with DSV4_ROUTER_KERNEL=ops."""
    from conftest import gpu_logits_kernel_on_off

    got, want = gpu_logits_kernel_on_off(clean_dispatch, kr.ENV_VAR)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_body_stays_in_the_common_subset():
    assert_common_subset(src.route_source("metal"))
