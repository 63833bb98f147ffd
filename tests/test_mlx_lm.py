"""mlx-lm drives the model: stream_generate with its cache handling, sampler and detokenizer,
on a tiny random model with the real V4 vocabulary and tokenizer."""

import mlx.core as mx
import pytest
from conftest import tiny_config
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from transformers import AutoTokenizer

from dsv4_mlx.encoding import encode_messages, tokenizer_files_dir
from dsv4_mlx.model import Model, ModelArgs
from dsv4_mlx.random_weights import load_random


@pytest.fixture(scope="module")
def model_and_tokenizer():
    cfg = tiny_config(vocab_size=129280, sliding_window=8)
    model = load_random(Model(ModelArgs.from_dict(cfg)), seed=5)
    tok = TokenizerWrapper(AutoTokenizer.from_pretrained(str(tokenizer_files_dir())))
    return model, tok


def test_stream_generate_matches_uncached_greedy(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = encode_messages([{"role": "user", "content": "What is the capital of France? " * 3}])
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == 0 and ids.count(0) == 1  # BOS comes from the string, once
    n = 12
    # prefill_step_size 7: mlx-lm prefills in irregular chunks, then decodes token by token
    out = list(stream_generate(model, tok, ids, max_tokens=n, sampler=make_sampler(temp=0.0),
                               prefill_step_size=7))
    got = [r.token for r in out]
    seq = list(ids)
    for _ in range(n):
        logits = model(mx.array([seq]))
        seq.append(int(mx.argmax(logits[0, -1]).item()))
    assert got == seq[len(ids):]
    assert out[-1].generation_tokens == n
    assert "".join(r.text for r in out) == tok.decode(got)
