"""The compiled decode parts (`Block.compile_decode`, `DSV4_COMPILE_DECODE`: the mHC steps,
projections and MoE of a decode step as traced functions): the same logits as the plain
calls, bit for bit, in decode, MTP and after a weight change."""

import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FLASH_LIKE, prefill_then_decode

from dsv4_mlx.model import Model, ModelArgs
from dsv4_mlx.model import model as model_mod
from dsv4_mlx.random_weights import load_random

# MLX's CPU backend compiles fused elementwise kernels with the system's C++ compiler
needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                               reason="no C++ compiler for MLX's CPU compile")
IDS = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50]])


def _model(seed=3, **over):
    return load_random(Model(ModelArgs.from_dict(dict(FLASH_LIKE, **over))), seed=seed)


def test_env_switch(monkeypatch):
    monkeypatch.setenv(model_mod.COMPILE_ENV, "0")
    assert not model_mod.compile_decode_default()
    m = _model(num_hidden_layers=3, compress_ratios=[0, 4, 8, 0])
    assert not any(b.compile_decode for b in m._blocks())
    monkeypatch.setenv(model_mod.COMPILE_ENV, "1")
    m = _model(num_hidden_layers=3, compress_ratios=[0, 4, 8, 0])
    assert all(b.compile_decode for b in m._blocks()) and len(m._blocks()) == 4
    monkeypatch.setenv(model_mod.COMPILE_ENV, "yes")
    with pytest.raises(ValueError, match="expected 0, 1 or auto"):
        model_mod.compile_decode_default()
    # auto: on with the CUDA backend's GPU as the default device, off on the CPU and Metal
    monkeypatch.setenv(model_mod.COMPILE_ENV, "auto")
    from dsv4_mlx.kernels import dispatch
    old = mx.default_device()
    try:
        mx.set_default_device(mx.cpu)
        assert not model_mod.compile_decode_default()
        if "cuda" in dispatch.available_backends() or "metal" in dispatch.available_backends():
            mx.set_default_device(mx.gpu)
            assert model_mod.compile_decode_default() == dispatch.cuda_available()
    finally:
        mx.set_default_device(old)


@needs_cxx
def test_compiled_decode_logits_equal_plain(monkeypatch):
    """Prefill 11 tokens, then 6 one-token steps: the steps after the first run the traced
    decode parts; every logit equals the plain run's, and they really ran compiled."""
    monkeypatch.setenv(model_mod.COMPILE_ENV, "0")
    m = _model()
    want = prefill_then_decode(m, IDS, 11)
    m.set_compile_decode(True)
    got = prefill_then_decode(m, IDS, 11)
    assert all(b.is_compiled() for b in m.layers)
    np.testing.assert_array_equal(got, want)
    # the MTP block's one-token prediction goes through the same compiled path (8 steps: a
    # plain one, the trace, six replays)
    streams = m(IDS[:, :11], return_streams=True)[1]
    outs = {}
    for on in (False, True):
        m.set_compile_decode(on)
        cache = m.make_mtp_cache()
        outs[on] = [np.array(m.mtp_predict(streams[:, i:i + 1], IDS[:, i + 1:i + 2], cache)[0])
                    for i in range(8)]
    assert m.mtp[0].is_compiled()
    np.testing.assert_array_equal(np.stack(outs[True]), np.stack(outs[False]))


@needs_cxx
def test_batched_decode_stays_plain(monkeypatch):
    """Two sequences a step: the plain calls (the traced parts are for one token), the same
    logits as with compile off."""
    monkeypatch.setenv(model_mod.COMPILE_ENV, "0")
    m = _model(seed=4, num_nextn_predict_layers=0)
    ids = mx.concatenate([IDS, IDS[:, ::-1]], axis=0)
    want = prefill_then_decode(m, ids, 11)
    m.set_compile_decode(True)
    got = prefill_then_decode(m, ids, 11)
    assert not any(b.is_compiled() for b in m.layers)
    np.testing.assert_array_equal(got, want)


@needs_cxx
def test_weight_change_drops_the_traced_function(monkeypatch):
    """Weights are constants of the traced function: loading others re-traces it."""
    monkeypatch.setenv(model_mod.COMPILE_ENV, "0")
    m = _model(seed=5, num_nextn_predict_layers=0)
    m.set_compile_decode(True)
    prefill_then_decode(m, IDS, 12)
    assert all(b.is_compiled() for b in m.layers)
    other = _model(seed=6, num_nextn_predict_layers=0)
    want = prefill_then_decode(other, IDS, 12)
    m.load_weights(list(_flat(other.parameters())))
    assert not any(b.is_compiled() for b in m.layers)
    np.testing.assert_array_equal(prefill_then_decode(m, IDS, 12), want)
    # a block's own update drops its functions too, and the next steps use the new weights
    b = m.layers[2]
    assert b.is_compiled()
    b.update({"ffn_norm": {"weight": b.ffn_norm.weight * 2}})
    assert not b.is_compiled()
    got = prefill_then_decode(m, IDS, 12)
    m.set_compile_decode(False)
    np.testing.assert_array_equal(got, prefill_then_decode(m, IDS, 12))
    assert np.abs(got - want).max() > 0  # (the doubled norm weight changed the logits)


def _flat(tree, prefix=""):
    from mlx.utils import tree_flatten

    return tree_flatten(tree, prefix)


GPU_BACKENDS = __import__("dsv4_mlx.kernels.dispatch", fromlist=["x"]).available_backends()


@pytest.mark.skipif(not GPU_BACKENDS, reason="no Metal or CUDA backend in this MLX")
def test_gpu_compiled_decode_logits_equal_plain(monkeypatch, clean_dispatch):
    """On the GPU, with the kernels as dispatched: the compiled decode parts give the plain
    calls' logits (prefill 11, then 6 one-token steps), bit for bit."""
    monkeypatch.setenv(model_mod.COMPILE_ENV, "0")
    old = mx.default_device()
    mx.set_default_device(mx.gpu)
    try:
        m = _model(num_nextn_predict_layers=0)
        want = prefill_then_decode(m, IDS, 11)
        m.set_compile_decode(True)
        got = prefill_then_decode(m, IDS, 11)
        assert all(b.is_compiled() for b in m.layers)
    finally:
        mx.set_default_device(old)
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="no CUDA backend in this MLX")
def test_gpu_device_scalars_logits_equal(monkeypatch, clean_dispatch):
    """`DSV4_DEVICE_SCALARS=1` (the step's position made by a GPU op, [4] in device memory;
    the kernels' small constants copied there) gives the host-made arrays' logits bit for bit
    (the kernels read the leading elements either way), and really makes the [4] arrays."""
    from dsv4_mlx.kernels import dispatch
    old = mx.default_device()
    mx.set_default_device(mx.gpu)
    try:
        outs = {}
        for v in ("0", "1"):
            monkeypatch.setenv(dispatch.DEVICE_SCALARS_ENV, v)
            assert dispatch.position(12345).shape == ((4,) if v == "1" else (1,))
            assert dispatch.vector(0.125).shape == ((4,) if v == "1" else (1,))
            outs[v] = prefill_then_decode(_model(num_nextn_predict_layers=0), IDS, 11)
    finally:
        mx.set_default_device(old)
    np.testing.assert_array_equal(outs["1"], outs["0"])


def test_device_scalars_off_without_cuda(monkeypatch):
    """The variable asks for device-made positions and constants only where CUDA is;
    elsewhere (this CPU, Metal's unified memory) the position stays the host-made [1] array."""
    from dsv4_mlx.kernels import dispatch
    monkeypatch.setenv(dispatch.DEVICE_SCALARS_ENV, "1")
    monkeypatch.setattr(dispatch, "cuda_available", lambda: False)
    monkeypatch.setattr(dispatch, "_device_scalars", {})  # (remembered per value)
    assert not dispatch.device_scalars()
    p = dispatch.position(777)
    assert p.shape == (1,) and p.item() == 777 and dispatch.position(777) is p
    monkeypatch.setattr(dispatch, "cuda_available", lambda: True)
    monkeypatch.setattr(dispatch, "_device_scalars", {})
    assert dispatch.device_scalars()
    # constants of <= 8 bytes: copied once into 16 bytes (here on the CPU stream), the values
    # first; larger ones stay as made; a copy made inside a traced function is a real array
    copy = dispatch._device_copy
    monkeypatch.setattr(dispatch, "_device_copy", lambda a: copy(a, mx.cpu))
    monkeypatch.setattr(dispatch, "_consts", {})
    v = dispatch.vector(0.25, 7.0)
    assert v.shape == (4,) and v.tolist() == [0.25, 7.0, 0.0, 0.0]
    assert dispatch.vector(0.25, 7.0) is v
    assert dispatch.vector(1.0, 2.0, 3.0).shape == (3,)
    inside = {}
    mx.compile(lambda x: inside.setdefault("v", dispatch.vector(5, dtype=mx.int32)) + x)(
        mx.array(1, mx.int32))
    assert inside["v"].tolist() == [5, 0, 0, 0]
    assert dispatch.vector(5, dtype=mx.int32) is inside["v"]
    monkeypatch.setenv(dispatch.DEVICE_SCALARS_ENV, "0")
    assert not dispatch.device_scalars()
    assert dispatch.vector(0.25, 7.0).shape == (2,)


@needs_cxx
def test_dispatch_change_traces_again(monkeypatch):
    """The kernel dispatch reads DSV4_* variables while tracing: a step under another setting
    (as `dsv4 check` and the GPU tests make on one model) gets its own traced functions."""
    monkeypatch.setenv(model_mod.COMPILE_ENV, "0")
    monkeypatch.delenv("DSV4_ATTN_KERNEL", raising=False)
    m = _model(seed=7, num_nextn_predict_layers=0)
    m.set_compile_decode(True)
    a = prefill_then_decode(m, IDS, 12)
    assert all(len(b.__dict__["_compiled"]) == 1 for b in m.layers)
    monkeypatch.setenv("DSV4_ATTN_KERNEL", "ops")
    b = prefill_then_decode(m, IDS, 12)
    assert all(len(blk.__dict__["_compiled"]) == 2 for blk in m.layers)
    np.testing.assert_array_equal(a, b)  # (the CPU runs the ops path either way)
    assert ("DSV4_ATTN_KERNEL", "ops") in model_mod.dispatch_key()[2]
    # a dispatch reset (or a kernel found broken) is another configuration too
    from dsv4_mlx.kernels import dispatch
    before = model_mod.dispatch_key()
    dispatch.reset()
    assert model_mod.dispatch_key() != before
