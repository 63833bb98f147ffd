"""Parity of the MLX model with transformers 5.23 `DeepseekV4ForCausalLM` (fp32, CPU).

Logits at every position must agree within ATOL for one-shot prefill, prefill + token-by-
token decode, and chunked prefill with irregular chunk sizes, on a Flash-shaped and a
Pro-shaped tiny config (window-only, CSA and HCA layers, hash and learned routing).
"""

import mlx.core as mx
import numpy as np
import pytest
from conftest import FLASH_LIKE, PRO_LIKE

from dsv4_mlx.cache import LayerCache
from dsv4_mlx.model import Model, ModelArgs
from dsv4_mlx.random_weights import random_weights
from reference import hf_logits, hf_model, hf_mtp_logits

ATOL = 1e-4
SEQ = 45  # CSA: 11 entries > top-k 3; HCA (rate 8): 5 entries; window 6

CONFIGS = {"flash": FLASH_LIKE, "pro": PRO_LIKE}


def _mlx_model(cfg, weights):
    model = Model(ModelArgs.from_dict(cfg))
    model.kv_format = "bf16"  # transformers has no storage rounding (spec §4.13)
    model.load_weights(list(model.sanitize({k: mx.array(v) for k, v in weights.items()}).items()), strict=True)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    cfg = CONFIGS[request.param]
    weights = random_weights(ModelArgs.from_dict(cfg), seed=7)
    ids = np.random.default_rng(3).integers(2, cfg["vocab_size"], (1, SEQ))
    hf = hf_model(cfg, weights)
    ref = hf_logits(hf, ids)
    return dict(name=request.param, cfg=cfg, weights=weights, ids=ids, hf=hf, ref=ref,
                model=_mlx_model(cfg, weights))


def _chunked(model, ids, chunks, cache=None):
    cache = cache if cache is not None else model.make_cache()
    out, p = [], 0
    for c in chunks:
        out.append(np.array(model(mx.array(ids[:, p : p + c]), cache=cache)))
        p += c
    assert p == ids.shape[1]
    return np.concatenate(out, axis=1)


def test_reference_is_sensitive(case):
    """The oracle is not trivially matched: its logits vary and the top-k really drops entries."""
    ref = case["ref"]
    assert ref.std() > 0.3
    assert SEQ // 4 > case["cfg"]["index_topk"]
    # a model that keeps every CSA entry (top-k = all) must disagree with the reference
    wide = _mlx_model(dict(case["cfg"], index_topk=64), case["weights"])
    assert np.abs(np.array(wide(mx.array(case["ids"]))) - ref).max() > 1e-2


def test_one_shot_prefill(case):
    out = np.array(case["model"](mx.array(case["ids"])))
    np.testing.assert_allclose(out, case["ref"], atol=ATOL, rtol=0)


def test_prefill_then_decode(case):
    out = _chunked(case["model"], case["ids"], [13] + [1] * (SEQ - 13))
    np.testing.assert_allclose(out, case["ref"], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "chunks",
    [[5, 3, 1, 1, 7, 1, 1, 9, 1, 8, 4, 4], [1] * SEQ, [2, 30, 13], [7, 7, 7, 7, 7, 10]],
    ids=["irregular", "tokenwise", "2-30-13", "sevens"],
)
def test_chunked_prefill(case, chunks):
    out = _chunked(case["model"], case["ids"], chunks)
    np.testing.assert_allclose(out, case["ref"], atol=ATOL, rtol=0)


def test_batch_of_two_is_exact(case):
    """B = 2 equal-length sequences give the same logits as each alone."""
    model, ids = case["model"], case["ids"]
    other = np.random.default_rng(11).integers(2, case["cfg"]["vocab_size"], ids.shape)
    both = np.concatenate([ids, other])
    out = _chunked(model, both, [9, 1, 1, 20, 14])
    np.testing.assert_allclose(out[:1], case["ref"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out[1:], hf_logits(case["hf"], other), atol=ATOL, rtol=0)


@pytest.mark.parametrize("split", [3, 17, 24, 30])
def test_cache_state_round_trip(case, split, tmp_path):
    """A cache rebuilt from state/meta_state (through a file) continues exactly."""
    model, ids = case["model"], case["ids"]
    cache = model.make_cache()
    first = _chunked(model, ids[:, :split], [split], cache)
    flat, meta = {}, []
    for i, c in enumerate(cache):
        for j, a in enumerate(c.state):
            flat[f"{i}.{j}"] = a
        meta.append((len(c.state), c.meta_state))
    mx.save_safetensors(str(tmp_path / "state.safetensors"), flat)
    loaded = mx.load(str(tmp_path / "state.safetensors"))
    rebuilt = [
        LayerCache.from_state([loaded[f"{i}.{j}"] for j in range(n)], m)
        for i, (n, m) in enumerate(meta)
    ]
    rest = _chunked(model, ids[:, split:], [5, 1, SEQ - split - 6], rebuilt)
    uninterrupted = _chunked(model, ids, [split, 5, 1, SEQ - split - 6])
    np.testing.assert_array_equal(np.concatenate([first, rest], axis=1), uninterrupted)
    np.testing.assert_allclose(uninterrupted, case["ref"], atol=ATOL, rtol=0)


def test_mtp_block_matches_transformers_layer(case):
    """MTP (spec §4.12) against transformers' decoder layer wired as the MTP block."""
    model, ids = case["model"], case["ids"]
    logits, streams = model(mx.array(ids[:, :-1]), return_streams=True)
    next_ids = ids[:, 1:]
    mtp_logits, _ = model.mtp_predict(streams, mx.array(next_ids))
    ref = hf_mtp_logits(case["cfg"], case["weights"], case["hf"], ids[:, :-1], next_ids)
    np.testing.assert_allclose(np.array(mtp_logits), ref, atol=ATOL, rtol=0)
    # and incrementally, with its own window cache
    cache = model.make_mtp_cache()
    parts = [np.array(model.mtp_predict(streams[:, p : p + n], mx.array(next_ids[:, p : p + n]), cache)[0])
             for p, n in ((0, 10), (10, 1), (11, SEQ - 12))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), ref, atol=ATOL, rtol=0)


def test_no_mtp_config_has_no_mtp_weights():
    cfg = dict(FLASH_LIKE, num_nextn_predict_layers=0)
    args = ModelArgs.from_dict(cfg)
    weights = random_weights(args, seed=1)
    assert not any(k.startswith("mtp.") for k in weights)
    model = _mlx_model(cfg, weights)
    assert not hasattr(model, "mtp")
    # an extra mtp.* tensor in the files (e.g. a DSpark stage) is ignored by sanitize
    extra = dict(weights, **{"mtp.0.e_proj.weight": np.zeros((64, 64), np.float32)})
    assert not any(k.startswith("mtp.") for k in model.sanitize({k: mx.array(v) for k, v in extra.items()}))


def test_last_only_logits(case):
    out = np.array(case["model"](mx.array(case["ids"]), last_only=True))
    assert out.shape[1] == 1
    np.testing.assert_allclose(out[:, 0], case["ref"][:, -1], atol=ATOL, rtol=0)
