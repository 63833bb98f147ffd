"""dsv4_mlx.generate: the Generator (mlx-lm generate_step, sampler, detokenizer) on a tiny
random model with the real V4 vocabulary and tokenizer; cache reuse across turns; stop
conditions; memory preflight."""

import json
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import tiny_config
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from transformers import PreTrainedTokenizerFast

from dsv4_mlx.encoding import encode_messages, tokenizer_files_dir
from dsv4_mlx.generate import (
    GIB,
    ContextError,
    Conversation,
    Generator,
    Reply,
    SamplingConfig,
    generation_defaults,
    memory_preflight,
)
from dsv4_mlx.model import Model, ModelArgs
from dsv4_mlx.model.summary import state_bytes
from dsv4_mlx.random_weights import load_random

GREEDY = SamplingConfig(temperature=0.0)
EOS = 1


@pytest.fixture(scope="module")
def mt():
    cfg = tiny_config(vocab_size=129280, sliding_window=8)
    model = load_random(Model(ModelArgs.from_dict(cfg)), seed=5)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_files_dir()))
    return model, TokenizerWrapper(tok, BPEStreamingDetokenizer, eos_token_ids=[EOS])


def ids_of(tok, messages, **kw):
    return tok.encode(encode_messages(messages, **kw), add_special_tokens=False)


def script(tokens):
    """A logits processor that makes the model emit `tokens` (then whatever it likes)."""
    state = {"i": 0}

    def proc(_history, logits):
        i = state["i"]
        state["i"] += 1
        if i >= len(tokens):
            return logits
        mask = mx.arange(logits.shape[-1]) == tokens[i]
        return mx.where(mask, 0.0, -1e9)[None].astype(logits.dtype)

    return proc


def uncached_greedy(model, ids, n):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1]).item()))
    return seq[len(ids):]


def test_greedy_equals_uncached_loop(mt):
    model, tok = mt
    ids = ids_of(tok, [{"role": "user", "content": "What is the capital of France? " * 2}])
    calls = []
    g = Generator(model, tok, prefill_step_size=5, keep_checkpoint=False)
    r = g.generate(ids, sampling=GREEDY, max_tokens=10, progress=lambda d, t: calls.append((d, t)))
    want = uncached_greedy(model, ids, 10)
    assert r.tokens == want
    assert r.answer == tok.decode(want)  # the streaming detokenizer, chunk by chunk
    s = r.stats
    assert (s.generation_tokens, s.finish_reason, s.prompt_tokens) == (10, "length", len(ids))
    assert s.prefill_tokens == len(ids) and s.reused_tokens == 0
    assert s.context_used == len(ids) + 10 == len(g.tokens) == g.cache[0].offset
    assert s.peak_memory > 0 and s.time_to_first_token > 0 and s.prompt_tps > 0
    # chunked prefill with progress: (0, n), (5, n), (10, n), ... (n, n)
    n = len(ids) - 1
    assert calls[0] == (0, n) and calls[-1] == (n, n) and calls[1] == (5, n)


def test_stops_at_eos_and_splits_reasoning(mt):
    model, tok = mt
    ids = ids_of(tok, [{"role": "user", "content": "2+2?"}], thinking_mode="thinking")
    assert ids[-1] == tok.convert_tokens_to_ids("<think>")
    reasoning = tok.encode("Two and two make four.", add_special_tokens=False)
    answer = tok.encode("It is 4, 四.", add_special_tokens=False)
    forced = reasoning + [tok.convert_tokens_to_ids("</think>")] + answer + [EOS]
    g = Generator(model, tok, keep_checkpoint=False)
    chunks = list(g.stream(ids, sampling=SamplingConfig(temperature=1.0, seed=0), max_tokens=100,
                           logits_processors=[script(forced)]))
    got_r = "".join(c.text for c in chunks if c.kind == "reasoning")
    got_a = "".join(c.text for c in chunks if c.kind == "answer")
    assert (got_r, got_a) == ("Two and two make four.", "It is 4, 四.")
    s = g.last_stats
    assert s.finish_reason == "stop" and s.generation_tokens == len(forced)
    assert s.reasoning_tokens == len(reasoning) + 1
    assert g.tokens == ids + forced  # the EOS went through the model: the next turn follows it
    # chat mode: no split, everything is answer
    ids = ids_of(tok, [{"role": "user", "content": "2+2?"}])
    r = Generator(model, tok).generate(ids, logits_processors=[script(answer + [EOS])])
    assert (r.reasoning, r.answer, r.stats.finish_reason) == ("", "It is 4, 四.", "stop")


def test_seed_reproducible(mt):
    model, tok = mt
    ids = ids_of(tok, [{"role": "user", "content": "Tell me a story."}])
    g = Generator(model, tok)
    runs = [g.generate(ids, sampling=SamplingConfig(temperature=1.0, top_p=0.95, seed=s), max_tokens=5).tokens
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_context_limit(mt):
    model, tok = mt
    ids = ids_of(tok, [{"role": "user", "content": "Hello there"}])
    g = Generator(model, tok, max_context=len(ids) + 3)
    r = g.generate(ids, sampling=GREEDY, max_tokens=50)
    assert r.stats.finish_reason == "context" and r.stats.generation_tokens == 3
    assert r.stats.context_used == r.stats.context_limit == len(ids) + 3
    with pytest.raises(ContextError, match="context"):
        Generator(model, tok, max_context=len(ids)).generate(ids)


def _two_turns(model, tok, thinking, first_reply):
    conv = Conversation(system="Be brief.", thinking=thinking)
    g = Generator(model, tok, prefill_step_size=7)
    p1 = tok.encode(conv.encode("What is 2+2?"), add_special_tokens=False)
    r1 = g.generate(p1, sampling=GREEDY, max_tokens=40, logits_processors=[script(first_reply)])
    assert r1.stats.finish_reason == "stop"
    conv.add_turn("What is 2+2?", r1)
    p2 = tok.encode(conv.encode("And 3+3?"), add_special_tokens=False)
    r2 = g.generate(p2, sampling=GREEDY, max_tokens=6)
    fresh = Generator(model, tok).generate(p2, sampling=GREEDY, max_tokens=6)
    assert r2.tokens == fresh.tokens == uncached_greedy(model, p2, 6)
    return p1, r1, p2, r2


def test_cache_reuse_chat_mode(mt):
    """Chat mode: the next prompt extends what the cache holds; only the new turn is computed."""
    model, tok = mt
    reply = tok.encode("It is 4.", add_special_tokens=False) + [EOS]
    p1, r1, p2, r2 = _two_turns(model, tok, False, reply)
    assert p2[: len(p1) + len(reply)] == p1 + reply
    assert r2.stats.reused_tokens == len(p1) + len(reply)
    assert r2.stats.prefill_tokens == len(p2) - len(p1) - len(reply)


def test_cache_reuse_thinking_dropped(mt):
    """Thinking mode: the previous reasoning is dropped from the next prompt, so the cache is no
    longer a prefix; the Generator goes back to its checkpoint (end of the previous prompt)."""
    model, tok = mt
    reply = (tok.encode("Add them.", add_special_tokens=False) + [tok.convert_tokens_to_ids("</think>")]
             + tok.encode("4", add_special_tokens=False) + [EOS])
    p1, r1, p2, r2 = _two_turns(model, tok, True, reply)
    assert (r1.reasoning, r1.answer) == ("Add them.", "4")
    assert p2[: len(p1) - 1] == p1[:-1] and p2[len(p1) - 1] != p1[-1]  # </think> where <think> was
    assert r2.stats.reused_tokens == len(p1) - 1
    assert r2.stats.prefill_tokens == len(p2) - len(p1) + 1


def test_unrelated_prompt_and_interruptions(mt):
    """A prompt sharing no usable prefix starts over; a reply stopped by should_stop leaves a
    consistent cache; an exception inside a model call is recovered from; results stay exact."""
    model, tok = mt
    g = Generator(model, tok, prefill_step_size=4)
    a = ids_of(tok, [{"role": "user", "content": "First question here"}])
    b = ids_of(tok, [{"role": "user", "content": "Something else entirely"}])
    want_b = uncached_greedy(model, b, 5)
    n = {"k": 0}

    def stop():
        n["k"] += 1
        return n["k"] > 6  # a few prefill chunks, then two tokens

    r = g.generate(a, sampling=GREEDY, max_tokens=50, should_stop=stop)
    assert r.stats.finish_reason == "interrupted" and 0 < r.stats.generation_tokens < 50
    assert g.cache[0].offset == len(g.tokens)
    assert g.generate(b, sampling=GREEDY, max_tokens=5).tokens == want_b

    def boom(_h, logits):
        n["k"] += 1
        if n["k"] == 3:
            raise KeyboardInterrupt
        return logits

    n["k"] = 0
    with pytest.raises(KeyboardInterrupt):
        g.generate(a, sampling=GREEDY, max_tokens=10, logits_processors=[boom])
    assert g.cache[0].offset == len(g.tokens)
    assert g.generate(b, sampling=GREEDY, max_tokens=5).tokens == want_b
    # stopped during prefill: nothing generated, the cache holds a prefix
    g2 = Generator(model, tok, prefill_step_size=2)
    r = g2.generate(b, sampling=GREEDY, should_stop=lambda: len(g2.tokens) >= 4)
    assert r.stats.finish_reason == "interrupted" and r.stats.generation_tokens == 0
    assert g2.tokens == b[:4]
    assert g2.generate(b, sampling=GREEDY, max_tokens=5).tokens == want_b


def test_reply_message_and_conversation():
    conv = Conversation(system="S", thinking=True, max_effort=True)
    conv.add_turn("hi", Reply(reasoning="r", answer="a"))
    text = conv.encode("next")
    assert text.startswith("<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum")
    assert text.endswith("<｜User｜>hi<｜Assistant｜></think>a<｜end▁of▁sentence｜><｜User｜>next<｜Assistant｜><think>")
    assert conv.mode == "think-max"


def test_generation_defaults(tmp_path):
    assert generation_defaults(tmp_path) == SamplingConfig()
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.0}))
    d = generation_defaults(tmp_path)
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.6, 0.9, 20, None)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert generation_defaults(tmp_path).temperature == 0.0


def test_memory_preflight(tmp_path):
    args = ModelArgs.from_dict(json.loads((Path(__file__).parent / "data/configs/v4-flash/config.json").read_text()))
    with open(tmp_path / "model-00001-of-00001.safetensors", "wb") as f:
        f.truncate(150 * GIB)  # a sparse file: the size of a converted Flash
    ok = memory_preflight(tmp_path, args, 131072, budget=(180 * GIB, 192 * GIB, "GPU working set"))
    assert ok.fits and ok.state == state_bytes(args, 131072) > 0 and ok.need < 180 * GIB
    # fits in the Mac's memory but over the GPU's default working set: the sysctl fix
    m = memory_preflight(tmp_path, args, 131072, budget=(145 * GIB, 192 * GIB, "GPU working set"))
    assert not m.fits and "sudo sysctl iogpu.wired_limit_mb=" in m.message
    mb = int(m.message.split("wired_limit_mb=")[1].split("`")[0])
    assert m.need <= mb * 2**20 <= 188 * GIB
    # more than the machine has: a smaller context / recipe / model
    m = memory_preflight(tmp_path, args, 1048576, budget=(96 * GIB, 128 * GIB, "GPU working set"),
                         recipe="mixed-4-8")
    assert not m.fits and "sysctl" not in m.message and "smaller model" in m.message
    m = memory_preflight(tmp_path, args, 4096, budget=(64 * GIB, 64 * GIB, "RAM"), recipe="bf16")
    assert not m.fits and "--recipe mixed-4-8" in m.message
