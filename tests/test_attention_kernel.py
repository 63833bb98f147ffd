"""One-query attention with sinks over the stored KV (`kernels.attention`, spec §4.8).

On any machine: the body compiled as C++ with the CPU-emulation dialect and run against an
fp64 reference (FP8 and plain stored KV, dense and sparse compressed keys, unwritten ring
slots, missing picks); the Metal source compiled as C++ against the stand-in <metal_stdlib>;
the CUDA source with nvcc where there is one; the dispatch. On a GPU: the kernel against the
reference and the ops path, and a whole model with the kernel against ``DSV4_ATTN_KERNEL=ops``.
"""

from __future__ import annotations

import contextlib
import re

import mlx.core as mx
import numpy as np
import pytest
from test_indexer_kernel import CXX, NVCC, assert_metal_compiles, assert_nvcc_compiles

from dsv4_mlx.kernels import attention as ka
from dsv4_mlx.kernels import attention_source as src
from dsv4_mlx.kernels import dispatch
from dsv4_mlx.model.attention import sink_attention
from dsv4_mlx.model.kv_formats import FP8KVCodec, PlainCodec
from dsv4_mlx.model.rope import RoPE, inv_freq_yarn

# fp32 kernel vs fp64 reference: summation order only
RTOL, ATOL = 2e-5, 2e-6


def _codec(mode, C, R):
    return FP8KVCodec(C, R) if mode == "fp8" else PlainCodec(C)


def _stored(codec, x):
    """Stored parts (numpy) of values x [B, n, C] and the values they decode to (float64)."""
    parts = codec.encode(mx.array(x))
    dec = codec.decode(parts)
    return {k: np.array(v) for k, v in parts.items()}, np.array(dec.astype(mx.float32)).astype(np.float64)


def _reference(q, ring, nring, comp, ncomp, idx, sinks, scale):
    """fp64: q [B, H, C]; ring [B, W, C]; comp [B, CAP, C] decoded; idx [B, k] or None."""
    B, H, C = q.shape
    out = np.zeros((B, H, C))
    for b in range(B):
        keys = [ring[b, :nring]]
        if comp is not None:
            keys.append(comp[b, :ncomp] if idx is None else comp[b, idx[b][idx[b] >= 0]])
        K = np.concatenate(keys)
        for h in range(H):
            lg = K @ q[b, h].astype(np.float64) * scale
            m = max(lg.max(initial=-np.inf), sinks[h])
            p = np.exp(lg - m)
            out[b, h] = p @ K / (p.sum() + np.exp(sinks[h] - m))
    return out


def _case(seed, mode, B, H, C, R, W, nring, CAP, ncomp, sparse, k=0, sharp=1.0):
    rng = np.random.default_rng(seed)
    codec = _codec(mode, C, R)
    ring_parts, ring = _stored(codec, (rng.standard_normal((B, W, C)) * sharp).astype(np.float32))
    comp_parts = comp = idx = None
    if CAP:
        comp_parts, comp = _stored(codec, (rng.standard_normal((B, CAP, C)) * sharp).astype(np.float32))
    if sparse:
        idx = np.stack([rng.permutation(CAP)[:k] for _ in range(B)]).astype(np.int32)
        idx[:, ::3] = -1  # missing picks
        ncomp = k
    q = (rng.standard_normal((B, H, C)) * sharp).astype(np.float32)
    sinks = rng.standard_normal(H).astype(np.float32)
    return codec, q, ring_parts, ring, nring, comp_parts, comp, ncomp, idx, sinks


CASES = [  # mode, B, H, C, R, W, nring, CAP, ncomp, sparse, k
    ("fp8", 1, 3, 512, 64, 128, 128, 256, 100, False, 0),   # Flash dims, dense (HCA)
    ("fp8", 2, 3, 128, 32, 16, 5, 40, 0, True, 9),          # sparse picks, ring not yet full
    ("fp8", 1, 2, 512, 64, 128, 128, 64, 0, True, 64),      # sparse, a full tile of picks
    ("plain", 1, 2, 64, 8, 8, 8, 0, 0, False, 0),            # window-only layer
    ("plain", 2, 2, 40, 8, 6, 6, 20, 0, True, 7),            # C not a multiple of 4 x 32
    ("plain", 1, 4, 32, 8, 6, 3, 12, 11, False, 0),          # dense, ring partly written
    ("fp8", 1, 11, 128, 32, 16, 16, 48, 0, True, 20),       # heads not a multiple of HG
]


def _emu_run(emu, mode, q, ring_parts, nring, comp_parts, ncomp, idx, sinks, scale, codec,
             spl=None, tg=ka.TG, hg=ka.HG, ku=ka.KU, rope=None, pos=0, pf=ka.PF):
    """Both kernels, emulated: the splits' partials, then their combination (with the
    inverse of `rope` at `pos`, if given)."""
    B, H, C = q.shape
    arr = lambda parts: [parts["kv"]] if mode == "plain" else \
        [parts["nope"], parts["scale"], parts["rope"]]  # noqa: E731
    ring_a = arr(ring_parts)
    W = ring_a[0].shape[1]
    comp_a = arr(comp_parts) if comp_parts is not None else ring_a
    sparse = idx is not None
    ncomp = idx.shape[-1] if sparse else (ncomp if comp_parts is not None else 0)
    nope, block = (codec.nope, codec.block) if mode == "fp8" else (0, 1)
    spl = spl or ka.SPL
    S = -(-(W + ncomp) // spl)
    NG = -(-H // hg)
    pm, pl, pacc = emu.run(
        src.decode_source("cpp", mode),
        [q, *ring_a, *comp_a, idx if sparse else np.zeros(1, np.int32),
         np.array([nring, ncomp], np.int32), np.array([scale], np.float32)],
        [(B, H, S), (B, H, S), (B, H, S, C)], ["float32"] * 3,
        [("QT", "float32"), ("KV", "float32"), ("C", C), ("NOPE", nope), ("BLK", block),
         ("W", W), ("TG", tg), ("HG", hg), ("SPL", spl), ("KU", ku),
         ("SPARSE", sparse), ("PF", pf)],
        (NG * S * tg, B, 1), tg)
    invf = np.zeros(1, np.float32) if rope is None else np.array(rope.inv_freq_f32())
    (o,) = emu.run(src.combine_source("cpp"),
                   [pm, pl, pacc, sinks, invf, np.array([pos], np.int32)], [(B, H, C)],
                   ["float32"],
                   [("QT", "float32"), ("C", C), ("TG", ka.COMBINE_TG),
                    ("RD", 0 if rope is None else rope.dims)],
                   (H * ka.COMBINE_TG, B, 1), ka.COMBINE_TG)
    return o


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_emulated_kernel_matches_reference(emu, case):
    mode, B, H, C, R, W, nring, CAP, ncomp, sparse, k = case
    codec, q, rp, ring, nring, cp, comp, ncomp, idx, sinks = _case(len(CASES) + C, *case)
    scale = C ** -0.5
    got = _emu_run(emu, mode, q, rp, nring, cp, ncomp, idx, sinks, scale, codec)
    want = _reference(q, ring, nring, comp, ncomp, idx, sinks, scale)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case,rd,pos", [(CASES[0], 64, 70000), (CASES[1], 32, 5),
                                          (CASES[4], 8, 123)], ids=["flash", "sparse", "C40"])
def test_emulated_kernel_with_inverse_rope(emu, case, rd, pos):
    """The combining kernel's inverse RoPE (the attention output's, at the query position)
    against the reference output through `mx.fast.rope(inverse)` as the ops path applies it."""
    mode, B, H, C, R, W, nring, CAP, ncomp, sparse, k = case
    codec, q, rp, ring, nring, cp, comp, ncomp, idx, sinks = _case(3 + C, *case)
    scale = C ** -0.5
    rope = RoPE(inv_freq_yarn(160000.0, rd, 16.0, 65536, 32, 1), rd)
    got = _emu_run(emu, mode, q, rp, nring, cp, ncomp, idx, sinks, scale, codec, rope=rope,
                   pos=pos)
    ref = _reference(q, ring, nring, comp, ncomp, idx, sinks, scale).astype(np.float32)
    want = np.array(rope(mx.array(ref)[:, :, None], offset=pos, inverse=True))[:, :, 0]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # not vacuous: the forward rotation (or none) is caught; the leading dims are untouched
    fwd = np.array(rope(mx.array(ref)[:, :, None], offset=pos))[:, :, 0]
    assert np.abs(got - fwd).max() > 100 * ATOL
    np.testing.assert_allclose(got[..., :C - rd], ref[..., :C - rd], rtol=RTOL, atol=ATOL)
    assert np.abs(got[..., C - rd:] - ref[..., C - rd:]).max() > 100 * ATOL


def test_emulated_kernel_small_splits(emu):
    """Many splits of 4 keys, one of them all missing picks (its partials: -inf, 0)."""
    case = ("fp8", 1, 3, 128, 32, 8, 8, 40, 0, True, 12)
    codec, q, rp, ring, nring, cp, comp, ncomp, idx, sinks = _case(6, *case)
    idx[0, 4:8] = -1
    got = _emu_run(emu, "fp8", q, rp, nring, cp, ncomp, idx, sinks, 0.2, codec, spl=4)
    want = _reference(q, ring, nring, comp, ncomp, idx, sinks, 0.2)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_shared_memory_fits():
    """The split kernel's shared memory at Flash / Pro head dims fits Metal's 32 KiB."""
    assert ka.shared_bytes(512) <= 32768
    assert ka.TG % 32 == 0
    for tg, hg, spl in ((32, 8, 64), (256, 8, 256), (1024, 4, 64)):
        assert ka.shared_bytes(512, tg, hg, spl) <= 32768


@pytest.mark.parametrize("pf", [0, 1])
@pytest.mark.parametrize("tg,hg,spl,ku", [(32, 1, 64, 1), (64, 2, 5, 2), (128, 8, 7, 4),
                                          (256, 3, 64, 3), (64, 4, 32, 8), (128, 2, 64, 1)])
@pytest.mark.parametrize("mode", ["fp8", "plain"])
def test_emulated_kernel_launch_variants(emu, mode, tg, hg, spl, ku, pf):
    """Other warp counts, head groups (not dividing H) and split sizes (not multiples of the
    warp count: warps without keys, splits without keys) give the same output, with and
    without the next round's loads issued early (PF); plain: C = 40, lanes past C."""
    case = ((mode, 2, 5, 128, 32, 16, 11, 40, 0, True, 17) if mode == "fp8"
            else (mode, 2, 5, 40, 8, 16, 11, 40, 0, True, 17))
    codec, q, rp, ring, nring, cp, comp, ncomp, idx, sinks = _case(7, *case)
    idx[1, :9] = -1
    got = _emu_run(emu, mode, q, rp, nring, cp, ncomp, idx, sinks, 0.2, codec, spl=spl, tg=tg,
                   hg=hg, ku=ku, pf=pf)
    want = _reference(q, ring, nring, comp, ncomp, idx, sinks, 0.2)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_emulated_kernel_sharp_logits_and_dominant_sink(emu):
    """Logits in the hundreds (the running max matters), then a sink far above every logit
    (the output shrinks towards 0)."""
    case = ("fp8", 1, 2, 128, 32, 16, 16, 80, 70, False, 0)
    codec, q, rp, ring, nring, cp, comp, ncomp, idx, sinks = _case(3, *case, sharp=4.0)
    got = _emu_run(emu, "fp8", q, rp, nring, cp, ncomp, idx, sinks, 1.0, codec)
    want = _reference(q, ring, nring, comp, ncomp, idx, sinks, 1.0)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * 10)
    sinks = np.full_like(sinks, 60.0)
    codec, q, rp, ring, nring, cp, comp, ncomp, idx, _ = _case(4, *case)
    got = _emu_run(emu, "fp8", q, rp, nring, cp, ncomp, idx, sinks, 128 ** -0.5, codec)
    want = _reference(q, ring, nring, comp, ncomp, idx, sinks, 128 ** -0.5)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-12)
    assert np.abs(got).max() < 1e-20


def test_emulated_kernel_can_fail(emu):
    """The comparison is not vacuous: a kernel that ignores the sink differs."""
    case = CASES[1]
    codec, q, rp, ring, nring, cp, comp, ncomp, idx, sinks = _case(5, *case)
    got = _emu_run(emu, "fp8", q, rp, nring, cp, ncomp, idx, sinks, 0.1, codec)
    want = _reference(q, ring, nring, comp, ncomp, idx, np.full_like(sinks, -np.inf), 0.1)
    assert np.abs(got - want).max() > 1e-3


# --------------------------------------------------------------------------------------------
# Metal and CUDA sources

_DT = [("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16"), ("bfloat16", "float32")]


def _launch(dialect, mode, qt, kv, sparse, pf=ka.PF):
    """[(source, inputs, output dtypes, template)] of both kernels at Flash sizes (H 64,
    C 512, W 128, 10 splits)."""
    parts = ([("uint8", 3, 128 * 448), ("uint8", 3, 128 * 7), (kv, 3, 128 * 64)] if mode == "fp8"
             else [(kv, 3, 128 * 512)])
    comp = [(dt, nd, n * 4) for dt, nd, n in parts]
    inputs = [(qt, 4, 64 * 512), *parts, *comp, ("int32", 2, 512) if sparse else ("int32", 1, 1),
              ("int32", 1, 2), ("float32", 1, 1)]
    tmpl = [("QT", qt), ("KV", kv), ("C", 512), ("NOPE", 448), ("BLK", 64), ("W", 128),
            ("TG", ka.TG), ("HG", ka.HG), ("SPL", ka.SPL), ("KU", ka.KU),
            ("SPARSE", sparse), ("PF", pf)]
    part = [("float32", 3, 640), ("float32", 3, 640), ("float32", 4, 640 * 512), ("float32", 1, 64),
            ("float32", 1, 32), ("int32", 1, 1)]
    return [(src.decode_source(dialect, mode), inputs, ["float32"] * 3, tmpl),
            *[(src.combine_source(dialect), part, [qt],
               [("QT", qt), ("C", 512), ("TG", ka.COMBINE_TG), ("RD", rd)]) for rd in (0, 64)]]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("mode", src.KV_MODES)
@pytest.mark.parametrize("qt,kv", _DT)
@pytest.mark.parametrize("sparse", [False, True])
def test_metal_source_compiles_as_cpp(mode, qt, kv, sparse, tmp_path):
    for i, launch in enumerate(_launch("metal", mode, qt, kv, sparse)
                               + _launch("metal", mode, qt, kv, sparse, 1 - ka.PF)[:1]):
        code = assert_metal_compiles(launch, tmp_path, f"attn{i}_{mode}_{qt}_{kv}_{sparse}")
        assert "[[threadgroup_position_in_grid]]" in code


def test_body_stays_in_the_common_subset():
    for ks in [src.decode_source("metal", m) for m in src.KV_MODES] + [src.combine_source("metal")]:
        body = ks.source
        for bad in (r"\bdouble\b", r"\bprintf\b", r"\bstd::", r"__syncthreads", r"threadIdx",
                    r"simd_", r"__shfl"):
            assert not re.search(bad, body), bad
        for n in ks.input_names:
            assert not re.search(rf"\*\s*\w+\s*=\s*{n}\b", body), n


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("mode", src.KV_MODES)
def test_cuda_source_compiles_with_nvcc(mode, tmp_path):
    for sparse in (False, True):
        for i, launch in enumerate(_launch("cuda", mode, "bfloat16", "bfloat16", sparse)
                                   + _launch("cuda", mode, "bfloat16", "bfloat16", sparse,
                                             1 - ka.PF)[:1]):
            assert_nvcc_compiles(launch, tmp_path, f"attn{i}_{sparse}")


# --------------------------------------------------------------------------------------------
# dispatch


def test_per_call_host_arrays_fit_the_small_block_pool(monkeypatch):
    """The only input made on the host at every call (meta: ring fill, compressed count) is at
    most 8 bytes: MLX's CUDA allocator keeps those in a pool the GPU reads in place, while a
    larger host array migrates its page to the GPU at each use (~100 us a call measured under
    Nsight Compute on an H100; see the kernel's note)."""
    seen = []

    def fake_build(backend, ks):
        def run(*, inputs, output_shapes, output_dtypes, **kw):
            seen.append((ks.name, inputs))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return run

    monkeypatch.setattr(dispatch, "build_kernel", fake_build)
    monkeypatch.setattr(mx, "stream", lambda *_: contextlib.nullcontext())  # no GPU needed
    codec = FP8KVCodec(512, 64)
    ring = codec.encode(mx.zeros((1, 128, 512)))
    for idx in (None, mx.zeros((1, 512), mx.int32)):
        seen.clear()
        ka.sink_decode_kernel(mx.zeros((1, 64, 1, 512)), ring, 100, ring, 64, idx, mx.zeros((64,)),
                              0.1, mode="fp8", nope=448, block=64, backend="cuda")
        name, inputs = seen[0]
        meta = inputs[-2]
        assert name.startswith("dsv4_sink_decode") and meta.dtype == mx.int32
        assert meta.nbytes <= 8 and meta.tolist() == [100, 64 if idx is None else 512]


def test_cpu_uses_ops(clean_dispatch):
    assert ka.kernel_backend(mx.zeros((1, 2, 1, 64)), FP8KVCodec(64, 8)) == "ops"


def test_many_dense_keys_use_ops(clean_dispatch, monkeypatch):
    """Past MAX_COMPRESSED_KEYS the ops path serves (measured faster there), GPU or not."""
    monkeypatch.setattr(dispatch, "select_backend", lambda env=None, default="auto": "ops" if default == "ops" else "cuda")
    monkeypatch.setattr(dispatch, "kernel_usable", lambda key, probe, what: True)
    q, codec = mx.zeros((1, 2, 1, 64)), FP8KVCodec(64, 8)
    assert ka.kernel_backend(q, codec, ka.MAX_COMPRESSED_KEYS) == "cuda"
    assert ka.kernel_backend(q, codec, ka.MAX_COMPRESSED_KEYS + 1) == "ops"


def test_dims_not_in_fours_use_ops(clean_dispatch, monkeypatch):
    """The kernel loads 4 dims at a time: C (and for FP8, the non-RoPE dims and the scale
    block) must be multiples of 4; the plain format has no such parts and takes the kernel."""
    monkeypatch.setattr(dispatch, "select_backend", lambda env=None, default="auto": "ops" if default == "ops" else "cuda")
    monkeypatch.setattr(dispatch, "kernel_usable", lambda key, probe, what: True)
    assert ka.kernel_backend(mx.zeros((1, 2, 1, 64)), PlainCodec(64)) == "cuda"
    assert ka.kernel_backend(mx.zeros((1, 2, 1, 64)), FP8KVCodec(64, 8)) == "cuda"
    assert ka.kernel_backend(mx.zeros((1, 2, 1, 66)), PlainCodec(66)) == "ops"
    assert ka.kernel_backend(mx.zeros((1, 2, 1, 66)), FP8KVCodec(66, 8)) == "ops"  # 58 non-RoPE


def test_env_var_validated(clean_dispatch):
    clean_dispatch.setenv(ka.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=ka.ENV_VAR):
        ka.kernel_backend(mx.zeros((1, 2, 1, 64)), FP8KVCodec(64, 8))


# --------------------------------------------------------------------------------------------
# on a GPU

GPU = dispatch.available_backends()
needs_gpu = pytest.mark.skipif(not GPU, reason="no Metal or CUDA backend in this MLX")


def _ops_path(codec, q, ring_parts, nring, comp_parts, ncomp, idx, sinks, scale):
    """What the model's ops path computes: decode, gather, concatenate, fused SDPA."""
    keys = codec.decode(ring_parts)
    W = keys.shape[1]
    extra = None
    if comp_parts is not None and idx is None and ncomp:
        extra = codec.decode({k: v[:, :ncomp] for k, v in comp_parts.items()})
    elif idx is not None:
        safe = mx.maximum(idx, 0)
        extra = codec.decode({k: mx.take_along_axis(v, safe.reshape(*safe.shape, *([1] * (v.ndim - 2))),
                                                    axis=1) for k, v in comp_parts.items()})
    m = np.arange(W + (0 if extra is None else extra.shape[1])) < nring
    m[W:] = True
    if idx is not None:
        m = np.broadcast_to(m, (idx.shape[0], m.size)).copy()
        m[:, W:] = np.array(idx) >= 0
        mask = mx.array(m[:, None, None])
    else:
        mask = mx.array(m[None])
    if extra is not None:
        keys = mx.concatenate([keys, extra], axis=1)
    return sink_attention(q, keys, mask, sinks, scale)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_kernel_matches_reference_and_ops(clean_dispatch, dtype, case):
    mode, B, H, C, R, W, nring, CAP, ncomp, sparse, k = case
    dt = getattr(mx, dtype)
    rng = np.random.default_rng(C + H)
    codec = _codec(mode, C, R)
    with mx.stream(mx.gpu):
        ring_x = mx.array(rng.standard_normal((B, W, C)).astype(np.float32)).astype(dt)
        rp = codec.encode(ring_x)
        ring = np.array(codec.decode(rp).astype(mx.float32)).astype(np.float64)
        cp = comp = idx = None
        if CAP:
            cp = codec.encode(mx.array(rng.standard_normal((B, CAP, C)).astype(np.float32)).astype(dt))
            comp = np.array(codec.decode(cp).astype(mx.float32)).astype(np.float64)
        if sparse:
            idx_np = np.stack([rng.permutation(CAP)[:k] for _ in range(B)]).astype(np.int32)
            idx_np[:, ::3] = -1
            idx, ncomp = mx.array(idx_np), k
        q = mx.array(rng.standard_normal((B, H, 1, C)).astype(np.float32)).astype(dt)
        sinks = mx.array(rng.standard_normal(H).astype(np.float32))
        scale = C ** -0.5
        got = ka.sink_decode(q, rp, nring, cp, ncomp, idx, sinks, scale, codec, GPU[0])
        ops = _ops_path(codec, q, rp, nring, cp, ncomp, idx, sinks, scale)
        # with the inverse RoPE in the combining kernel: the output through mx.fast.rope
        rope = RoPE(inv_freq_yarn(160000.0, R, 16.0, 65536, 32, 1), R)
        rot = ka.sink_decode(q, rp, nring, cp, ncomp, idx, sinks, scale, codec, GPU[0],
                             rope=rope, offset=777)
        # the other PF choice (the next round's loads early): the same values summed in the
        # same order, so the same bits
        other = ka.sink_decode(q, rp, nring, cp, ncomp, idx, sinks, scale, codec, GPU[0],
                               pf=1 - ka.PF)
        np.testing.assert_array_equal(np.array(other.astype(mx.float32)),
                                      np.array(got.astype(mx.float32)))
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(np.array(rot.astype(mx.float32)),
                                   np.array(rope(got, offset=777, inverse=True).astype(mx.float32)),
                                   **tol)
        got, ops = (np.array(a.astype(mx.float32))[:, :, 0] for a in (got, ops))
    want = _reference(np.array(q.astype(mx.float32))[:, :, 0], ring, nring, comp, ncomp,
                      None if idx is None else np.array(idx), np.array(sinks), scale)
    if dtype == "float32":
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ops, want, rtol=1e-4, atol=1e-5)
    else:  # the kernel rounds once (its output); the ops path rounds logits and weights too
        np.testing.assert_allclose(got, want, rtol=8e-3, atol=8e-3)
        assert np.abs(got - want).max() <= np.abs(ops - want).max() + 1e-3


@needs_gpu
@pytest.mark.parametrize("kv_format", ["fp8", "bf16"])
def test_gpu_model_with_attention_kernel_matches_ops(clean_dispatch, kv_format):
    """A whole tiny model (fp32; window 6, top-k 3 of up to 8 CSA entries, HCA rate 8):
    prefill then decode with the decode-attention kernel against DSV4_ATTN_KERNEL=ops."""
    from conftest import prefill_then_decode, tiny_config

    from dsv4_mlx.model import Model, ModelArgs
    from dsv4_mlx.random_weights import load_random

    cfg = tiny_config(num_nextn_predict_layers=0)
    ids = mx.array([[(5 * i + 2) % 97 for i in range(34)]])
    mx.set_default_device(mx.gpu)
    try:
        model = load_random(Model(ModelArgs.from_dict(cfg)), seed=4)
        model.kv_format = kv_format
        got = prefill_then_decode(model, ids, 3)
        clean_dispatch.setenv(ka.ENV_VAR, "ops")
        want = prefill_then_decode(model, ids, 3)
    finally:
        mx.set_default_device(mx.cpu)
    assert np.abs(got - want).max() < 1e-3


def test_ring_and_compressed_keys_share_dtypes():
    """The kernel reads a key through one pointer type whichever set it is in: stored sets of
    different dtypes are refused with a clear error, before any launch."""
    q = mx.zeros((1, 2, 1, 8), mx.bfloat16)
    ring = {"kv": mx.zeros((1, 4, 8), mx.bfloat16)}
    comp = {"kv": mx.zeros((1, 4, 8), mx.float32)}
    with pytest.raises(ValueError, match="same dtypes"):
        ka.sink_decode_kernel(q, ring, 4, comp, 2, None, mx.zeros((2,)), 0.3, mode="plain",
                              nope=0, block=1, backend="cuda")
