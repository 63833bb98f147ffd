"""Lightning-indexer kernels (spec §4.7): ops path, shared kernel body, Metal/CUDA sources.

On any machine (CI):

* the pure-ops path against a numpy float64 reference of the scoring, and its FP4-keys
  path against dequantize-then-score (`convert.formats.dequant_fp4`);
* the kernel body itself, compiled as C++ with the CPU-emulation dialect (threadgroups as
  fibers, exact barrier semantics) and run against the same reference: every key layout,
  the visibility edge cases, ties, block-size remainders, several entries a thread and
  several head chunks;
* the Metal source as `mx.fast.metal_kernel` would build it, compiled as C++ against a
  stand-in <metal_stdlib> (tests/data/metal_stub) with ``g++ -fsyntax-only``;
* the CUDA source as `mx.fast.cuda_kernel` builds it, compiled with nvcc (skipped without
  nvcc and MLX's CUDA device headers);
* the dispatch: DSV4_INDEXER_KERNEL, device choice, warn-once fallback.

On a GPU (MLX with Metal or CUDA): the kernels against the ops path and the reference over
the same matrix, and the absence of a [heads x entries] buffer (peak memory).

Top-k selections are compared modulo ties: the multiset of reference scores of the picks
must equal the k largest visible reference scores (within a tolerance), the picks must be
distinct and visible, and the number of -1 must be k - min(visible, k).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from dsv4_mlx.convert.formats import dequant_fp4, fp4_to_mxfp4, quantize_fp4
from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import indexer as ki
from dsv4_mlx.kernels import indexer_source as src

# the ops path is compared with an fp64 reference: keep MLX's CUDA matmuls in full fp32
os.environ.setdefault("MLX_ENABLE_TF32", "0")

HERE = Path(__file__).parent
METAL_STUB = HERE / "data" / "metal_stub"
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")

# --------------------------------------------------------------------------------------------
# data and reference


def to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (round to nearest even), returned as fp32 values."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return (u.astype(np.uint32) << 16).view(np.float32)


def bf16_words(x: np.ndarray) -> np.ndarray:
    """fp32 values exactly representable in bf16 -> their uint32 view (pairs, low = even)."""
    hi = (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return hi.view(np.uint32)


def make_case(rng, B, T, H, D, N, kind="random"):
    """q [B,T,H,D], w [B,T,H], keys [B,N,D] fp32.

    kinds: "random"; "zeros" (most dot products negative, so relu kills them: most scores
    are exactly 0 and tie); "allzero" (w = 0: every score is 0); "negw" (negative head
    weights: negative scores).
    """
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    keys = rng.standard_normal((B, N, D)).astype(np.float32)
    w = (rng.standard_normal((B, T, H)) / np.sqrt(H * D)).astype(np.float32)
    if kind == "zeros":
        q = -np.abs(q)
        keys = np.abs(keys)
        flip = rng.random((B, N)) < 0.05  # a few entries get positive dots
        keys[flip] = -keys[flip]
        w = np.abs(w)
    elif kind == "allzero":
        w = np.zeros_like(w)
    elif kind == "negw":
        w = -np.abs(w)
    return q, w, keys


def fp4_keys(keys: np.ndarray):
    """fp32 keys [B,N,D] -> (mxfp4 pair as mx arrays, dequantized fp32 keys, packed np)."""
    B, N, D = keys.shape
    packed, scales = quantize_fp4(keys.reshape(B * N, D))
    wq, sc = fp4_to_mxfp4(packed, scales)
    deq = dequant_fp4(packed, scales).reshape(B, N, D)
    pair = (wq.reshape(B, N, D // 8), sc.reshape(B, N, D // 32))
    raw = (np.array(wq).reshape(B, N, D // 8), np.array(sc).reshape(B, N, D // 32))
    return pair, deq, raw


def ref_scores(q, w, keys) -> np.ndarray:
    """numpy float64 reference of spec §4.7 (no mask): [B, T, N]."""
    dots = q.astype(np.float64) @ keys.astype(np.float64)[:, None].swapaxes(-1, -2)
    return (np.maximum(dots, 0.0) * w.astype(np.float64)[..., None]).sum(axis=2)


def visibles(rng, T, N, k):
    """Per-query visible counts covering the edges 0, 1, k-1, k, k+1, N-1, N."""
    edges = [0, 1, k - 1, k, k + 1, N - 1, N]
    v = list(edges) + list(rng.integers(0, N + 1, size=max(0, T - len(edges))))
    return np.clip(np.array(v[:T], np.int32), 0, N)


def check_topk(idx, ref, visible, k, what="", exact=False):
    """Selection modulo ties (see module docstring); ``exact``: `ref` holds the very scores
    the select read, so the picks' values must be the k largest exactly."""
    idx = np.asarray(idx)
    B, T, N = ref.shape
    assert idx.shape == (B, T, k), (what, idx.shape, (B, T, k))
    for b in range(B):
        for t in range(T):
            vis = int(min(max(visible[t], 0), N))
            row = idx[b, t]
            picks = row[row >= 0]
            want = min(vis, k)
            assert (row == -1).sum() == k - want, (what, b, t, vis, row)
            assert len(picks) == want and len(set(picks.tolist())) == want, (what, b, t, row)
            assert (picks < vis).all(), (what, b, t, vis, row)
            if vis > k:
                r = ref[b, t, :vis]
                tol = 0.0 if exact else 1e-4 * (np.abs(r).max() + 1e-6)
                got = np.sort(r[picks])
                exp = np.sort(r)[-k:]
                np.testing.assert_allclose(got, exp, rtol=0, atol=tol,
                                           err_msg=f"{what} b={b} t={t}")


# --------------------------------------------------------------------------------------------
# the pure-ops path against numpy (CPU)

SHAPES = [(B, T, H, D) for B in (1, 2) for T in (1, 37) for H in (8, 64) for D in (128, 32)]


@pytest.mark.parametrize("B,T,H,D", SHAPES)
@pytest.mark.parametrize("key_dtype", ["f32", "bf16"])
def test_scores_ops_vs_numpy(B, T, H, D, key_dtype):
    rng = np.random.default_rng(B * 1000 + T * 10 + H + D)
    q, w, keys = make_case(rng, B, T, H, D, 300)
    if key_dtype == "bf16":
        keys = to_bf16(keys)
        km = mx.array(keys).astype(mx.bfloat16)
    else:
        km = mx.array(keys)
    got = np.array(ki.indexer_scores_ops(mx.array(q), mx.array(w), km))
    ref = ref_scores(q, w, keys)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("B,T,H,D", SHAPES[::3])
def test_scores_ops_fp4_vs_dequantize(B, T, H, D):
    rng = np.random.default_rng(7 + B + T + H + D)
    q, w, keys = make_case(rng, B, T, H, D, 257)
    pair, deq, _ = fp4_keys(keys)
    # the mxfp4 pair dequantizes to exactly the checkpoint-format decoding
    np.testing.assert_array_equal(np.array(ki.dequantize_keys(pair)), deq)
    got = np.array(ki.indexer_scores_ops(mx.array(q), mx.array(w), pair))
    ref = ref_scores(q, w, deq)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # the same through dense keys
    dense = np.array(ki.indexer_scores_ops(mx.array(q), mx.array(w), mx.array(deq)))
    np.testing.assert_allclose(got, dense, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("B,T,H,D", SHAPES)
@pytest.mark.parametrize("kind", ["random", "zeros", "negw"])
def test_topk_ops_vs_numpy(B, T, H, D, kind):
    rng = np.random.default_rng(B + T + H + D + len(kind))
    N, topk = 300, 64
    q, w, keys = make_case(rng, B, T, H, D, N, kind)
    vis = visibles(rng, T, N, topk) if T > 1 else np.array([N - 1], np.int32)
    idx = ki.indexer_topk_ops(mx.array(q), mx.array(w), mx.array(keys), mx.array(vis), topk)
    check_topk(idx, ref_scores(q, w, keys), vis, topk, f"ops {kind}")


@pytest.mark.parametrize("vis0", [0, 1, 299, 300])
def test_topk_ops_visibility_t1(vis0):
    rng = np.random.default_rng(vis0)
    q, w, keys = make_case(rng, 2, 1, 8, 32, 300)
    vis = np.array([vis0], np.int32)
    idx = ki.indexer_topk_ops(mx.array(q), mx.array(w), mx.array(keys), mx.array(vis), 64)
    check_topk(idx, ref_scores(q, w, keys), vis, 64, "ops t1")


def test_topk_ops_all_visible():
    """visible None (every query sees all N entries) picks what the count N picks."""
    rng = np.random.default_rng(3)
    for N, k in ((300, 64), (97, 96)):
        q, w, keys = make_case(rng, 2, 1, 8, 32, N)
        a = [mx.array(x) for x in (q, w, keys)]
        got = np.array(ki.indexer_topk_ops(*a, None, k))
        want = np.array(ki.indexer_topk_ops(*a, mx.array([N], mx.int32), k))
        assert [set(r) for r in got[:, 0]] == [set(r) for r in want[:, 0]]


def test_topk_ops_fewer_entries_than_k():
    rng = np.random.default_rng(3)
    q, w, keys = make_case(rng, 2, 5, 8, 32, 10)
    vis = np.array([0, 1, 5, 9, 10], np.int32)
    idx = np.array(ki.indexer_topk_ops(mx.array(q), mx.array(w), mx.array(keys), mx.array(vis), 64))
    assert idx.shape == (2, 5, 10)
    want = np.where(np.arange(10)[None, :] < vis[:, None], np.arange(10)[None, :], -1)
    np.testing.assert_array_equal(idx, np.broadcast_to(want, (2, 5, 10)))


def test_topk_ops_fp4_keys():
    rng = np.random.default_rng(11)
    q, w, keys = make_case(rng, 2, 37, 8, 128, 300)
    pair, deq, _ = fp4_keys(keys)
    vis = visibles(rng, 37, 300, 64)
    idx = ki.indexer_topk_ops(mx.array(q), mx.array(w), pair, mx.array(vis), 64)
    check_topk(idx, ref_scores(q, w, deq), vis, 64, "ops fp4")


# --------------------------------------------------------------------------------------------
# the kernel body on the CPU (C++ emulation dialect)

_EMU_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.int32): "int32",
               np.dtype(np.uint32): "uint32", np.dtype(np.uint8): "uint8",
               np.dtype(np.uint16): "bfloat16"}  # bf16 as its bits


class Emulator:
    """Compiles a kernel body with the `cpp` dialect into a shared library and runs it."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.libs: dict[str, ctypes.CDLL] = {}

    def _lib(self, ks, inputs, out_dtypes, template):
        fn = "ki_kernel"
        code = src.render_cpp_kernel(ks, inputs, out_dtypes, template, fn)
        args = []
        for i, (n, (dt, ndim, _)) in enumerate(zip(ks.input_names, inputs)):
            args.append(f"(const {src.CPP_TYPES[dt]}*)in[{i}]")
            if ndim > 0 and n + "_shape" in ks.source:
                args.append(f"shp[{i}]")
        for j, dt in enumerate(out_dtypes):
            args.append(f"({src.CPP_TYPES[dt]}*)out[{j}]")
        full = (ks.header + code +
                'extern "C" void ki_launch(void** in, int** shp, void** out, int gx, int gy, '
                "int gz, int tg) {\n  ki_emu::run(gx, gy, gz, tg, [&]() { " + fn + "("
                + ", ".join(args) + "); });\n}\n")
        h = hashlib.sha1(full.encode()).hexdigest()[:16]
        if h not in self.libs:
            cpp, so = self.dir / f"k_{h}.cpp", self.dir / f"k_{h}.so"
            cpp.write_text(full)
            r = subprocess.run([CXX, "-std=c++17", "-O2", "-shared", "-fPIC", "-o", str(so),
                                str(cpp)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-4000:]
            self.libs[h] = ctypes.CDLL(str(so))
        return self.libs[h]

    def run(self, ks, arrays, out_shapes, out_dtypes, template, grid, tg):
        arrays = [np.ascontiguousarray(a) for a in arrays]
        inputs = [(_EMU_DTYPES[a.dtype], a.ndim, a.size) for a in arrays]
        lib = self._lib(ks, inputs, out_dtypes, template)
        outs = [np.zeros(s, {"float32": np.float32, "int32": np.int32, "uint32": np.uint32,
                              "uint8": np.uint8, "bfloat16": np.uint16}[d])
                for s, d in zip(out_shapes, out_dtypes)]
        shapes = [np.array(a.shape, np.int32) for a in arrays]
        in_p = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        shp_p = (ctypes.POINTER(ctypes.c_int) * len(arrays))(
            *[s.ctypes.data_as(ctypes.POINTER(ctypes.c_int)) for s in shapes])
        out_p = (ctypes.c_void_p * len(outs))(*[o.ctypes.data for o in outs])
        gx, gy, gz = grid
        lib.ki_launch(in_p, shp_p, out_p, gx // tg, gy, gz, tg)
        return outs

    def score(self, q, w, key_arrays, key_mode, visible, bn=None, hc=None, e=None,
              allvis=False):
        B, T, H, D = q.shape
        N = key_arrays[0].shape[1]
        BN, HC, E = ki.score_launch(B, T, N, H, D)
        BN, HC, E = bn or BN, hc or HC, e or E
        ks = src.score_source("cpp", key_mode, allvis=allvis)
        nblk = -(-N // (BN * E))
        (s,) = self.run(ks, [q, w, *key_arrays, visible], [(B, T, N)], ["float32"],
                        [("QT", "float32"), ("D", D), ("H", H), ("HC", HC), ("BN", BN), ("E", E)],
                        (nblk * BN, T, B), BN)
        return s

    def score_mma(self, q, w, key_arrays, key_mode, visible, kc=None, tpt=None, idec=None,
                  allvis=False):
        """The matrix-unit scoring kernel (`indexer_source.score_mma_source`; ``idec`` None:
        `indexer.MMA_INT_DECODE`)."""
        B, T, H, D = q.shape
        N = key_arrays[0].shape[1]
        KC, SMEM4, QRES = src.mma_layout("cpp", H, D, ki.MMA_WARPS)
        if kc is not None:  # a smaller chunk of dims (more chunks, same tile area)
            KC, QRES = kc, kc == D and QRES
        TPT = tpt or ki.mma_tiles(B * T, N, QRES)
        ks = src.score_mma_source("cpp", key_mode, allvis=allvis)
        tpg = 32 * ki.MMA_WARPS
        ngroups = -(-N // (16 * ki.MMA_WARPS * TPT))
        qw = bf16_words(q)  # bf16 queries as uint32 pairs (q must be bf16-exact)
        (s,) = self.run(ks, [qw, w, *key_arrays, visible], [(B, T, N)], ["float32"],
                        [("D", D), ("H", H), ("NW", ki.MMA_WARPS), ("KC", KC),
                         ("SMEM4", SMEM4), ("QRES", QRES), ("TPT", TPT),
                         ("IDEC", ki.MMA_INT_DECODE if idec is None else int(idec)),
                         ("MMAPTX", 0)],  # (the cpp dialect ignores it)
                        (ngroups * tpg, T, B), tpg)
        return s

    def score_frag(self, q, w, key_arrays, key_mode, visible, nw=None, tpw=None, me=None,
                   idec=None, allvis=False):
        """The register-fragment scoring kernel (`indexer_source.score_frag_source`; launch
        parameters None: `indexer.frag_launch`'s; ``idec`` None: `indexer.MMA_INT_DECODE`)."""
        B, T, H, D = q.shape
        N = key_arrays[0].shape[1]
        NW, TPW, ME = ki.frag_launch(B * T, N)
        NW, TPW, ME = nw or NW, tpw or TPW, me or ME
        ks = src.score_frag_source("cpp", key_mode, allvis=allvis)
        ngroups = -(-N // (16 * ME * TPW * NW))
        (s,) = self.run(ks, [bf16_words(q), w, *key_arrays, visible], [(B, T, N)], ["float32"],
                        [("D", D), ("H", H), ("NW", NW), ("TPW", TPW), ("ME", ME),
                         ("IDEC", ki.MMA_INT_DECODE if idec is None else int(idec))],
                        (ngroups * 32 * NW, T, B), 32 * NW)
        return s

    def _select(self, scores, visible, cidx, k, tg, u, s, mapped, r, walk, allvis=False):
        B, T, M = scores.shape
        ks = src.topk_source("cpp", allvis)
        r = ki.topk_regs(M, tg, s) if r is None else r
        idx, val = self.run(ks, [scores, visible, cidx], [(B, T, s, k)] * 2, ["int32", "float32"],
                            [("K", k), ("TG", tg), ("U", u), ("S", s), ("MAPPED", mapped),
                             ("R", r), ("WALK", walk)],
                            (s * tg, T, B), tg)
        return idx.reshape(B, T, s * k), val.reshape(B, T, s * k)

    def fused(self, scores, visible, k, tg, u, s, r=None, walk=None, tick=None, allvis=False):
        """The fused top-k (`indexer_source.topk_fused_source`): (fin, thr, tick after)."""
        B, T, M = scores.shape
        ks = src.topk_fused_source("cpp", allvis)
        # the launch as the dispatch makes it (registers of the slices and of the merge)
        template, grid, _, shapes, dtypes = ki._fused_spec(B, T, M, k, tg, u, s, r, walk)
        tick = np.zeros(B * T, np.uint32) if tick is None else tick
        idx, val, thr, fin = self.run(ks, [scores, visible, tick], shapes,
                                      [str(d).split(".")[-1] for d in dtypes], template, grid, tg)
        return fin, thr, tick

    def score_select(self, q, w, key_arrays, key_mode, visible, k, tpt=None, u=4, cap=2048,
                     walk=None, allvis=False, scratch=None):
        """The one-launch scoring and top-k (`indexer_source.score_select_source`) with the
        dispatch's launch spec: (idx, scores, the rows' histograms and tickets) (``scratch``:
        a zeroed uint32 [rows, SCRATCH_WORDS] numpy array the kernel updates in place)."""
        B, T, H, D = q.shape
        N = key_arrays[0].shape[1]
        KC, SMEM4, QRES = src.mma_layout("cpp", H, D, ki.MMA_WARPS)
        TPT = tpt or ki.mma_tiles(B * T, N, QRES)
        score_t = [("D", D), ("H", H), ("NW", ki.MMA_WARPS), ("KC", KC), ("SMEM4", SMEM4),
                   ("QRES", QRES), ("TPT", TPT), ("IDEC", ki.MMA_INT_DECODE), ("MMAPTX", 0)]
        scr = scratch is not None
        template, shapes, dtypes = ki._select_spec(B, T, N, k, score_t, u, cap, walk, scr)
        tpg = 32 * ki.MMA_WARPS
        ngroups = -(-N // (16 * ki.MMA_WARPS * TPT))
        idx, work = self.run(src.score_select_source("cpp", key_mode, allvis, scr),
                             [bf16_words(q), w, *key_arrays, visible]
                             + ([scratch] if scr else []), shapes,
                             [str(d).split(".")[-1] for d in dtypes], template,
                             (ngroups * tpg, T, B), tpg)
        hist = scratch if scr else work[:, -(-N // 4) * 4:].view(np.uint32)
        return idx, work[:, :N].reshape(B, T, N), hist

    def row(self, scores, visible, k, tg=256, u=4, cap=2048, ha=1, walk=None, allvis=False):
        """The one-group top-k (`indexer_source.topk_row_source`) with the dispatch's launch
        spec: (idx, val)."""
        B, T, M = scores.shape
        ks = src.topk_row_source("cpp", allvis)
        template, grid, _, shapes, dtypes = ki._row_spec(B, T, k, tg, u, cap, ha, walk)
        return self.run(ks, [scores, visible], shapes, [str(d).split(".")[-1] for d in dtypes],
                        template, grid, tg)

    def topk(self, scores, visible, k, tg=256, u=4, s=1, r=None, walk=None, fuse=False,
             allvis=False):
        """As `indexer.indexer_select_kernel` chains the launches (``r`` None: registers
        where `topk_regs` says; 0: none; ``walk`` None: `indexer.TOPK_WALK`; ``fuse``: one
        launch for S > 1)."""
        walk = ki.TOPK_WALK if walk is None else int(walk)
        if fuse and s > 1:
            return self.fused(scores, visible, k, tg, u, s, r, walk, allvis=allvis)[0]
        idx, val = self._select(scores, visible, np.zeros(1, np.int32), k, tg, u, s, False, r,
                                walk, allvis)
        if s > 1:
            idx, _ = self._select(val, visible, idx, k, tg, u, 1, True, 0 if r == 0 else None,
                                  walk)
        return idx


needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/c++/clang++) on PATH")


def _key_arrays(mode, keys):
    """(kernel inputs as numpy, keys as the kernel sees them in fp32)."""
    if mode == "f32":
        return [keys], keys
    if mode == "bf16":
        kb = to_bf16(keys)
        return [bf16_words(kb)], kb
    _, deq, raw = fp4_keys(keys)
    return list(raw), deq


def _masked(ref, vis):
    N = ref.shape[-1]
    return np.where(np.arange(N)[None, None, :] < vis[None, :, None], ref, -np.inf)


EMU_SHAPES = [(B, T, H, D) for B in (1, 2) for T in (1, 37) for H in (8, 64) for D in (128, 32)]


@needs_cxx
@pytest.mark.parametrize("B,T,H,D", EMU_SHAPES)
@pytest.mark.parametrize("mode", src.KEY_MODES)
def test_emulated_scores(emu, B, T, H, D, mode):
    rng = np.random.default_rng(B * 7 + T + H + D + len(mode))
    N = 300  # not a multiple of the block size (128)
    q, w, keys = make_case(rng, B, T, H, D, N, "zeros" if (B + T) % 2 else "random")
    key_in, kf = _key_arrays(mode, keys)
    vis = visibles(rng, T, N, 64) if T > 1 else np.array([N - 1], np.int32)
    got = emu.score(q, w, key_in, mode, vis)
    ref = _masked(ref_scores(q, w, kf), vis)
    assert np.array_equal(np.isneginf(got), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-4, atol=1e-5 * np.abs(ref[fin]).max())


@needs_cxx
@pytest.mark.parametrize("bn,hc,e", [(32, 3, 1), (64, 8, 2), (32, 5, 4), (128, 64, 8)])
@pytest.mark.parametrize("mode", src.KEY_MODES)
def test_emulated_scores_launch_variants(emu, bn, hc, e, mode):
    """Several entries a thread (E), head chunks that do not divide H (HC), small groups."""
    rng = np.random.default_rng(bn + hc + e)
    B, T, H, D, N = 2, 5, 8, 32, 333
    q, w, keys = make_case(rng, B, T, H, D, N)
    key_in, kf = _key_arrays(mode, keys)
    vis = np.array([0, 1, 100, N - 1, N], np.int32)
    got = emu.score(q, w, key_in, mode, vis, bn=bn, hc=min(hc, H), e=e)
    ref = _masked(ref_scores(q, w, kf), vis)
    assert np.array_equal(np.isneginf(got), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-4, atol=1e-5 * np.abs(ref[fin]).max())


def _check_mma_decodes(emu, q, w, key_in, mode, vis, ref, run=None, **kw):
    """The emulated matrix-unit scores (`run`: the scoring method, default `score_mma`)
    against `ref` (masked), with each FP4 decode (fp32 products, IDEC 0; integers, IDEC 1;
    byte-permute tables, IDEC 2) for FP4 keys: each within the tolerance, and the same bits
    (the same tiles or registers)."""
    fin = np.isfinite(ref)
    outs = []
    for idec in ((0, 1, 2) if mode == "fp4" else (0,)):
        got = (run or emu.score_mma)(q, w, key_in, mode, vis, idec=idec, **kw)
        assert np.array_equal(np.isneginf(got), np.isneginf(ref))
        np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-4,
                                   atol=1e-5 * np.abs(ref[fin]).max())
        outs.append(got)
    for o in outs[1:]:
        np.testing.assert_array_equal(outs[0], o)


@needs_cxx
@pytest.mark.parametrize("B,T,H,D,kc,tpt", [(1, 1, 64, 128, None, None), (2, 5, 16, 32, None, 2),
                                            (1, 3, 32, 128, 32, None), (2, 1, 48, 64, None, 4),
                                            (1, 6, 16, 64, None, 16), (2, 3, 32, 64, 32, 3)])
@pytest.mark.parametrize("mode", src.MMA_KEY_MODES)
def test_emulated_scores_mma(emu, B, T, H, D, kc, tpt, mode):
    """The matrix-unit kernel (16x16 tiles, chunks of KC dims, 64 entries a tile, TPT tiles a
    group with the queries read once or a chunk at a time): bf16 queries, N not a multiple
    of 64, every visibility edge (tiles wholly past it, in the middle of a group's tiles)."""
    rng = np.random.default_rng(B + T + H + D + len(mode))
    N = 200
    q, w, keys = make_case(rng, B, T, H, D, N, "zeros" if T == 5 else "random")
    q = to_bf16(q)  # the kernel takes bf16 queries (exact products)
    key_in, kf = _key_arrays(mode, keys)
    vis = np.array([N - 1, 0, 1, 63, 64, N][:T] if T > 1 else [N - 1], np.int32)
    ref = _masked(ref_scores(q, w, kf), vis)
    _check_mma_decodes(emu, q, w, key_in, mode, vis, ref, kc=kc, tpt=tpt)


@needs_cxx
@pytest.mark.parametrize("B,T,H,D,N,nw,tpw,me", [(1, 1, 64, 128, 200, None, None, None),
                                                 (2, 3, 16, 128, 150, 2, 2, 2),
                                                 (1, 5, 8, 256, 77, 1, 3, 1),
                                                 (2, 6, 64, 128, 260, 4, 1, 2),
                                                 (1, 2, 24, 128, 16, 1, 1, 1)])
@pytest.mark.parametrize("mode", src.FRAG_KEY_MODES)
def test_emulated_scores_frag(emu, B, T, H, D, N, nw, tpw, me, mode):
    """The register-fragment kernel (keys decoded into mma.sync's A registers by the PTX
    fragment layouts, emulated lane by lane): N not a multiple of 16, passes of one and two
    tiles, warps whose passes end past N, every visibility edge (passes wholly past it, in the
    middle of a pass), two D / 128 groups a thread; each FP4 decode the same bits."""
    rng = np.random.default_rng(B + T + H + D + N + len(mode))
    q, w, keys = make_case(rng, B, T, H, D, N, "zeros" if T == 5 else "random")
    q = to_bf16(q)
    key_in, kf = _key_arrays(mode, keys)
    vis = np.array([N - 1, 0, 1, 15, 16, N][:T] if T > 1 else [N - 1], np.int32)
    ref = _masked(ref_scores(q, w, kf), vis)
    _check_mma_decodes(emu, q, w, key_in, mode, vis, ref, run=emu.score_frag, nw=nw, tpw=tpw,
                       me=me)


@needs_cxx
@pytest.mark.parametrize("sbs", [(0, 1, 2, 3), (250, 251, 252, 254), (127, 2, 200, 253),
                                 (127, 255, 3, 251)])
def test_emulated_scores_frag_scale_ends(emu, sbs):
    """Scale bytes at the ends of the range (subnormal / huge products: the fp32 path) next to
    ordinary ones, one thread's two rows and groups differing: the same scores from every
    decode and the same as the tiled kernel's."""
    rng = np.random.default_rng(sum(sbs))
    B, T, H, D, N = 1, 1, 16, 128, 40
    words = rng.integers(0, 2**32, size=(B, N, D // 8), dtype=np.uint64).astype(np.uint32)
    sc = np.array(sbs, np.uint8)[rng.integers(0, 4, size=(B, N, D // 32))]
    q = to_bf16(rng.standard_normal((B, T, H, D)).astype(np.float32) * 1e-3)
    w = rng.standard_normal((B, T, H)).astype(np.float32)
    vis = np.array([N], np.int32)
    tiled = emu.score_mma(q, w, [words, sc], "fp4", vis, idec=0)
    for idec in (0, 1, 2):
        got = emu.score_frag(q, w, [words, sc], "fp4", vis, idec=idec)
        fin = np.isfinite(tiled)
        assert np.array_equal(np.isfinite(got), fin)
        np.testing.assert_allclose(got[fin], tiled[fin], rtol=1e-5,
                                   atol=1e-6 * np.abs(tiled[fin]).max())


@needs_cxx
@pytest.mark.parametrize("mode", ["fp4", "bf16"])
def test_emulated_all_visible_reads_no_count(emu, mode):
    """The all-visible sources (`allvis`: a decode row) score and select every entry whatever
    the `visible` input holds (here 0 and garbage): the same scores and picks as with the
    count N, for every scorer and the top-k alone, merged and fused."""
    rng = np.random.default_rng(7 + len(mode))
    B, T, H, D, N, k = 1, 1, 16, 128, 700, 64
    q, w, keys = make_case(rng, B, T, H, D, N)
    q = to_bf16(q)
    key_in, kf = _key_arrays(mode, keys)
    full = np.array([N], np.int32)
    for junk in (np.array([0], np.int32), np.array([-5], np.int32)):
        for run in (emu.score, emu.score_mma, emu.score_frag):
            np.testing.assert_array_equal(run(q, w, key_in, mode, junk, allvis=True),
                                          run(q, w, key_in, mode, full), err_msg=run.__name__)
        sc = emu.score(q, w, key_in, mode, full)
        want = set(np.argsort(-sc[0, 0], kind="stable")[:k].tolist())
        for s_, fuse in ((1, False), (4, False), (4, True)):
            got = emu.topk(sc, junk, k, tg=256, s=s_, fuse=fuse, allvis=True)
            assert set(got[0, 0].tolist()) == want, (s_, fuse)


@needs_cxx
@pytest.mark.parametrize("lanes", [32, 16])
def test_emulator_aborts_on_a_divergent_warp_barrier(lanes, tmp_path):
    """A shuffle (or an emulated mma) that only some lanes of a warp reach is a bug the GPU
    would not report (it reads stale registers): the emulation aborts instead of going on."""
    body = ("  if (ki_tid < LANES) out[ki_tid] = KI_SHFL(x[0] + (float)ki_tid, ki_tid ^ 1);\n")
    ks = src.make_source("cpp", "diverge", ("x",), ("out",), body)
    code = (ks.header + src.render_cpp_kernel(ks, [("float32", 1, 1)], ["float32"],
                                              [("LANES", lanes)], "k")
            + "int main() {\n  static float x[1] = {0.5f}, out[64];\n"
            "  ki_emu::run(1, 1, 1, 64, [&]() { k(x, out); });\n"
            "  std::printf(\"%g %g\\n\", out[0], out[1]);\n  return 0;\n}\n")
    (tmp_path / "d.cpp").write_text(code)
    r = subprocess.run([CXX, "-std=c++17", "-O1", "-o", str(tmp_path / "d"),
                        str(tmp_path / "d.cpp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(tmp_path / "d")], capture_output=True, text=True)
    if lanes == 32:  # the whole warp: lane 0 gets lane 1's value and back
        assert r.returncode == 0 and r.stdout.split() == ["1.5", "0.5"], (r.stdout, r.stderr)
    else:
        assert r.returncode != 0 and "divergent warp barrier" in r.stderr, (r.returncode,
                                                                            r.stderr)


def test_frag_launch_and_usable():
    assert ki.frag_launch(1, 65536) == (4, 2, 1)      # 4096 tiles -> 512 groups
    assert ki.frag_launch(1, 262144) == (4, 8, 1)
    assert ki.frag_launch(1, 1000) == (4, 1, 1)
    assert ki.frag_launch(2048, 16384) == (4, 16, 1)
    assert ki.frag_usable("cuda", mx.bfloat16, 64, 128, "fp4")
    assert ki.frag_usable("cuda", mx.bfloat16, 8, 256, "bf16")
    assert ki.frag_usable("cuda", mx.bfloat16, 128, 128, "fp4")
    assert not ki.frag_usable("cuda", mx.bfloat16, 128, 256, "fp4")  # > 48 KiB of queries
    assert not ki.frag_usable("metal", mx.bfloat16, 64, 128, "fp4")
    assert not ki.frag_usable("cuda", mx.float32, 64, 128, "fp4")
    assert not ki.frag_usable("cuda", mx.bfloat16, 64, 64, "fp4")   # D not a multiple of 128
    assert not ki.frag_usable("cuda", mx.bfloat16, 12, 128, "fp4")  # H not a multiple of 8
    assert not ki.frag_usable("cuda", mx.bfloat16, 64, 128, "f32")
    with pytest.raises(ValueError):
        src.score_frag_source("metal", "fp4")


@needs_cxx
def test_e2m1_bf16_bits_equal_the_rounded_product(emu):
    """The scorer's integer FP4 decode (`ki_e2m1_bf16`, IDEC 1): for every code and every
    scale byte in 3..251 the bf16 bits of the fp32 product ``e2m1(c) * 2^(sb - 127)`` (which
    is exact). The kernel takes the fp32 path outside that range: the integer bits differ at
    scale bytes 0, 1 and 253-255 (they happen to be right at 2 and 252)."""
    body = """
  const unsigned int i = (unsigned int)(ki_gx * 256 + ki_tid);
  const unsigned int c = i & 15u;
  const unsigned int sb = i >> 4;
  bits[i] = ki_e2m1_bf16(c, sb);
  prod[i] = KI_AS_UINT(ki_e2m1(c) * ki_e8m0(sb));
"""
    ks = src.make_source("cpp", "e2m1_bits_test", ("x",), ("bits", "prod"), body)
    bits, prod = emu.run(ks, [np.zeros(1, np.uint32)], [(4096,), (4096,)],
                         ["uint32", "uint32"], [], (4096, 1, 1), 256)
    sb = np.arange(4096) >> 4
    fast = (sb >= 3) & (sb <= 251)
    assert not np.any(prod[fast] & 0xFFFF)  # exact in bf16: rounding is truncation
    np.testing.assert_array_equal(bits[fast], prod[fast] >> 16)
    wrong = np.unique(sb[bits != prod >> 16])
    np.testing.assert_array_equal(wrong, [0, 1, 253, 254, 255])  # why it keeps the fp32 path


@needs_cxx
def test_e2m1_table_decode_equals_the_integer_bits(emu):
    """The scorer's byte-permute FP4 decode (`ki_e2m1x2_lut`, IDEC 2): for every byte (a pair
    of codes), every byte position in a word and every scale byte in 3..251, the bits of
    `ki_e2m1x2_bf16` (IDEC 1, itself checked against the fp32 product above). The byte's
    neighbours in the word are random, so a permute that reads the wrong byte shows."""
    body = """
  const unsigned int i = (unsigned int)(ki_gx * 256 + ki_tid);  // (scale byte, byte)
  const unsigned int sb = 3u + i / 256u;
  const unsigned int byte = i % 256u;
  const unsigned int lb0 = ki_e2m1_table(sb, 0u), hb0 = ki_e2m1_table(sb, 1u);
  const unsigned int lb1 = ki_e2m1_table(sb, 2u), hb1 = ki_e2m1_table(sb, 3u);
  for (unsigned int p = 0u; p < 4u; ++p) {
    const unsigned int u = (noise[i] & ~(255u << (8u * p))) | (byte << (8u * p));
    lut[4u * i + p] = ki_e2m1x2_lut(u, p, lb0, hb0, lb1, hb1);
    ref[4u * i + p] = ki_e2m1x2_bf16(u >> (8u * p), sb);
  }
"""
    n = 249 * 256
    noise = np.random.default_rng(7).integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    ks = src.make_source("cpp", "e2m1_lut_test", ("noise",), ("lut", "ref"), body)
    lut, ref = emu.run(ks, [noise], [(4 * n,), (4 * n,)], ["uint32", "uint32"], [],
                       (n, 1, 1), 256)
    assert np.count_nonzero(ref) > n  # (the kernel ran)
    np.testing.assert_array_equal(lut, ref)


@needs_cxx
@pytest.mark.parametrize("sbs,qf", [((1, 2, 3, 4), 2.0 ** 100), ((250, 251, 252), 2.0 ** -110)])
def test_emulated_scores_mma_scale_ends(emu, sbs, qf):
    """FP4 keys whose UE8M0 scales sit at the ends of the range (subnormal and near-overflow
    products: the scorer's fp32 decode path beside its integer one), queries scaled to keep
    the dot products normal."""
    rng = np.random.default_rng(len(sbs))
    B, T, H, D, N = 1, 2, 16, 64, 100
    words = rng.integers(0, 2 ** 32, size=(B, N, D // 8), dtype=np.uint64).astype(np.uint32)
    sc = rng.choice(np.array(sbs, np.uint8), size=(B, N, D // 32))
    codes = (words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
    mag = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])[codes & 7] * np.where(codes & 8, -1.0, 1.0)
    kf = mag.reshape(B, N, D) * np.repeat(2.0 ** (sc.astype(np.float64) - 127), 32, axis=-1)
    q = to_bf16((rng.standard_normal((B, T, H, D)) * qf).astype(np.float32))
    w = (rng.standard_normal((B, T, H)) / np.sqrt(H * D)).astype(np.float32)
    vis = np.array([N, N - 3], np.int32)
    ref = _masked(ref_scores(q, w, kf), vis)
    assert np.abs(ref[np.isfinite(ref)]).max() > 0
    _check_mma_decodes(emu, q, w, [words, sc], "fp4", vis, ref)


def test_mma_layout_fits():
    """Flash/Pro indexer shapes (H = 64, d = 128) fit Metal's 32 KiB (fp32 tiles, 32 dims a
    chunk, queries re-read) and CUDA's 48 KiB (bf16 tiles, all 128 dims of the queries
    resident, the fp32 block over the key tile)."""
    assert src.mma_layout("metal", 64, 128) == (32, (128 * 40 * 4) // 16, False)
    assert src.mma_layout("cuda", 64, 128) == (128, (128 * 136 * 2) // 16, True)
    for dialect in ("metal", "cuda"):
        kc, smem4, qres = src.mma_layout(dialect, 64, 128)
        assert 16 * smem4 + 4 * 128 <= src.MMA_SHARED_BYTES[dialect]
        eb = src.MMA_ELEM_BYTES[dialect]
        block = 64 * 68 * 4  # the fp32 [H x 64] block
        if qres:  # beside the resident queries, over the key tile
            assert 16 * smem4 >= 64 * 136 * eb + max(64 * 136 * eb, block)
        else:
            assert 16 * smem4 >= max(block, 128 * (kc + 8) * eb)


def test_variants_env(monkeypatch):
    """`DSV4_INDEXER_VARIANTS` turns the opt-in variants on by name (explicit arguments win),
    is read at each call, and a name it does not know is a clear error."""
    monkeypatch.delenv(ki.VARIANTS_ENV, raising=False)
    spec = lambda walk=None: dict(ki._topk_spec(1, 1, 65536, 512, 512, 4, 16, False,  # noqa: E731
                                                walk=walk)[0])
    assert spec()["WALK"] == ki.TOPK_WALK == 0
    assert ki._idec(None, "cuda") == ki.MMA_INT_DECODE == 2
    assert ki._idec(None, "metal") == ki.MMA_INT_DECODE_METAL == 0
    monkeypatch.setenv(ki.VARIANTS_ENV, " Walk, idec ")
    assert ki.variants() == {"walk", "idec"}
    assert spec()["WALK"] == 1 and spec(walk=0)["WALK"] == 0
    assert ki._flag("idec", None, 0) == 1 and ki._flag("mmaptx", None, 0) == 0
    assert ki._idec(None) == 1 and ki._idec(0) == 0
    monkeypatch.setenv(ki.VARIANTS_ENV, "idec,prmt")
    assert ki._idec(None) == 2 and ki._idec(1) == 1
    monkeypatch.setenv(ki.VARIANTS_ENV, "f32dec,wmma")
    assert ki._idec(None, "cuda") == 0 and ki._flag("mmaptx", None, 1) == 0
    assert ki._flag("mmaptx", 1, 0) == 1
    monkeypatch.setenv(ki.VARIANTS_ENV, "")
    assert ki._flag("mmaptx", None, ki.MMA_PTX) == ki.MMA_PTX == 1
    with pytest.raises(ValueError, match="idec must be"):
        ki._idec(3)
    assert ki._flag("frag", None, ki.FRAG_SCORER) == ki.FRAG_SCORER == 0
    monkeypatch.setenv(ki.VARIANTS_ENV, "frag")
    assert ki._flag("frag", None, 0) == 1 and ki._flag("frag", 0, 0) == 0
    monkeypatch.setenv(ki.VARIANTS_ENV, "tiles,frag")  # (the earlier name in the table wins)
    assert ki._flag("frag", None, 1) == 0
    monkeypatch.setenv(ki.VARIANTS_ENV, "walk,fast")
    with pytest.raises(ValueError, match="unknown fast"):
        ki.variants()


def test_mma_tiles():
    """Tiles a group: only with resident queries, powers of two <= 16, >= 512 groups left."""
    assert ki.mma_tiles(1, 65536, False) == 1
    assert ki.mma_tiles(1, 65536, True) == 2     # 1024 tiles -> 512 groups
    assert ki.mma_tiles(1, 262144, True) == 8    # 4096 tiles -> 512 groups
    assert ki.mma_tiles(1, 1000, True) == 1
    assert ki.mma_tiles(2048, 16384, True) == 16


def test_topk_regs():
    assert ki.topk_regs(65536, 512, 16) == 8     # 4096 a slice, 8 a thread
    assert ki.topk_regs(8192, 1024, 1) == 8      # the merge of 16 x 512
    assert ki.topk_regs(40000, 512, 8) == 16     # 5000 a slice: 10 -> 16
    assert ki.topk_regs(4097, 256, 1) == 0       # 17 a thread: past the registers
    assert ki.topk_regs(100, 256, 1) == 1


@pytest.mark.parametrize("N,fuse,row,one", [(140000, 0, 0, 0), (140000, 1, 0, 0),
                                            (65536, 0, 1, 0), (65536, 0, 0, 0), (4096, 0, 1, 0),
                                            (65536, 0, 1, 1), (65536, 0, 0, 1),
                                            (140000, 0, 0, 1)])
def test_probe_builds_the_calls_kernels(clean_dispatch, N, fuse, row, one):
    """The availability probe compiles every launch with the template constants the call
    itself will use (sizes differ; at 140,000 entries the slices hold no registers while the
    merge does; the one launch of scoring and top-k has the call's tiles a group)."""
    log = []

    def recorder(backend, ks):
        def kern(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **kw):
            log.append((ks.name, list(template), tuple(threadgroup)))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return kern

    clean_dispatch.setattr(ki, "_kernel", recorder)
    clean_dispatch.setattr(ki, "TOPK_FUSE", fuse)
    clean_dispatch.setattr(ki, "TOPK_ROW", row)
    clean_dispatch.setattr(ki, "SCORE_SELECT", one)
    q = mx.zeros((1, 1, 64, 128), mx.bfloat16)
    keys = (mx.zeros((1, N, 16), mx.uint32), mx.zeros((1, N, 4), mx.uint8))
    _, probe = ki._variant_key("cuda", q, keys, 512, True)
    probe()
    probed = list(log)
    log.clear()
    ki.indexer_topk_kernel(q, mx.zeros((1, 1, 64)), keys, None, 512, backend="cuda")
    single = one and ki.ROW_MIN <= N <= ki.ROW_MAX
    assert probed == log and len(log) == (1 if single else max(2, len(log))), (probed, log)
    assert ("score_select" in log[0][0]) == bool(single)


def test_one_rule(clean_dispatch):
    """When scoring and top-k run as one launch: decode rows of ROW_MIN..ROW_MAX entries by
    default (CUDA; not Metal, not with the register-fragment scorer), any rows when asked,
    never where a call names the other top-k's or scorer's own parameters; its limits."""
    N0 = ki.ROW_MIN
    assert ki._one(1, 1, N0, 512, None, "cuda", 0) == bool(ki.SCORE_SELECT)
    assert not ki._one(1, 1, N0, 512, None, "cuda", 1)  # the fragment scorer
    assert not ki._one(1, 1, ki.ROW_MAX + 1, 512, None, "cuda", 0)
    assert not ki._one(1, 132, N0, 512, None, "cuda", 0)
    assert not ki._one(1, 1, N0, 512, None, "metal", 0) or ki.SCORE_SELECT_METAL
    assert ki._one(1, 132, 600, 512, 1, "cuda", 1) and not ki._one(1, 1, 512, 512, 1, "cuda", 0)
    clean_dispatch.setenv(ki.VARIANTS_ENV, "noone")
    assert not ki._one(1, 1, N0, 512, None, "cuda", 0)
    clean_dispatch.setattr(ki, "SCORE_SELECT", 0)
    clean_dispatch.setenv(ki.VARIANTS_ENV, "one")
    assert ki._one(1, 1, N0, 512, None, "cuda", 0)
    clean_dispatch.delenv(ki.VARIANTS_ENV)
    clean_dispatch.setattr(ki, "SCORE_SELECT", 1)
    for u, cap in ((0, 64), (4, 0), (4, 4096)):
        with pytest.raises(ValueError):
            ki._select_spec(1, 1, N0, 512, [("SMEM4", 10)], u, cap)
    # the scratch: only where asked for, one per owner and row count, zeros
    owner = {}
    assert ki.select_scratch(1, owner) is None and ki.select_scratch(1) is None
    clean_dispatch.setenv(ki.VARIANTS_ENV, "scratch")
    a = ki.select_scratch(3, owner)
    assert a is ki.select_scratch(3, owner) and a.shape == (3, ki.SCRATCH_WORDS)
    assert a.dtype == mx.uint32 and not np.array(a).any() and ki.select_scratch(3) is None
    clean_dispatch.delenv(ki.VARIANTS_ENV)
    # its shared arrays within the static limit (CUDA 48 KiB: 64 heads fit, 112 do not)
    assert src.select_shared_bytes("cuda", 64, 128) == 36564  # (NVRTC's count for it)
    assert ki.select_usable("cuda", mx.bfloat16, 64, 128, "fp4")
    assert not ki.select_usable("cuda", mx.bfloat16, 112, 128, "fp4")
    assert not ki.select_usable("cuda", mx.float32, 64, 128, "fp4")
    tmpl, shapes, _ = ki._select_spec(1, 2, 1001, 64, [("SMEM4", 10), ("TPT", 2)], 4, 2048)
    assert dict(tmpl)["SMEM4"] == 1024 and shapes == [(1, 2, 64), (2, 1004 + 4100)]
    names = []
    clean_dispatch.setattr(ki, "_kernel", lambda backend, ks: (
        lambda inputs, template, grid, threadgroup, output_shapes, output_dtypes, **kw:
        names.append(ks.name) or [mx.zeros(sh, d) for sh, d in zip(output_shapes, output_dtypes)]))
    q = mx.zeros((1, 1, 64, 128), mx.bfloat16)
    keys = (mx.zeros((1, N0, 16), mx.uint32), mx.zeros((1, N0, 4), mx.uint8))
    for launch, want in (({}, "dsv4_indexer_score_select_fp4_all"),
                         ({"u": 8, "cap": 64}, "dsv4_indexer_score_select_fp4_all"),
                         ({"row": 1}, "dsv4_indexer_topk_row_all"),
                         ({"tg": 512}, "dsv4_indexer_topk_row_all"),
                         ({"s": 4}, "dsv4_indexer_topk_all"),
                         ({"one": 0}, "dsv4_indexer_topk_row_all")):
        names.clear()
        ki.indexer_topk_kernel(q, mx.zeros((1, 1, 64)), keys, None, 512, backend="cuda",
                               launch=launch or {"tpt": None})
        assert names[min(1, len(names) - 1)] == want, (launch, names)
    names.clear()
    ki.indexer_topk_kernel(q, mx.zeros((1, 1, 64)), keys, None, 512, backend="cuda", mma=False)
    assert names[-1] == "dsv4_indexer_topk_row_all"  # (the fp32 scorer: the launches apart)


def test_row_rule(clean_dispatch):
    """When the one-group top-k runs: decode rows of ROW_MIN..ROW_MAX entries by default
    (CUDA; Metal keeps the slices), any rows when asked for, never where a call names the
    slices' own parameters; its launch limits (32-1024 threads, CAP 1-2048)."""
    N0 = ki.ROW_MIN
    assert ki._row(1, 1, N0, 512, None) == bool(ki.TOPK_ROW)
    assert not ki._row(1, 1, ki.ROW_MIN - 1, 512, None)
    assert not ki._row(1, 1, ki.ROW_MAX + 1, 512, None)
    assert not ki._row(1, 132, N0, 512, None)  # prefill chunks: many rows
    assert ki._row(1, 132, N0, 512, 1) and not ki._row(1, 1, N0, 512, 0)
    assert not ki._row(1, 1, 512, 512, 1)  # no more entries than k: nothing to select
    assert not ki._row(1, 1, N0, 512, None, "metal") or ki.TOPK_ROW_METAL
    clean_dispatch.setenv(ki.VARIANTS_ENV, "norow")
    assert not ki._row(1, 1, N0, 512, None)
    clean_dispatch.setenv(ki.VARIANTS_ENV, "row")
    clean_dispatch.setattr(ki, "TOPK_ROW", 0)
    assert ki._row(1, 1, N0, 512, None)
    clean_dispatch.delenv(ki.VARIANTS_ENV)
    clean_dispatch.setattr(ki, "TOPK_ROW", 1)
    for tg, cap in ((2048, 64), (48, 64), (1024, 0), (1024, 4096)):
        with pytest.raises(ValueError):
            ki._row_spec(1, 1, 512, tg, 8, cap, 0)
    names = []
    clean_dispatch.setattr(ki, "_kernel", lambda backend, ks: (
        lambda inputs, template, grid, threadgroup, output_shapes, output_dtypes, **kw:
        names.append(ks.name) or [mx.zeros(sh, d) for sh, d in zip(output_shapes, output_dtypes)]))
    sc = mx.zeros((1, 1, N0))
    for kw, want in (({}, "dsv4_indexer_topk_row_all"), ({"r": 0}, "dsv4_indexer_topk_all"),
                     ({"s": 4}, "dsv4_indexer_topk_all"), ({"fuse": 0}, "dsv4_indexer_topk_all"),
                     ({"row": 1, "tg": 512}, "dsv4_indexer_topk_row_all")):
        names.clear()
        ki.indexer_select_kernel(sc, None, 512, backend="cuda", **kw)
        assert names[0] == want, (kw, names)


@needs_cxx
@pytest.mark.parametrize("case", ["random", "ties", "allequal", "negative", "fewvisible", "dups",
                                  "perm"])
@pytest.mark.parametrize("k,u,nslice,r", [(1, 4, 1, 0), (7, 1, 1, 0), (64, 4, 1, 0), (64, 3, 1, 0),
                                          (7, 4, 3, 0), (64, 2, 8, 0), (1, 4, 16, 0),
                                          (1, 4, 1, None), (64, 4, 1, None), (7, 4, 3, None),
                                          (64, 2, 8, None), (64, 4, 1, 2)])
def test_emulated_topk(emu, case, k, u, nslice, r):
    """Radix select: scores streamed at every pass (r = 0), held in registers (None: as many
    as the slice needs), or too few registers for the slice (r = 2 < 700 / 256: streamed);
    each pass's digit found by one thread (WALK 0) and by the first warp (WALK 1)."""
    rng = np.random.default_rng(len(case) * 10 + k)
    B, T, N = 2, 9, 700
    s = rng.standard_normal((B, T, N)).astype(np.float32)
    if case == "ties":  # relu-killed rows: most scores exactly 0
        s = np.where(rng.random((B, T, N)) < 0.9, 0.0, np.abs(s)).astype(np.float32)
    elif case == "allequal":
        s[:] = 0.25
    elif case == "negative":
        s = -np.abs(s) - 1.0
    elif case == "dups":  # few distinct values, many equal to the k-th
        s = rng.integers(0, 4, (B, T, N)).astype(np.float32)
    elif case == "perm":  # distinct values spread over many bins (early exit of the select)
        s = np.stack([rng.permutation(N) for _ in range(B * T)]).reshape(B, T, N)
        s = (s.astype(np.float32) - 300.0) * 1e3
    vis = np.array([0, 1, k - 1, k, k + 1, N - 1, N, 350, 512], np.int32)
    if case == "fewvisible":
        vis = np.minimum(vis, k + 2)
    vis = np.clip(vis, 0, N)
    s = _masked(s.astype(np.float64), vis).astype(np.float32)  # what the score kernel writes
    picks = []
    for walk in (0, 1):  # the serial walk of the bins, and the warp's
        idx = emu.topk(s, vis, k, u=u, s=nslice, r=r, walk=walk)
        check_topk(idx, np.where(np.isfinite(s), s, -1e30), vis, k, f"emu topk {case} w{walk}")
        picks.append(idx)
        if nslice > 1:  # the slices and their merge in one launch
            idx = emu.topk(s, vis, k, u=u, s=nslice, r=r, walk=walk, fuse=True)
            check_topk(idx, np.where(np.isfinite(s), s, -1e30), vis, k,
                       f"emu fused topk {case} w{walk}")
    # the same digits every pass: the same picks in the same slots (the emulation's thread
    # order is fixed)
    np.testing.assert_array_equal(picks[0], picks[1])


def _row_scores(rng, case, B, T, N):
    """Scores for the one-group top-k: spread, tied, narrow (the first 12 key bits shared by
    every entry), clustered in one first-digit bin with a tail above it, both signs."""
    s = rng.standard_normal((B, T, N))
    if case == "ties":  # relu-killed rows: most scores exactly 0
        s = np.where(rng.random((B, T, N)) < 0.9, 0.0, np.abs(s))
    elif case == "allequal":
        s = np.full((B, T, N), 0.25)
    elif case == "dups":  # few distinct values, many equal to the k-th
        s = rng.integers(0, 4, (B, T, N)).astype(np.float64)
    elif case == "narrow":  # 1000 + noise: one first-digit bin, the rest by later passes
        s = 1000.0 + rng.random((B, T, N)) * np.array([1e-4, 1e-2, 1.0] * T)[None, :T, None]
    elif case == "tail":  # most in one bin [1, 1.125), a few far above it
        s = 1.0 + rng.random((B, T, N)) * 0.1
        s[..., ::37] = 3.0 + rng.random((B, T, N))[..., ::37]
    elif case == "mixedsign":
        s = s * 1e3
    elif case == "perm":  # distinct values spread over many bins
        s = np.stack([rng.permutation(N) for _ in range(B * T)]).reshape(B, T, N)
        s = (s.astype(np.float64) - N / 2) * 1e3
    return s.astype(np.float32)


@needs_cxx
@pytest.mark.parametrize("case", ["random", "ties", "allequal", "dups", "narrow", "tail",
                                  "mixedsign", "perm"])
@pytest.mark.parametrize("k,tg,u,cap,ha", [(64, 256, 4, 2048, 1), (7, 128, 3, 2048, 0),
                                           (1, 64, 8, 2048, 1), (64, 256, 4, 16, 1),
                                           (200, 512, 2, 100, 0), (64, 256, 1, 1, 1)])
def test_emulated_topk_row(emu, case, k, tg, u, cap, ha):
    """The one-group top-k: the K-th key's bin copied to shared memory (CAP large), copied
    only after passes over the row (CAP 16, 100) or never (CAP 1: every pass and the picks
    streamed); the first histogram's adds plain and aggregated; the digit by one thread and
    by the first warp; every visibility edge. The values written are the picks' scores."""
    rng = np.random.default_rng(len(case) * 10 + k + cap)
    B, T, N = 2, 9, 1500
    s = _row_scores(rng, case, B, T, N)
    vis = np.clip(np.array([0, 1, k - 1, k, k + 1, N - 1, N, 700, 1024], np.int32), 0, N)
    s = _masked(s.astype(np.float64), vis).astype(np.float32)
    ref = np.where(np.isfinite(s), s, -1e30)
    picks = []
    for walk in (0, 1):
        idx, val = emu.row(s, vis, k, tg=tg, u=u, cap=cap, ha=ha, walk=walk)
        check_topk(idx, ref, vis, k, f"emu row topk {case} w{walk}", exact=True)
        got = np.take_along_axis(s, np.maximum(idx, 0), axis=-1)
        np.testing.assert_array_equal(np.where(idx >= 0, got, -np.inf), val)
        picks.append(idx)
    np.testing.assert_array_equal(picks[0], picks[1])  # the same digits: the same slots
    # all visible: the count never read (garbage in it), every row's N entries
    full = np.where(np.isfinite(s), s, 0.0).astype(np.float32)
    idx, _ = emu.row(full, np.full(T, -5, np.int32), k, tg=tg, u=u, cap=cap, ha=ha,
                     allvis=True)
    check_topk(idx, full, np.full(T, N, np.int32), k, f"emu row topk all visible {case}",
               exact=True)


@needs_cxx
@pytest.mark.parametrize("mode,H,D,B,T,N,kind,k,tpt,u,cap", [
    ("fp4", 64, 128, 1, 1, 1500, "random", 64, None, 4, 2048),   # a decode row's shape
    ("fp4", 16, 32, 1, 6, 1499, "zeros", 64, 2, 4, 2048),        # ties at 0, two tiles a group
    ("bf16", 16, 32, 2, 3, 1501, "random", 7, None, 1, 16),      # the bin narrowed first
    ("fp4", 16, 32, 1, 6, 1502, "negw", 100, 3, 2, 1),           # never copied: all streamed
    ("bf16", 16, 64, 2, 2, 1500, "allzero", 64, None, 4, 2048),  # every score 0
])
def test_emulated_score_select(emu, mode, H, D, B, T, N, kind, k, tpt, u, cap):
    """Scoring and top-k in one launch: its scores are the matrix-unit scorer's bit for bit,
    its picks the K largest of them exactly (every visibility edge across rows; all visible;
    rows of N not a multiple of 4: padded; two batch rows), every group counted in the row's
    ticket and its histogram holding the visible entries. (The emulation runs groups in
    reverse order: the last to arrive is the row's first.)"""
    rng = np.random.default_rng(H + D + T + k + len(kind))
    q, w, keys = make_case(rng, B, T, H, D, N, kind)
    q = to_bf16(q)
    key_in, _ = _key_arrays(mode, keys)
    vis = np.clip(np.array([N, 0, k, k + 1, N - 1, 700], np.int32)[:T], 0, N)
    idx, s, hist = emu.score_select(q, w, key_in, mode, vis, k, tpt=tpt, u=u, cap=cap)
    want = emu.score_mma(q, w, key_in, mode, vis, tpt=tpt)
    np.testing.assert_array_equal(s, want)
    check_topk(idx, np.where(np.isfinite(s), s, -1e30), vis, k, f"emu score+select {kind}",
               exact=True)
    KC, _, QRES = src.mma_layout("cpp", H, D, ki.MMA_WARPS)
    ngroups = -(-N // (16 * ki.MMA_WARPS * (tpt or ki.mma_tiles(B * T, N, QRES))))
    np.testing.assert_array_equal(hist[:, 4096], np.full(B * T, ngroups, np.uint32))
    np.testing.assert_array_equal(hist[:, :4096].sum(axis=1), np.tile(vis, B).astype(np.uint32))
    # all visible: the count never read (garbage in it)
    idx, s, _ = emu.score_select(q, w, key_in, mode, np.full(T, -5, np.int32), k, tpt=tpt,
                                 u=u, cap=cap, allvis=True)
    check_topk(idx, s, np.full(T, N, np.int32), k, f"emu score+select all visible {kind}",
               exact=True)
    # the histograms in a scratch the caller keeps: the same picks, the scratch left zeroed
    # for the next call (three calls through one scratch, two of them with counts)
    scratch = np.zeros((B * T, ki.SCRATCH_WORDS), np.uint32)
    for allvis in (False, True, False):
        v = np.full(T, N, np.int32) if allvis else vis
        idx2, s2, _ = emu.score_select(q, w, key_in, mode, v, k, tpt=tpt, u=u, cap=cap,
                                       allvis=allvis, scratch=scratch)
        np.testing.assert_array_equal(s2, want if not allvis else s)
        check_topk(idx2, np.where(np.isfinite(s2), s2, -1e30), v, k,
                   f"emu score+select scratch {kind}", exact=True)
        assert not scratch.any()


@needs_cxx
@pytest.mark.parametrize("case", ["narrow", "onebin", "boundties", "mixedsign", "short"])
@pytest.mark.parametrize("tg,s,r", [(256, 8, None), (256, 5, None), (256, 4, 0), (512, 16, None),
                                    (256, 2, None)])
def test_emulated_fused_topk_merge(emu, case, tg, s, r):
    """The fused merge's shortcuts: the slices' bounds (the largest drops candidates) and the
    first pass at the first byte where that bound and the largest candidate differ. Scores
    whose keys share 1, 2 or 3 top bytes (a narrow range), all equal, many ties at the K-th
    value, both signs, slices shorter than K; the bounds published, the counters counted."""
    rng = np.random.default_rng(len(case) + s + tg)
    # (s = 2: slices of 4,500 > 16 x 256 stream their scores; the merge holds its 128 in
    # registers)
    B, T, N, k = 1, 4, 9000 if s == 2 else 6000, 64
    if s == 2 and r is None:
        assert ki.topk_regs(N, tg, s) == 0 and ki._fused_spec(1, 1, N, k, tg, 4, s)[0][6] == ("R2", 1)
    if case == "narrow":  # 1000 + tiny noise: the top 2-3 bytes of every key the same
        sc = (1000.0 + rng.random((B, T, N)) * np.array([1e-4, 1e-2, 1.0, 50.0])[None, :, None])
    elif case == "onebin":
        sc = np.full((B, T, N), 3.0)
    elif case == "boundties":  # the K-th value shared by hundreds of entries
        sc = np.where(rng.random((B, T, N)) < 0.05, 2.0, rng.integers(0, 3, (B, T, N)))
    elif case == "mixedsign":
        sc = rng.standard_normal((B, T, N)) * 1e3
    else:  # short slices: fewer visible entries than s * k
        sc = rng.standard_normal((B, T, N))
    sc = sc.astype(np.float32)
    vis = np.array([N, N - 7, 3 * k + 5, k + 1] if case != "short" else [s * k - 3, k, 2, 0],
                   np.int32)
    sc = _masked(sc.astype(np.float64), vis).astype(np.float32)
    fin, thr, tick = emu.fused(sc, vis, k, tg, 4, s, r, 0)
    check_topk(fin, np.where(np.isfinite(sc), sc, -1e30), vis, k, f"fused {case} tg{tg} s{s}")
    np.testing.assert_array_equal(tick, np.full(B * T, s, np.uint32))  # every group counted
    # each bound is a lower bound of its slice's K largest keys (0 for a slice of <= K)
    keys = sc.view(np.uint32)
    keys = np.where(keys & 0x80000000, ~keys, keys | 0x80000000)
    for t in range(T):
        seg = -(-int(vis[t]) // s)
        for j in range(s):
            part = np.sort(keys[0, t, j * seg: min(vis[t], (j + 1) * seg)])[::-1]
            if len(part) <= k:
                assert thr[0, t, j] == 0
            else:
                assert part[k - 1] >= thr[0, t, j] > 0


@needs_cxx
@pytest.mark.parametrize("mode", src.KEY_MODES)
@pytest.mark.parametrize("B,T,H,D", [(1, 1, 64, 128), (2, 37, 8, 32), (2, 3, 64, 32)])
def test_emulated_end_to_end(emu, mode, B, T, H, D):
    """Score kernel then top-k kernel, as the GPU path chains them, vs the reference."""
    rng = np.random.default_rng(T + H + D + len(mode))
    N, k = 450, 64
    q, w, keys = make_case(rng, B, T, H, D, N, "zeros" if T == 37 else "random")
    key_in, kf = _key_arrays(mode, keys)
    vis = visibles(rng, T, N, k) if T > 1 else np.array([N], np.int32)
    scores = emu.score(q, w, key_in, mode, vis)
    idx = emu.topk(scores, vis, k)
    check_topk(idx, ref_scores(q, w, kf), vis, k, f"emu e2e {mode}")


# --------------------------------------------------------------------------------------------
# Metal source: compiled as C++ against the stand-in <metal_stdlib>

# what MLX's metal::utils() puts in front of every custom kernel (the parts the body uses)
_MLX_METAL_PRELUDE = """#include <metal_stdlib>
using namespace metal;
typedef bfloat bfloat16_t;
typedef half float16_t;
"""


def _metal_variants():
    out = []
    for mode in src.KEY_MODES:
        keyin = {"f32": [("float32", 3, 4096)], "bf16": [("uint32", 3, 2048)],
                 "fp4": [("uint32", 3, 512), ("uint8", 3, 4)]}[mode]
        for qt in ("float32", "bfloat16", "float16"):
            for D, H, HC, E in ((128, 64, 64, 1), (32, 8, 3, 4)):
                inputs = [(qt, 4, 4096), ("float32", 3, 64 if H == 64 else 5), *keyin,
                          ("int32", 1, 1)]
                tmpl = [("QT", qt), ("D", D), ("H", H), ("HC", HC), ("BN", 128), ("E", E)]
                out.append((f"score-{mode}-{qt}-D{D}", src.score_source("metal", mode), inputs,
                            ["float32"], tmpl))
    for mode in src.MMA_KEY_MODES:
        keyin = {"bf16": [("uint32", 3, 2048)], "fp4": [("uint32", 3, 512), ("uint8", 3, 4)]}[mode]
        for D, H in ((128, 64), (32, 16)):
            kc, smem4, qres = src.mma_layout("metal", H, D)
            inputs = [("uint32", 4, 2048), ("float32", 3, 64), *keyin, ("int32", 1, 1)]
            tmpl = [("D", D), ("H", H), ("NW", 4), ("KC", kc), ("SMEM4", smem4),
                    ("QRES", qres), ("TPT", 4), ("IDEC", 1), ("MMAPTX", 1)]
            out.append((f"score-mma-{mode}-D{D}", src.score_mma_source("metal", mode), inputs,
                        ["float32"], tmpl))
    for K, TG, U, S, MAPPED, R, WALK in ((512, 1024, 4, 1, False, 0, 0),
                                         (3, 256, 1, 16, True, 8, 1)):
        out.append((f"topk-K{K}-S{S}-R{R}-W{WALK}", src.topk_source("metal"),
                    [("float32", 3, 5), ("int32", 1, 37), ("int32", 1, 1)],
                    ["int32", "float32"],
                    [("K", K), ("TG", TG), ("U", U), ("S", S), ("MAPPED", MAPPED), ("R", R),
                     ("WALK", WALK)]))
    # the all-visible sources (a decode row: `visible` in the signature, never read)
    fp4in = [("uint32", 3, 512), ("uint8", 3, 4)]
    out.append(("score-fp4-all", src.score_source("metal", "fp4", allvis=True),
                [("bfloat16", 4, 4096), ("float32", 3, 64), *fp4in, ("int32", 1, 1)],
                ["float32"], [("QT", "bfloat16"), ("D", 128), ("H", 64), ("HC", 64), ("BN", 128),
                              ("E", 1)]))
    kc, smem4, qres = src.mma_layout("metal", 64, 128)
    out.append(("score-mma-fp4-all", src.score_mma_source("metal", "fp4", allvis=True),
                [("uint32", 4, 2048), ("float32", 3, 64), *fp4in, ("int32", 1, 1)], ["float32"],
                [("D", 128), ("H", 64), ("NW", 4), ("KC", kc), ("SMEM4", smem4), ("QRES", qres),
                 ("TPT", 4), ("IDEC", 0), ("MMAPTX", 1)]))
    out.append(("topk-all", src.topk_source("metal", allvis=True),
                [("float32", 3, 5), ("int32", 1, 1), ("int32", 1, 1)], ["int32", "float32"],
                [("K", 512), ("TG", 1024), ("U", 4), ("S", 16), ("MAPPED", False), ("R", 8),
                 ("WALK", 0)]))
    # the fused top-k (never dispatched on Metal, kept in the common subset)
    for R, R2, WALK in ((8, 16, 0), (0, 0, 1)):
        out.append((f"topk-fused-R{R}-R2{R2}-W{WALK}", src.topk_fused_source("metal"),
                    [("float32", 3, 65536), ("int32", 1, 37), ("uint32", 1, 8)],
                    ["int32", "float32", "uint32", "int32"],
                    [("K", 512), ("TG", 512), ("U", 4), ("S", 16), ("MAPPED", False), ("R", R),
                     ("R2", R2), ("WALK", WALK)]))
    # the one-group top-k (decode rows), counts read and all visible
    for allvis, TG, CAP, HA, WALK in ((False, 1024, 2048, 1, 0), (True, 256, 64, 0, 1)):
        out.append((f"topk-row-TG{TG}-CAP{CAP}-A{int(allvis)}",
                    src.topk_row_source("metal", allvis),
                    [("float32", 3, 65536), ("int32", 1, 1)], ["int32", "float32"],
                    [("K", 512), ("TG", TG), ("U", 8), ("CAP", CAP), ("HA", HA),
                     ("WALK", WALK)]))
    # scoring and the top-k in one launch (written for Metal, dispatched on CUDA only)
    kc, smem4, qres = src.mma_layout("metal", 64, 128)
    for allvis, scr in ((False, False), (True, False), (True, True)):
        out.append((f"score-select-fp4-A{int(allvis)}-S{int(scr)}",
                    src.score_select_source("metal", "fp4", allvis, scr),
                    [("uint32", 4, 2048), ("float32", 3, 64), ("uint32", 3, 512),
                     ("uint8", 3, 4), ("int32", 1, 1)] + ([("uint32", 2, 4100)] if scr else []),
                    ["int32", "float32"],
                    [("D", 128), ("H", 64), ("NW", 4), ("KC", kc), ("SMEM4", max(smem4, 1024)),
                     ("QRES", qres), ("TPT", 2), ("IDEC", 0), ("MMAPTX", 0), ("K", 512),
                     ("U", 4), ("CAP", 2048), ("WALK", allvis)]))
    return out


def _gxx_syntax(code: str, tmp: Path, name: str):
    f = tmp / f"{name}.metal.cpp"
    f.write_text(_MLX_METAL_PRELUDE + code)
    return subprocess.run(
        [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-Wno-attributes",
         "-Wno-unknown-pragmas", "-Wno-unused-variable", "-I", str(METAL_STUB), "-x", "c++",
         str(f)], capture_output=True, text=True)


@needs_cxx
@pytest.mark.parametrize("variant", _metal_variants(), ids=lambda v: v[0])
def test_metal_source_compiles_as_cpp(variant, tmp_path):
    name, ks, inputs, outs, tmpl = variant
    code = src.render_metal(ks, inputs, outs, tmpl)
    # the Metal attributes come from the prologue (MLX only adds those the body names)
    assert "[[thread_position_in_threadgroup]]" in code
    assert "[[threadgroup_position_in_grid]]" in code
    r = _gxx_syntax(code, tmp_path, name)
    assert r.returncode == 0, r.stderr[-4000:]


@needs_cxx
def test_metal_stub_catches_errors(tmp_path):
    """The harness is not vacuous: a plain read of an atomic, an undeclared name and an
    as_type between different sizes each fail to compile."""
    name, ks, inputs, outs, tmpl = _metal_variants()[-1]
    good = src.render_metal(ks, inputs, outs, tmpl)
    for bad in (good.replace("KI_ATOMIC_LOAD(ki_hist[d])", "ki_hist[d]"),
                good.replace("krem = (int)ki_sel[1];", "krem = (int)ki_sel[1] + undeclared;"),
                good.replace("#define KI_AS_UINT(f) as_type<uint>((float)(f))",
                             "#define KI_AS_UINT(f) as_type<uint>((half)(f))")):
        assert bad != good
        assert _gxx_syntax(bad, tmp_path, "bad").returncode != 0


def assert_common_subset(ks):
    """A kernel source keeps to the shared-body rules: no constructs that C++ accepts but Metal
    or the rules do not, inputs never bound to local pointers (Metal 'constant' vs 'device')."""
    for bad in (r"\bdouble\b", r"\bprintf\b", r"\bstd::", r"__syncthreads", r"threadIdx",
                r"simd_", r"__shfl"):
        assert not re.search(bad, ks.source), bad
    for n in ks.input_names:
        assert not re.search(rf"\*\s*\w+\s*=\s*{n}\b", ks.source), n


def test_kernel_bodies_stay_in_the_common_subset():
    """Constructs that C++ accepts but Metal or the shared-body rules do not."""
    for ks in ([src.score_source("metal", m) for m in src.KEY_MODES]
               + [src.score_mma_source("metal", m) for m in src.MMA_KEY_MODES]):
        body = ks.source
        for bad in (r"\bdouble\b", r"\bprintf\b", r"\bnew\b", r"\bgoto\b", r"\bstd::",
                    r"__syncthreads", r"threadIdx", r"simd_", r"__shfl"):
            assert not re.search(bad, body), bad
    for ks in (src.topk_source("metal"), src.topk_row_source("metal"),
               src.topk_row_source("metal", True), src.score_select_source("metal", "fp4")):
        for bad in (r"\bdouble\b", r"\bstd::", r"__syncthreads", r"threadIdx", r"simd_"):
            assert not re.search(bad, ks.source), bad
    # inputs are never bound to local pointers (Metal 'constant' vs 'device' inputs)
    for ks in ([src.score_source("metal", m) for m in src.KEY_MODES] + [src.topk_source("metal")]
               + [src.topk_row_source("metal"), src.score_select_source("metal", "fp4")]
               + [src.score_mma_source("metal", m) for m in src.MMA_KEY_MODES]):
        for n in ks.input_names:
            assert not re.search(rf"\*\s*\w+\s*=\s*{n}\b", ks.source), n


def test_headers_are_trimmed_to_what_the_body_uses():
    """A kernel carries only the header definitions its body reaches (MLX hashes the whole
    source at every evaluation): the top-k's has no FP4/FP8 decoding or matrix units; what it
    keeps includes the macros its kept helpers use; the units parse into named definitions
    (a unit the trimming cannot name is kept whatever the body uses)."""
    for dialect in ("cuda", "metal", "cpp"):
        full = src._header(dialect)
        units = src._header_units(full)
        assert "\n".join(t for _, t in units).strip() == full.strip()  # nothing lost
        unnamed = [t for n, t in units if n is None and t.strip()
                   and not all(ln.strip().startswith("//") or not ln.strip()
                               for ln in t.split("\n"))]
        assert len(unnamed) <= 10, unnamed  # #include lines, the emulation's namespace
        top = src.topk_source(dialect).header
        assert len(top) < len(full) / 3
        for gone in ("ki_e2m1_bf16", "ki_e4m3x4", "ki_mma_acc", "ki_prmt_sw", "ki_e2m1_table"):
            assert gone not in top, (dialect, gone)
        for kept in ("ki_order_key", "ki_order_value", "KI_HIST_ADD", "KI_AS_UINT", "KI_FN"):
            assert kept in top, (dialect, kept)
    # a body naming one helper gets it and what it needs, nothing else
    h = src.trim_header(src._header("cuda"), "float v = ki_e2m1(3u);")
    assert "ki_e2m1(" in h and "KI_FN" in h and "ki_order_key" not in h


# --------------------------------------------------------------------------------------------
# CUDA source: compiled with nvcc against MLX's CUDA device headers


def _mlx_cuda_include():
    cands = [os.environ.get("DSV4_MLX_CUDA_INCLUDE", "")]
    cands.append(str(Path(mx.__file__).parent / "include"))
    for c in cands:
        if c and (Path(c) / "mlx/backend/cuda/device/utils.cuh").exists():
            return c
    return None


def _cccl_include(nvcc):
    root = Path(nvcc).resolve().parent.parent
    for c in (root / "include" / "cccl", root / "targets" / "x86_64-linux" / "include" / "cccl"):
        if (c / "cuda" / "std" / "array").exists():
            return str(c)
    return None


NVCC = shutil.which("nvcc")


def nvcc_compile(code: str, tmp: Path, name: str, *flags: str):
    """nvcc -c of a rendered CUDA kernel against MLX's device headers (skips the test when
    those are not found); the CompletedProcess."""
    inc = _mlx_cuda_include()
    if inc is None:
        pytest.skip("MLX CUDA device headers not found (set DSV4_MLX_CUDA_INCLUDE)")
    extra = [f"-I{c}" for c in (_cccl_include(NVCC),) if c]
    f = tmp / f"{name}.cu"
    f.write_text(code)
    return subprocess.run([NVCC, "-std=c++17", "-arch=sm_90a", "-c", f"-I{inc}", *extra, *flags,
                           str(f), "-o", str(tmp / f"{name}.o")], capture_output=True, text=True)


def assert_metal_compiles(launch, tmp: Path, name: str) -> str:
    """A launch (KernelSource, [(dtype, ndim, size)] inputs, output dtypes, template) rendered
    as Metal compiles as C++ against the stand-in header; returns the rendered code."""
    ks, inputs, outs, tmpl = launch
    code = src.render_metal(ks, inputs, outs, tmpl)
    r = _gxx_syntax(code, tmp, name)
    assert r.returncode == 0, r.stderr[-4000:]
    return code


def assert_nvcc_compiles(launch, tmp: Path, name: str) -> None:
    """The same launch rendered as CUDA compiles with nvcc against MLX's device headers."""
    ks, inputs, outs, tmpl = launch
    r = nvcc_compile(src.render_cuda(ks, inputs, outs, tmpl), tmp, name)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("mode", src.KEY_MODES)
def test_cuda_source_compiles_with_nvcc(mode, tmp_path):
    keyin = {"f32": [("float32", 3, 4096)], "bf16": [("uint32", 3, 2048)],
             "fp4": [("uint32", 3, 512), ("uint8", 3, 4)]}[mode]
    jobs = [
        ("score", src.score_source("cuda", mode),
         [("bfloat16", 4, 8192), ("float32", 3, 64), *keyin, ("int32", 1, 1)], ["float32"],
         [("QT", "bfloat16"), ("D", 128), ("H", 64), ("HC", 64), ("BN", 128), ("E", 2)]),
        ("topk", src.topk_source("cuda"), [("float32", 3, 4096), ("int32", 1, 1), ("int32", 1, 1)],
         ["int32", "float32"], [("K", 512), ("TG", 1024), ("U", 4), ("S", 1), ("MAPPED", False),
                                ("R", 8), ("WALK", 1)]),
        ("topk_fused", src.topk_fused_source("cuda"),
         [("float32", 3, 65536), ("int32", 1, 1), ("uint32", 1, 1)],
         ["int32", "float32", "uint32", "int32"],
         [("K", 512), ("TG", 512), ("U", 4), ("S", 16), ("MAPPED", False), ("R", 8), ("R2", 16),
          ("WALK", 0)]),
    ]
    if mode in src.MMA_KEY_MODES:
        kc, smem4, qres = src.mma_layout("cuda", 64, 128)
        jobs.append(("score_mma", src.score_mma_source("cuda", mode),
                     [("uint32", 4, 4096), ("float32", 3, 64), *keyin, ("int32", 1, 1)],
                     ["float32"], [("D", 128), ("H", 64), ("NW", 4), ("KC", kc),
                                   ("SMEM4", smem4), ("QRES", qres), ("TPT", 4),
                                   ("IDEC", 1), ("MMAPTX", 1)]))
    if mode in src.FRAG_KEY_MODES:
        jobs.append(("score_frag", src.score_frag_source("cuda", mode),
                     [("uint32", 4, 4096), ("float32", 3, 64), *keyin, ("int32", 1, 1)],
                     ["float32"], [("D", 128), ("H", 64), ("NW", 4), ("TPW", 4), ("ME", 1),
                                   ("IDEC", 2)]))
    for name, ks, inputs, outs, tmpl in jobs:
        r = nvcc_compile(src.render_cuda(ks, inputs, outs, tmpl), tmp_path, name, "-Xptxas", "-v")
        assert r.returncode == 0, r.stderr[-4000:]
        # the key row lives in registers: no spills
        assert " 0 bytes spill stores" in r.stderr, r.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# dispatch


def test_env_var_values(clean_dispatch):
    for v in ("auto", "ops", "AUTO", " ops ", ""):
        clean_dispatch.setenv(dispatch.ENV_VAR, v)
        assert dispatch.requested() in dispatch.CHOICES
    clean_dispatch.setenv(dispatch.ENV_VAR, "vulkan")
    with pytest.raises(ValueError, match="DSV4_INDEXER_KERNEL"):
        dispatch.select_backend()
    clean_dispatch.setenv(dispatch.ENV_VAR, "ops")
    assert dispatch.select_backend() == "ops"


def test_auto_on_cpu_is_ops(clean_dispatch):
    old = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        assert dispatch.select_backend() == "ops"
    finally:
        mx.set_default_device(old)


@pytest.mark.parametrize("name", ["metal", "cuda"])
def test_forcing_a_missing_backend_raises(clean_dispatch, name):
    if name in dispatch.available_backends():
        pytest.skip(f"{name} is available here")
    clean_dispatch.setenv(dispatch.ENV_VAR, name)
    with pytest.raises(RuntimeError, match=name):
        dispatch.select_backend()


def test_dispatch_cpu_matches_ops(clean_dispatch):
    rng = np.random.default_rng(5)
    q, w, keys = make_case(rng, 2, 37, 8, 32, 300)
    vis = visibles(rng, 37, 300, 16)
    a = ki.indexer_topk(mx.array(q), mx.array(w), mx.array(keys), mx.array(vis), 16)
    check_topk(a, ref_scores(q, w, keys), vis, 16, "dispatch")
    pair, deq, _ = fp4_keys(keys)
    b = ki.indexer_topk(mx.array(q), mx.array(w), pair, mx.array(vis), 16)
    check_topk(b, ref_scores(q, w, deq), vis, 16, "dispatch fp4")


def test_failed_kernel_warns_once_and_falls_back(clean_dispatch):
    """A kernel that does not build: one RuntimeWarning, then the ops path, silently."""
    clean_dispatch.setattr(dispatch, "select_backend", lambda env_var=dispatch.ENV_VAR, default="auto": "ops" if default == "ops" else "metal")

    def broken(backend, ks):
        raise RuntimeError("[metal_kernel] Unable to build metal library from source (stub)")

    clean_dispatch.setattr(ki, "_kernel", broken)
    rng = np.random.default_rng(1)
    q, w, keys = make_case(rng, 1, 4, 8, 32, 100)
    vis = np.array([0, 10, 99, 100], np.int32)
    args = (mx.array(q), mx.array(w), mx.array(keys), mx.array(vis), 16)
    with pytest.warns(RuntimeWarning, match="falling back to the pure-ops path"):
        a = ki.indexer_topk(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = ki.indexer_topk(*args)
    ref = ref_scores(q, w, keys)
    check_topk(a, ref, vis, 16, "fallback 1")
    check_topk(b, ref, vis, 16, "fallback 2")


@pytest.mark.parametrize("T,N,k,mode,qdtype", [
    (1, 65536, 512, "fp4", "bfloat16"),   # sliced top-k and the merge, matrix units
    (1, 4096, 512, "fp4", "bfloat16"),
    (3, 2000, 64, "bf16", "bfloat16"),
    (2, 1000, 64, "f32", "float32"),      # the fp32 scoring kernel
    (1, 300, 512, "fp4", "float32"),      # fewer entries than k: the ops path
])
def test_planned_launches_match_the_explicit_path(clean_dispatch, T, N, k, mode, qdtype):
    """`indexer_topk_kernel` with its defaults runs launches planned once per shape; they must
    be the very launches (kernel, template, grid, group, outputs, inputs) that the explicit
    path (`indexer_scores_kernel` + `indexer_select_kernel`) makes."""
    log = []

    def recorder(backend, ks):
        def kern(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **kw):
            log.append((ks.name, list(template), tuple(grid), tuple(threadgroup),
                        [tuple(s) for s in output_shapes], list(output_dtypes),
                        [(a.shape, a.dtype) for a in inputs], kw.get("init_value")))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return kern

    clean_dispatch.setattr(ki, "_kernel", recorder)
    rng = np.random.default_rng(N + T)
    q, w, keys = make_case(rng, 1, T, 64, 128, N)
    kx = _mx_keys(mode, keys)[0]
    qa = mx.array(q).astype(getattr(mx, qdtype))
    vis = mx.array(np.full((T,), N, np.int32))
    for fuse, frag, allvis, row, one in (
            (0, 0, 0, 0, 0), (1, 0, 0, 0, 0), (0, 1, 0, 0, 0), (1, 1, 0, 0, 0), (0, 0, 1, 0, 0),
            (1, 1, 1, 0, 0), (1, 0, 0, 1, 0), (0, 1, 1, 1, 0), (0, 0, 0, 0, 1), (0, 0, 1, 1, 1),
            (1, 0, 0, 1, 1), (0, 1, 1, 0, 1)):
        clean_dispatch.setattr(ki, "TOPK_FUSE", fuse)
        clean_dispatch.setattr(ki, "FRAG_SCORER", frag)
        clean_dispatch.setattr(ki, "TOPK_ROW", row)
        clean_dispatch.setattr(ki, "SCORE_SELECT", one)
        runs = []
        for launch in (None, {"tpt": None}, None):  # planned, explicit, planned again (cached)
            log.clear()
            ki.indexer_topk_kernel(qa, mx.array(w), kx, None if allvis else vis, k,
                                   backend="cuda", launch=launch)
            runs.append(list(log))
        assert runs[0] == runs[1] == runs[2]
        single = (one and not (frag and qdtype == "bfloat16") and ki.ROW_MIN <= N <= ki.ROW_MAX
                  and k < N and ki._mma_usable("cuda", qa.dtype, 64, 128, mode))
        assert len(runs[0]) == (0 if k >= N else 1 if single else
                                3 if N == 65536 and not fuse and not row else 2)
        if single:  # (it wins over the others; its work rows zeroed)
            assert runs[0][0][0] == "dsv4_indexer_score_select_fp4" + ("_all" if allvis else "")
            assert runs[0][0][4] == [(1, T, k), (T, N + 4100)] and runs[0][0][7] == 0.0
            # with a scratch: the scratch kernel, nothing filled, the scratch its last input
            scratch = mx.zeros((T, ki.SCRATCH_WORDS), mx.uint32)
            sruns = []
            for launch in (None, {"tpt": None}):
                log.clear()
                ki.indexer_topk_kernel(qa, mx.array(w), kx, None if allvis else vis, k,
                                       backend="cuda", launch=launch, scratch=scratch)
                sruns.append(list(log))
            assert sruns[0] == sruns[1] and len(sruns[0]) == 1, sruns
            assert sruns[0][0][0] == runs[0][0][0] + "_scr" and sruns[0][0][7] is None
            assert sruns[0][0][4] == [(1, T, k), (T, N)]
            assert sruns[0][0][6][-1] == ((T, ki.SCRATCH_WORDS), mx.uint32)
        elif row and ki.ROW_MIN <= N <= ki.ROW_MAX and k < N:  # (it wins over the fused one)
            assert runs[0][1][0] == "dsv4_indexer_topk_row" + ("_all" if allvis else "")
            assert runs[0][1][2] == (1024, T, 1) and len(runs[0][0][4]) == 1
        elif fuse and N == 65536:
            assert runs[0][0][4][1] == (T,)
            assert runs[0][1][0] == "dsv4_indexer_topk_fused" + ("_all" if allvis else "")
        if runs[0]:
            assert ("_frag_" in runs[0][0][0]) == bool(frag and qdtype == "bfloat16"), runs[0][0][0]
            # all visible: the scoring and first top-k launch read no count (`_all` sources)
            assert [r[0].endswith("_all") for r in runs[0]][:2] == \
                [bool(allvis)] * min(2, len(runs[0])), runs[0]


def test_plans_stay_bounded_as_the_entries_grow(clean_dispatch):
    """The entry count grows every few tokens all through a session: the per-shape plans and
    decisions must not grow with it."""
    clean_dispatch.setattr(ki, "_kernel", lambda backend, ks: lambda inputs, output_shapes,
                           output_dtypes, **kw: [mx.zeros(s, d) for s, d in
                                                 zip(output_shapes, output_dtypes)])
    clean_dispatch.setattr(dispatch, "select_backend", lambda env_var=dispatch.ENV_VAR, default="auto": "ops" if default == "ops" else "cuda")
    clean_dispatch.setattr(dispatch, "kernel_usable", lambda key, probe, what: True)
    q, w = mx.zeros((1, 1, 16, 32), mx.bfloat16), mx.zeros((1, 1, 16))
    for N in range(40, 700):
        keys = (mx.zeros((1, N, 4), mx.uint32), mx.zeros((1, N, 1), mx.uint8))
        ki.indexer_topk(q, w, keys, mx.array([N], mx.int32), 32)
    assert 0 < len(ki._plans) <= 512 and 0 < len(ki._usable) <= 512


# --------------------------------------------------------------------------------------------
# on the GPU: kernels vs the ops path and the reference

GPU_BACKENDS = dispatch.available_backends()
needs_gpu = pytest.mark.skipif(not GPU_BACKENDS, reason="no Metal or CUDA backend in this MLX")


@pytest.fixture
def gpu(clean_dispatch):
    old = mx.default_device()
    mx.set_default_device(mx.gpu)
    yield GPU_BACKENDS[0]
    mx.set_default_device(old)


def _mx_keys(mode, keys):
    """(keys for the kernel / ops path, keys as fp32 numpy for the reference)."""
    if mode == "f32":
        return mx.array(keys), keys
    if mode == "bf16":
        kb = mx.array(keys).astype(mx.bfloat16)
        return kb, np.array(kb.astype(mx.float32))
    pair, deq, _ = fp4_keys(keys)
    return pair, deq


@needs_gpu
@pytest.mark.parametrize("B,T,H,D", SHAPES)
@pytest.mark.parametrize("mode", src.KEY_MODES)
def test_gpu_kernel_vs_ops(gpu, B, T, H, D, mode):
    rng = np.random.default_rng(B * 3 + T + H + D + len(mode))
    N, topk = 1000, 64  # 1000 = 7 * 128 + 104
    for kind in ("random", "zeros", "allzero"):
        q, w, keys = make_case(rng, B, T, H, D, N, kind)
        km, kf = _mx_keys(mode, keys)
        ref = ref_scores(q, w, kf)
        vis_sets = ([np.array([v], np.int32) for v in (0, 1, N - 1, N)] if T == 1
                    else [visibles(rng, T, N, topk)])
        for vis in vis_sets:
            qa, wa, va = mx.array(q), mx.array(w), mx.array(vis)
            sk = ki.indexer_scores_kernel(qa, wa, km, va, backend=gpu)
            want = _masked(ref, vis)
            got = np.array(sk)
            assert np.array_equal(np.isneginf(got), np.isneginf(want))
            fin = np.isfinite(want)
            if fin.any():
                np.testing.assert_allclose(got[fin], want[fin], rtol=1e-4,
                                           atol=1e-5 * (np.abs(want[fin]).max() + 1e-6))
            a = ki.indexer_topk_kernel(qa, wa, km, va, topk, backend=gpu)
            b = ki.indexer_topk_ops(qa, wa, km, va, topk)
            c = ki.indexer_topk(qa, wa, km, va, topk)  # the dispatch point
            for name, idx in (("kernel", a), ("ops", b), ("dispatch", c)):
                check_topk(idx, ref, vis, topk, f"{name} {mode} {kind} {B}x{T}x{H}x{D}")


@needs_gpu
def test_gpu_bf16_queries_and_argpartition(gpu):
    rng = np.random.default_rng(2)
    q, w, keys = make_case(rng, 2, 37, 64, 128, 3000)
    qb = mx.array(q).astype(mx.bfloat16)
    qf = np.array(qb.astype(mx.float32))
    vis = visibles(rng, 37, 3000, 512)
    for mode in src.KEY_MODES:
        km, kf = _mx_keys(mode, keys)
        ref = ref_scores(qf, w, kf)
        for select in ("kernel", "argpartition"):
            idx = ki.indexer_topk_kernel(qb, mx.array(w), km, mx.array(vis), 512, backend=gpu,
                                         select=select)
            check_topk(idx, ref, vis, 512, f"bf16 q {mode} {select}")


@needs_gpu
@pytest.mark.parametrize("B,T,H,D", [(1, 1, 64, 128), (2, 37, 64, 128), (2, 3, 16, 32),
                                     (1, 5, 48, 64)])
@pytest.mark.parametrize("mode", src.MMA_KEY_MODES)
def test_gpu_mma_scores(gpu, B, T, H, D, mode):
    """The matrix-unit scoring kernel (bf16 queries) and the fp32 one, forced, against the
    reference with the same bf16 queries; then the top-k through each."""
    rng = np.random.default_rng(B + T + H + D + len(mode))
    N, topk = 1000, 64
    for kind in ("random", "zeros", "negw"):
        q, w, keys = make_case(rng, B, T, H, D, N, kind)
        qb = mx.array(q).astype(mx.bfloat16)
        qf = np.array(qb.astype(mx.float32))
        km, kf = _mx_keys(mode, keys)
        ref = ref_scores(qf, w, kf)
        vis = visibles(rng, T, N, topk) if T > 1 else np.array([N - 3], np.int32)
        want = _masked(ref, vis)
        fin = np.isfinite(want)
        wa, va = mx.array(w), mx.array(vis)
        assert ki.mma_usable(gpu, qb, mode)
        if mode == "fp4":  # the integer / table FP4 decodes: the same tiles, the same scores
            a, b, c = (np.array(ki.indexer_scores_kernel(qb, wa, km, va, backend=gpu, mma=True,
                                                         idec=i)) for i in (0, 1, 2))
            np.testing.assert_array_equal(a, b, err_msg=f"idec 1 {kind}")
            np.testing.assert_array_equal(a, c, err_msg=f"idec 2 {kind}")
        if gpu == "cuda":  # ldmatrix + mma.sync: the same products in the same order
            a, b = (np.array(ki.indexer_scores_kernel(qb, wa, km, va, backend=gpu, mma=True,
                                                      mmaptx=p)) for p in (0, 1))
            assert np.array_equal(np.isneginf(a), np.isneginf(b)), f"mmaptx {kind}"
            np.testing.assert_allclose(b[fin], want[fin], rtol=1e-4,
                                       atol=1e-5 * (np.abs(want[fin]).max() + 1e-6),
                                       err_msg=f"mmaptx {kind}")
            np.testing.assert_allclose(b[fin], a[fin], rtol=1e-6, atol=1e-7 * np.abs(a[fin]).max(),
                                       err_msg=f"mmaptx vs wmma {kind}")
        if ki.frag_usable(gpu, qb.dtype, H, D, mode):  # keys straight into the registers
            tiled = np.array(ki.indexer_scores_kernel(qb, wa, km, va, backend=gpu, mma=True,
                                                      frag=0))
            for fl in (None, (4, 1, 2), (8, 4, 1), (2, 3, 2)):
                decs = []
                for i in ((0, 1, 2) if mode == "fp4" else (0,)):
                    got = np.array(ki.indexer_scores_kernel(qb, wa, km, va, backend=gpu,
                                                            frag=1, fl=fl, idec=i))
                    decs.append(got)  # every FP4 decode: the same registers, the same bits
                    np.testing.assert_array_equal(got, decs[0], err_msg=f"frag {fl} idec {i}")
                    assert np.array_equal(np.isneginf(got), np.isneginf(want)), (fl, i, kind)
                    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-4,
                                               atol=1e-5 * (np.abs(want[fin]).max() + 1e-6),
                                               err_msg=f"frag {fl} idec {i} {kind}")
                    np.testing.assert_allclose(got[fin], tiled[fin], rtol=1e-5,
                                               atol=1e-6 * (np.abs(tiled[fin]).max() + 1e-6),
                                               err_msg=f"frag vs tiles {fl} idec {i} {kind}")
            idx = ki.indexer_topk_kernel(qb, wa, km, va, topk, backend=gpu,
                                         launch={"frag": 1})
            check_topk(idx, ref, vis, topk, f"frag {mode} {kind} {B}x{T}x{H}x{D}")
        for mma in (True, False):
            got = np.array(ki.indexer_scores_kernel(qb, wa, km, va, backend=gpu, mma=mma))
            assert np.array_equal(np.isneginf(got), np.isneginf(want)), (mma, kind)
            np.testing.assert_allclose(got[fin], want[fin], rtol=1e-4,
                                       atol=1e-5 * (np.abs(want[fin]).max() + 1e-6),
                                       err_msg=f"mma={mma} {kind}")
            idx = ki.indexer_topk_kernel(qb, wa, km, va, topk, backend=gpu, mma=mma)
            check_topk(idx, ref, vis, topk, f"mma={mma} {mode} {kind} {B}x{T}x{H}x{D}")


@needs_gpu
@pytest.mark.parametrize("mode", ["fp4", "bf16"])
def test_gpu_all_visible(gpu, mode):
    """A decode row with visible None (every entry visible: the `_all` sources read no count):
    the same picks as the count N, through every scorer, sliced and fused or not, planned
    (at 70,000 entries the dispatch's one-group top-k)."""
    rng = np.random.default_rng(21)
    B, T, H, D, N, k = 1, 1, 64, 128, 70000, 512
    q, w, keys = make_case(rng, B, T, H, D, N)
    km, kf = _mx_keys(mode, keys)
    qb = mx.array(q).astype(mx.bfloat16)
    ref = ref_scores(np.array(qb.astype(mx.float32)), w, kf)
    vis = np.array([N], np.int32)
    wa = mx.array(w)
    full = np.array(ki.indexer_scores_kernel(qb, wa, km, mx.array(vis), backend=gpu))
    for frag in (0, 1):
        got = np.array(ki.indexer_scores_kernel(qb, wa, km, None, backend=gpu, frag=frag))
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-6 * np.abs(full).max())
        for fuse in (0, 1):
            idx = ki.indexer_topk_kernel(qb, wa, km, None, k, backend=gpu,
                                         launch={"fuse": fuse, "frag": frag})
            check_topk(idx, ref, vis, k, f"all visible {mode} frag={frag} fuse={fuse}")
    check_topk(ki.indexer_topk(qb, wa, km, None, k), ref, vis, k, f"dispatch, all visible {mode}")


def _long_rows(rng, mode, kind, B, T, H, D, N):
    """Three decode-like rows of N entries for the long-row top-k tests, seeing N, 700 and
    100 of them: (q, w, keys as the kernels take them, reference scores, counts as numpy
    and as an array)."""
    q, w, keys = make_case(rng, B, T, H, D, N, kind)
    km, kf = _mx_keys(mode, keys)
    vis = np.array([N, 700, 100], np.int32)
    return mx.array(q), mx.array(w), km, ref_scores(q, w, kf), vis, mx.array(vis)


@needs_gpu
@pytest.mark.parametrize("mode", ["fp4", "bf16"])
def test_gpu_sliced_topk(gpu, mode):
    """Few long rows: the two-launch top-k (S slices, then the S * k candidates)."""
    rng = np.random.default_rng(12)
    B, T, H, D, N, k = 1, 3, 64, 128, 140000, 512
    assert ki.topk_launch(B, T, N, k)[2] > 1
    for kind in ("random", "zeros"):
        qa, wa, km, ref, vis, va = _long_rows(rng, mode, kind, B, T, H, D, N)
        for s in (None, 1, 4, 32, 77):
            for fuse in (0, 1):  # the slices' merge as a second launch, or in the same one
                idx = ki.indexer_topk_kernel(qa, wa, km, va, k, backend=gpu,
                                             launch={"fuse": fuse} if s is None else
                                             {"s": s, "fuse": fuse})
                check_topk(idx, ref, vis, k, f"sliced {mode} {kind} s={s} fuse={fuse}")
        scores = ki.indexer_scores_kernel(qa, wa, km, va, backend=gpu)
        for walk in (0, 1):  # each pass's digit by one thread or by the first warp
            for s in (None, 1):
                for fuse in (0, 1):
                    idx = ki.indexer_select_kernel(scores, va, k, backend=gpu, s=s, walk=walk,
                                                   fuse=fuse)
                    check_topk(idx, ref, vis, k,
                               f"sliced {mode} {kind} s={s} walk={walk} fuse={fuse}")
        # many fused launches in one graph (independent, each with its own counters), and
        # the planned path (the scoring launch's counters)
        outs = [ki.indexer_select_kernel(scores + float(j), va, k, backend=gpu, fuse=1)
                for j in range(8)]
        for j, idx in enumerate(outs):
            check_topk(idx, ref + float(j), vis, k, f"8 fused launches in a graph, #{j}")
        check_topk(ki.indexer_topk(qa[:, :1], wa[:, :1], km, va[:1], k), ref[:, :1], vis[:1], k,
                   f"dispatch decode {mode} {kind}")


@needs_gpu
@pytest.mark.parametrize("mode", ["fp4", "bf16"])
def test_gpu_row_topk(gpu, mode, monkeypatch):
    """The one-group top-k (`TOPK_ROW`) on the GPU: rows of 140,000 scored entries (random,
    and queries of zeros: every score tied), the K-th key's bin copied to shared memory or
    not (CAP 2048, 64, 1), the first adds plain and aggregated, the digit by one thread or
    the warp, groups of 256 to 1024; counts and all visible; the planned dispatch; then
    262,144 adversarial scores (one first-digit bin, a tail above one bin, ties)."""
    rng = np.random.default_rng(31)
    monkeypatch.setattr(ki, "SCORE_SELECT", 0)  # (the dispatch below: the top-k apart)
    B, T, H, D, N, k = 1, 3, 64, 128, 140000, 512
    for kind in ("random", "zeros"):
        qa, wa, km, ref, vis, va = _long_rows(rng, mode, kind, B, T, H, D, N)
        scores = ki.indexer_scores_kernel(qa, wa, km, va, backend=gpu)
        sc = np.array(scores)  # (the select's own input: its picks must be exactly the top k)
        for tg, u, cap, ha, walk in ((1024, 8, 2048, 1, 0), (1024, 4, 2048, 0, 1),
                                     (512, 8, 64, 1, 0), (256, 2, 1, 1, 1)):
            idx = ki.indexer_select_kernel(scores, va, k, backend=gpu, row=1, tg=tg, u=u,
                                           cap=cap, ha=ha, walk=walk)
            check_topk(idx, ref, vis, k, f"row {mode} {kind} tg={tg} cap={cap} ha={ha}")
            check_topk(idx, sc, vis, k, f"row {mode} {kind} tg={tg} cap={cap}, exact", exact=True)
        idx = ki.indexer_topk_kernel(qa[:, :1], wa[:, :1], km, None, k, backend=gpu,
                                     launch={"row": 1})
        check_topk(idx, ref[:, :1], vis[:1], k, f"row {mode} {kind} all visible")
        monkeypatch.setattr(ki, "TOPK_ROW", 1)
        monkeypatch.setattr(ki, "ROW_MAX", 1 << 20)  # (140,000 entries: past the default)
        with warnings.catch_warnings():  # (a kernel that failed its probe would warn and
            warnings.simplefilter("error")  # fall back to the ops path)
            check_topk(ki.indexer_topk(qa[:, :1], wa[:, :1], km, None, k), ref[:, :1], vis[:1],
                       k, f"dispatch decode, one-group top-k {mode} {kind}")
            monkeypatch.setattr(ki, "TOPK_ROW", 0)
            check_topk(ki.indexer_topk(qa[:, :1], wa[:, :1], km, None, k), ref[:, :1], vis[:1],
                       k, f"dispatch decode, slices {mode} {kind}")
    N = 262144
    for case in ("narrow", "tail", "dups", "allequal"):
        sc = _row_scores(rng, case, 1, 3, N)
        vis = np.array([N, N - 1000, 3 * k], np.int32)
        sc = _masked(sc.astype(np.float64), vis).astype(np.float32)
        for cap in (2048, 64):
            idx = ki.indexer_select_kernel(mx.array(sc), mx.array(vis), k, backend=gpu, row=1,
                                           cap=cap)
            check_topk(idx, np.where(np.isfinite(sc), sc, -1e30), vis, k,
                       f"row {case} {N} cap={cap}", exact=True)


@needs_gpu
@pytest.mark.parametrize("mode", ["fp4", "bf16"])
def test_gpu_score_select(gpu, mode, monkeypatch):
    """Scoring and top-k in one launch (`SCORE_SELECT`) on the GPU: rows of 65,536, 70,001
    (padded to 4) and 140,000 entries, random and tied (queries of zeros), seeing N, 700 and
    100; its picks exactly the top k of the matrix-unit scorer's own scores (the same code),
    the bin copied or not (CAP 2048, 64, 1), U 1-8, the digit by one thread or the warp; all
    visible; a scratch kept across calls (`SELECT_SCRATCH`) left zeroed; the planned dispatch
    without a fallback warning."""
    rng = np.random.default_rng(41)
    B, T, H, D, k = 1, 3, 64, 128, 512
    for N in (65536, 70001, 140000):
        for kind in ("random", "zeros"):
            qa, wa, km, ref, vis, va = _long_rows(rng, mode, kind, B, T, H, D, N)
            qa = qa.astype(mx.bfloat16)  # (the matrix units' queries; ref: fp32 queries)
            sc = np.array(ki.indexer_scores_kernel(qa, wa, km, va, backend=gpu, mma=True))
            sc_all = np.array(ki.indexer_scores_kernel(qa, wa, km, None, backend=gpu, mma=True))
            for u, cap, walk in ((4, 2048, 0), (8, 2048, 1), (1, 64, 0), (2, 1, 1)):
                idx = ki.indexer_topk_kernel(qa, wa, km, va, k, backend=gpu, launch={
                    "one": 1, "u": u, "cap": cap, "walk": walk})
                # (exactly the top k of the scorer's own scores: `ref` has fp32 queries, and
                # their bf16 rounding reorders entries near the K-th by more than its tolerance)
                what = f"one launch {mode} {kind} N={N} u={u} cap={cap} walk={walk}"
                check_topk(idx, sc, vis, k, what + ", exact", exact=True)
            idx = ki.indexer_topk_kernel(qa[:, :1], wa[:, :1], km, None, k, backend=gpu,
                                         launch={"one": 1})
            check_topk(idx, sc[:, :1], vis[:1], k, f"one launch {mode} {kind} all visible",
                       exact=True)
            # the histograms in a scratch kept across calls: left zeroed by every call
            scratch = mx.zeros((T, ki.SCRATCH_WORDS), mx.uint32)
            for allvis in (False, True, False):
                v = None if allvis else va
                idx = ki.indexer_topk_kernel(qa, wa, km, v, k, backend=gpu,
                                             launch={"one": 1}, scratch=scratch)
                mx.eval(idx)
                check_topk(idx, sc_all if allvis else sc, np.full(T, N, np.int32) if allvis
                           else vis, k, f"one launch {mode} {kind} scratch", exact=True)
                assert not np.array(scratch).any()
            monkeypatch.setattr(ki, "SCORE_SELECT", 1)
            monkeypatch.setattr(ki, "ROW_MAX", 1 << 20)  # (140,000 entries: past the default)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                idx = ki.indexer_topk(qa[:, :1], wa[:, :1], km, None, k)
            assert ki._plans[ki._shape_key(gpu, qa[:, :1], km, k, True)][1] == "one"
            check_topk(idx, sc[:, :1], vis[:1], k, f"dispatch one launch {mode} {kind}",
                       exact=True)


@needs_gpu
def test_gpu_fewer_entries_than_k(gpu):
    rng = np.random.default_rng(4)
    q, w, keys = make_case(rng, 2, 5, 8, 32, 40)
    vis = np.array([0, 1, 20, 39, 40], np.int32)
    a = ki.indexer_topk(mx.array(q), mx.array(w), mx.array(keys), mx.array(vis), 64)
    check_topk(a, ref_scores(q, w, keys), vis, 40, "N < k")


@needs_gpu
@pytest.mark.parametrize("mode", ["fp4", "bf16"])
def test_gpu_no_heads_by_entries_buffer(gpu, mode):
    """Decode at 64K entries, 64 heads: the kernel path allocates far less than one
    [heads x entries] fp32 buffer (16 MiB); the ops path needs several."""
    rng = np.random.default_rng(9)
    B, T, H, D, N, k = 1, 1, 64, 128, 65536, 512
    q = mx.array(rng.standard_normal((B, T, H, D)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array(rng.standard_normal((B, T, H)).astype(np.float32))
    kf = mx.random.normal((B, N, D))
    keys = tuple(mx.quantize(kf, group_size=32, bits=4, mode="mxfp4")) if mode == "fp4" \
        else kf.astype(mx.bfloat16)
    vis = mx.array([N], mx.int32)
    mx.eval(q, w, keys, vis)
    ki.indexer_topk(q, w, keys, vis, k)  # build the kernels first
    mx.eval(ki.indexer_topk(q, w, keys, vis, k))
    hn = H * N * 4
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(ki.indexer_topk_kernel(q, w, keys, vis, k, backend=gpu))
    extra_kernel = mx.get_peak_memory() - base
    mx.reset_peak_memory()
    mx.eval(ki.indexer_topk_ops(q, w, keys, vis, k))
    extra_ops = mx.get_peak_memory() - base
    print(f"\n{mode}: extra peak kernel {extra_kernel / 2**20:.1f} MiB, "
          f"ops {extra_ops / 2**20:.1f} MiB, [H x N] fp32 = {hn / 2**20:.0f} MiB")
    assert extra_kernel < hn / 4
    assert extra_ops >= hn


@needs_gpu
def test_gpu_model_with_indexer_kernels_matches_ops(clean_dispatch):
    """A whole tiny model (fp32, FP4 indexer keys, 16 indexer heads of 32 dims so the
    matrix-unit kernel applies; top-k 3 of up to 8 entries): prefill then decode with the
    indexer kernels against DSV4_INDEXER_KERNEL=ops."""
    from conftest import prefill_then_decode, tiny_config

    from dsv4_mlx.model import Model, ModelArgs
    from dsv4_mlx.random_weights import load_random

    cfg = tiny_config(index_n_heads=16, index_head_dim=32, num_nextn_predict_layers=0)
    ids = mx.array([[(7 * i + 3) % 97 for i in range(34)]])
    mx.set_default_device(mx.gpu)
    try:
        model = load_random(Model(ModelArgs.from_dict(cfg)), seed=3)
        got = prefill_then_decode(model, ids, 26)
        clean_dispatch.setenv(dispatch.ENV_VAR, "ops")
        want = prefill_then_decode(model, ids, 26)
    finally:
        mx.set_default_device(mx.cpu)
    assert np.abs(got - want).max() < 1e-3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_model_layers_keep_their_scratch(monkeypatch):
    """With "scratch" named, each CSA layer's indexer hands the dispatch one zeroed scratch of
    its own a row count, the same one at every decode step (its calls never overlap on the
    GPU); without it, none. The logits do not change (the CPU path never reads it)."""
    from conftest import FLASH_LIKE, prefill_then_decode

    from dsv4_mlx.model import Model, ModelArgs
    from dsv4_mlx.model import indexer as mi
    from dsv4_mlx.random_weights import load_random

    seen = []
    real = mi.indexer_topk

    def spy(*a, scratch=None, **kw):
        seen.append(scratch)
        return real(*a, scratch=scratch, **kw)

    monkeypatch.setattr(mi, "indexer_topk", spy)
    ids = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79]])
    runs = []
    for variants in ("", "scratch"):
        monkeypatch.setenv(ki.VARIANTS_ENV, variants)
        seen.clear()
        model = load_random(Model(ModelArgs.from_dict(dict(FLASH_LIKE))), seed=5)
        runs.append(prefill_then_decode(model, ids, 10))
        assert seen and (all(s is None for s in seen) if not variants else
                         all(s is not None and s.shape[1] == ki.SCRATCH_WORDS for s in seen))
        if variants:  # one array a layer and row count: decode steps reuse their layer's
            decode = [s for s in seen if s.shape[0] == 1]
            csa = sum(1 for r in FLASH_LIKE["compress_ratios"][:FLASH_LIKE["num_hidden_layers"]]
                      if r == 4)
            assert len({id(s) for s in decode}) == csa and not np.array(decode[0]).any()
    np.testing.assert_array_equal(runs[0], runs[1])
