"""Invariants of spec §9: Sinkhorn, hash routing, first visibility of compressed entries,
RoPE tables, decode-state accounting."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import FLASH_LIKE, tiny_config

from dsv4_mlx.model import Model, ModelArgs
from dsv4_mlx.model.mhc import hc_params
from dsv4_mlx.model.moe import Gate
from dsv4_mlx.model.rope import inv_freq_plain, inv_freq_yarn
from dsv4_mlx.random_weights import load_random


def test_sinkhorn_rows_and_columns_sum_to_one():
    mx.random.seed(0)
    X = mx.random.normal((2, 7, 4, 16))
    fn = mx.random.normal((24, 64)) * 0.125
    base = mx.random.normal((24,)) * 0.5
    pre, post, comb = hc_params(X, fn, mx.array([1.0, 1.0, 1.0]), base, 4, 20, 1e-6, 1e-6)
    comb = np.array(comb)
    # the last step normalises columns, so they are exact; rows converge over the 20 iterations
    assert np.abs(comb.sum(-2) - 1).max() < 1e-5
    assert np.abs(comb.sum(-1) - 1).max() < 1e-3
    assert (comb > 0).all()
    pre, post = np.array(pre), np.array(post)
    assert (pre > 1e-6).all() and (pre < 1 + 1e-6).all()
    assert (post > 0).all() and (post < 2).all()


def test_sinkhorn_order_matters():
    """Softmax over the last axis, then columns first: a transposed input gives another matrix."""
    mx.random.seed(1)
    X = mx.random.normal((1, 3, 4, 8))
    fn = mx.random.normal((24, 32)) * 0.2
    _, _, comb = hc_params(X, fn, mx.array([1.0, 1.0, 3.0]), mx.zeros((24,)), 4, 20, 1e-6, 1e-6)
    comb = np.array(comb)
    assert np.abs(comb - comb.swapaxes(-1, -2)).max() > 1e-3  # not symmetric: direction matters


def test_hash_layers_pick_tid2eid():
    args = ModelArgs.from_dict(FLASH_LIKE)
    gate = Gate(args, hash_routed=True)
    rng = np.random.default_rng(0)
    table = np.stack([rng.choice(8, 2, replace=False) for _ in range(args.vocab_size)])
    gate.tid2eid = mx.array(table.astype(np.int32))
    gate.weight = mx.random.normal(gate.weight.shape)
    ids = mx.array(rng.integers(0, args.vocab_size, (3, 11)))
    x = mx.random.normal((3, 11, args.hidden_size))
    idx, w = gate(x, ids)
    np.testing.assert_array_equal(np.array(idx), table[np.array(ids)])
    np.testing.assert_allclose(np.array(w).sum(-1), args.routed_scaling_factor, rtol=1e-6)


def test_learned_routing_uses_bias_only_for_selection():
    args = ModelArgs.from_dict(FLASH_LIKE)
    gate = Gate(args, hash_routed=False)
    gate.weight = mx.random.normal(gate.weight.shape) * 0.1
    x = mx.random.normal((1, 5, args.hidden_size))
    gate.bias = mx.zeros((8,))
    idx0, _ = gate(x, None)
    gate.bias = mx.array([100.0, 100.0] + [0.0] * 6)  # forces experts 0 and 1
    idx, w = gate(x, None)
    assert sorted(np.array(idx)[0, 0].tolist()) == [0, 1]
    scores = np.sqrt(np.logaddexp(np.array(x @ gate.weight.T), 0))[0]
    expect = scores[:, [0, 1]] / scores[:, [0, 1]].sum(-1, keepdims=True) * 1.5
    got = np.array(w)[0]
    order = np.argsort(np.array(idx)[0], axis=-1)
    np.testing.assert_allclose(np.take_along_axis(got, order, -1), expect, rtol=1e-5)


@pytest.mark.parametrize("ratio", [4, 8])
def test_compressed_entry_first_visible_at_m_minus_1(ratio):
    """Perturbing the compressor changes logits from position m-1 on, never before."""
    cfg = tiny_config(num_hidden_layers=1, compress_ratios=[ratio, 0], num_hash_layers=0,
                      num_nextn_predict_layers=0)
    model = load_random(Model(ModelArgs.from_dict(cfg)), seed=2)
    ids = mx.array(np.arange(2, 2 + 3 * ratio)[None])
    base = np.array(model(ids))
    comp = model.layers[0].attn.compressor
    # (a pure rescale would vanish in the entry's RMSNorm)
    comp.wkv.weight = comp.wkv.weight + 0.5 * mx.random.normal(comp.wkv.weight.shape, key=mx.random.key(5))
    moved = np.abs(np.array(model(ids)) - base).max(axis=-1)[0]
    assert (moved[: ratio - 1] == 0).all()
    assert (moved[ratio - 1 :] > 1e-3).all()
    cache = model.make_cache()
    for t in range(3 * ratio):
        model(ids[:, t : t + 1], cache=cache)
        assert cache[0].comp.num_entries == (t + 1) // ratio


def test_rope_tables_match_spec():
    yarn = inv_freq_yarn(160000, 64, 16, 65536, 32, 1)
    spec = [1.0, 0.68765604, 0.4728708, 0.32517245, 0.2236068, 0.15376456, 0.10573712,
            0.072710775, 0.05, 0.034382802, 0.02364354, 0.016258623, 0.01118034, 0.007688228,
            0.0052868566, 0.0036355385, 0.0022656249, 0.0013968013, 8.4968971e-4, 5.0808198e-4,
            2.9697779e-4, 1.6817998e-4, 9.0867841e-5, 4.5444231e-5, 1.9531253e-5, 5.3723124e-6,
            3.6943034e-6, 2.5404097e-6, 1.7469282e-6, 1.2012856e-6, 8.260713e-7, 5.6805294e-7]
    np.testing.assert_allclose(yarn, spec, rtol=2e-7)
    plain = inv_freq_plain(10000, 64)
    np.testing.assert_allclose(plain[[0, 1, 2, 3, 4, 31]],
                               [1, 0.7498942, 0.5623413, 0.4216965, 0.3162278, 1.3335215e-4], rtol=1e-6)


@pytest.mark.parametrize("kv_format", ["fp8", "bf16"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_state_bytes_match_layout(dtype, kv_format):
    """`nbytes` of real caches after T tokens equals what `nbytes_at(T)` computes."""
    model = load_random(Model(ModelArgs.from_dict(FLASH_LIKE)), seed=0, dtype=dtype)
    cache = model.make_cache(kv_format)
    ids = mx.array(np.arange(2, 52)[None])
    done = 0
    for n in (13, 1, 1, 17, 18):
        logits = model(ids[:, done : done + n], cache=cache)
        mx.eval(logits)
        done += n
        itemsize = 4 if dtype == mx.float32 else 2
        assert sum(c.nbytes for c in cache) == sum(c.nbytes_at(done, itemsize) for c in cache)
        assert logits.dtype == mx.float32


def test_bf16_weights_run_in_bf16():
    model = load_random(Model(ModelArgs.from_dict(FLASH_LIKE)), seed=0, dtype=mx.bfloat16)
    cache = model.make_cache("bf16")
    model(mx.array([[2, 3, 4, 5, 6, 7, 8, 9, 10]]), cache=cache)
    assert cache[3].ring["kv"].dtype == mx.bfloat16
    assert cache[3].comp.entries.dtype == mx.bfloat16
    assert cache[3].comp.pending_kv.dtype == mx.float32


def test_quantized_grouped_linear_views_follow_the_parameters():
    """`wo_a`'s per-group views are made once and remade when the parameters are replaced;
    they are not parameters themselves."""
    from mlx.utils import tree_flatten

    from dsv4_mlx.model.attention import QuantizedGroupedLinear

    q = QuantizedGroupedLinear(64, 128, 4, 32, 8, "mxfp8")
    x = mx.random.normal((4, 1, 64), key=mx.random.key(0))
    ids = mx.arange(4).astype(mx.uint32)

    def direct():
        split = lambda a: a.reshape(4, -1, a.shape[-1])  # noqa: E731
        return mx.gather_qmm(x, split(q.weight), split(q.scales), None, lhs_indices=ids,
                             rhs_indices=ids, transpose=True, group_size=32, bits=8, mode="mxfp8")

    for seed in (1, 2):
        q.weight, q.scales = mx.quantize(mx.random.normal((128, 64), key=mx.random.key(seed)),
                                         32, 8, mode="mxfp8")
        assert mx.array_equal(q.grouped(x), direct()).item()
    assert sorted(k for k, _ in tree_flatten(q.parameters())) == ["scales", "weight"]


def test_affine_head_scales_loaded_in_fp32():
    """`sanitize` makes an affine-quantized head's scales and biases fp32: the head takes fp32
    input, and bf16 ones would be cast at every step (two nodes) for the same logits."""
    import re
    import tempfile
    from pathlib import Path

    import mlx.nn as nn

    args = ModelArgs.from_dict(tiny_config())
    model = Model(args)
    nn.quantize(model, class_predicate=lambda p, m: {"group_size": 32, "bits": 8, "mode": "affine"}
                if p == "head" else False)
    w = mx.random.normal(model.head.weight.shape[:1] + (args.hidden_size,), key=mx.random.key(3))
    qw, sc, bi = mx.quantize(w.astype(mx.bfloat16), 32, 8, mode="affine")
    y = mx.random.normal((1, 1, args.hidden_size), key=mx.random.key(4)).astype(mx.bfloat16)
    mx.eval(qw, sc, bi, y)
    model.head.weight, model.head.scales, model.head.biases = qw, sc, bi

    def casts(out):
        with tempfile.TemporaryDirectory() as d:
            mx.export_to_dot(str(Path(d) / "g.dot"), out)
            text = (Path(d) / "g.dot").read_text()
        return re.findall(r'label ="([^"]+)", shape=rectangle', text).count("AsType")

    before = model.lm_head(y)
    assert casts(before) == 3  # y, scales and biases cast to fp32

    loaded = model.sanitize({"head.weight": qw, "head.scales": sc, "head.biases": bi})
    assert loaded["head.scales"].dtype == loaded["head.biases"].dtype == mx.float32
    assert loaded["head.weight"].dtype == qw.dtype
    model.load_weights(list(loaded.items()), strict=False)
    mx.eval(model.parameters())  # as mlx-lm's load_model leaves them
    after = model.lm_head(y)
    assert casts(after) == 1  # only y's
    assert mx.array_equal(before, after).item()  # the same promotion, done once
    assert not model.cast_predicate("head.scales") and model.cast_predicate("head.weight")
