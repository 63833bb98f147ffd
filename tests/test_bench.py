"""`dsv4 bench` machinery on the tiny model (tiny frontiers: a smoke test of the measurement,
not a timing test)."""

import csv

import mlx.core as mx
import numpy as np
from conftest import FLASH_LIKE

from dsv4_mlx.bench import count_primitives, run_bench, weight_bytes_per_token, write_csv
from dsv4_mlx.cache import restore, snapshot
from dsv4_mlx.model import Model, ModelArgs
from dsv4_mlx.random_weights import load_random


def _model():
    return load_random(Model(ModelArgs.from_dict(dict(FLASH_LIKE, num_nextn_predict_layers=0))), seed=1)


def test_report_and_csv(tmp_path):
    model = _model()
    rep = run_bench(model, None, max_context=64, frontiers=(32, 64), decode_tokens=3, prefill_chunk=20)
    rows = rep["frontiers"]
    assert [r["context"] for r in rows] == [32, 64] and rows[1]["prefill_tokens"] == 32
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows)
    for r in rows:  # the step split and the pipelined loop
        assert r["decode_build_ms"] > 0 and r["decode_eval_ms"] > 0
        assert r["decode_build_ms"] + r["decode_eval_ms"] <= 1000 / r["decode_tok_s"] * 3
        assert r["decode_pipelined_tok_s"] > 0
        # the mean's tok/s against the median and the slowest token
        assert 0 < r["decode_pipelined_ms_median"] <= r["decode_pipelined_ms_max"]
        assert r["decode_pipelined_ms_max"] >= 1000 / r["decode_pipelined_tok_s"]
        assert r["decode_first_pass_s"] > 0
        assert abs(r["bandwidth_fraction_pipelined"] / r["bandwidth_fraction"]
                   - r["decode_pipelined_tok_s"] / r["decode_tok_s"]) < 1e-9
    assert rows[1]["state_bytes"] > rows[0]["state_bytes"] > 0
    assert rep["primitives"]["total"] > len(model.layers)
    write_csv(rep, tmp_path / "b.csv")
    head = next(csv.reader(open(tmp_path / "b.csv")))
    assert {"context", "prefill_tok_s", "decode_tok_s", "state_bytes", "peak_memory_bytes",
            "primitives_per_layer"} <= set(head)
    assert rep["primitives"]["context"] == 64
    assert rep["compiled_decode"] is False  # (auto: compiled with CUDA only)
    assert rep["primitives"]["per_layer"] == rows[-1]["primitives_per_layer"]
    p, L = rep["primitives"], len(model.layers)
    assert 0 < p["embed_and_head"] < p["total"]  # the embedding and the head apart
    assert abs(p["per_block"] * L + p["embed_and_head"] - p["total"]) < 1e-9


def test_timed_probe_repeats_the_first_pass():
    """The timed decode probe and the pipelined one see exactly the tokens (so the shapes) of
    the untimed first pass before them, from the same state: nothing they run is new."""
    model = _model()

    class Recording:
        def __init__(self, m):
            self.m, self.calls = m, []

        def __getattr__(self, name):
            return getattr(self.m, name)

        def __call__(self, inputs, cache=None, **kw):
            if inputs.shape[-1] == 1:
                self.calls.append((int(inputs.reshape(-1)[0].item()), cache[0].offset))
            return self.m(inputs, cache=cache, **kw)

    rec = Recording(model)
    n = 4
    run_bench(rec, None, max_context=32, frontiers=(32,), decode_tokens=n, prefill_chunk=16)
    one_token = list(rec.calls)
    # warm-up steps and the primitive count's step, then the first pass (n + 2 steps), the
    # timed pass (n) and the pipelined loop (n + 2: one step left out, one queued past the end)
    tail = one_token[-(3 * n + 4):]
    first, timed, piped = tail[:n + 2], tail[n + 2:2 * n + 2], tail[2 * n + 2:]
    assert first[0][1] == 32 and [o for _, o in first] == list(range(32, 32 + n + 2))
    assert timed == first[:n]
    assert piped == first


def test_weight_bytes_counts_k_of_e_experts():
    """Every weight once, but k of E routed experts, one embedding row, no MTP."""
    from mlx.utils import tree_flatten

    model = _model()
    a = model.args
    params = dict(tree_flatten(model.parameters()))
    experts = sum(v.nbytes for k, v in params.items() if ".ffn.experts." in k)
    embed = params["embed.weight"].nbytes
    rest = sum(v.nbytes for v in params.values()) - experts - embed
    expect = rest + experts * a.num_experts_per_tok // a.n_routed_experts + embed // a.vocab_size
    assert weight_bytes_per_token(model) == expect
    assert 0 < experts * a.num_experts_per_tok // a.n_routed_experts < experts


def test_probe_restores_state():
    model = _model()
    cache = model.make_cache()
    ids = mx.array([list(range(2, 30))])
    model(ids, cache=cache)
    snap = snapshot(cache)
    count_primitives(model, cache)
    a = np.array(model(mx.array([[7]]), cache=cache))
    cache[:] = restore(snap)
    b = np.array(model(mx.array([[7]]), cache=cache))
    np.testing.assert_array_equal(a, b)


def test_pipelined_probe_times_each_token():
    """mlx-lm's generate_step on our model and cache: one time a generated token, the first
    (which includes the prompt token's step) left out."""
    from dsv4_mlx.bench import pipelined_step_times

    model = _model()
    cache = model.make_cache()
    mx.eval(model(mx.array([list(range(2, 30))]), cache=cache))
    times = pipelined_step_times(model, cache, mx.array(7), 4)
    assert len(times) == 4 and all(t > 0 for t in times)

