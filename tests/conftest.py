import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

mx.set_default_device(mx.cpu)


@pytest.fixture
def clean_dispatch(monkeypatch):
    """Kernel dispatch with no override variables and no remembered probes (yields monkeypatch)."""
    from dsv4_mlx.kernels import (attention, dispatch, embed, fp4_round, gemv, kv_store, mhc,
                                  norm_rope, qgemv, router, swiglu)

    dispatch.reset()
    for var in (dispatch.ENV_VAR, mhc.ENV_VAR, attention.ENV_VAR, router.ENV_VAR, kv_store.ENV_VAR,
                fp4_round.ENV_VAR, gemv.ENV_VAR, norm_rope.ENV_VAR, swiglu.ENV_VAR, embed.ENV_VAR,
                qgemv.ENV_VAR, qgemv.MX_ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    yield monkeypatch
    dispatch.reset()


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """A DSV4_HOME holding the built-in demo model, built once per test run: (root, folder)."""
    from dsv4_mlx import generate as G

    root = tmp_path_factory.mktemp("dsv4home")
    old = os.environ.get("DSV4_HOME")
    os.environ["DSV4_HOME"] = str(root)
    try:
        yield root, G.ensure_demo_model()
    finally:
        if old is None:
            os.environ.pop("DSV4_HOME", None)
        else:
            os.environ["DSV4_HOME"] = old

YARN = dict(type="yarn", factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1)


def tiny_config(**over):
    """A tiny DeepSeek-V4 config with the published keys.

    Default: Flash-shaped (two window-only layers first, then CSA/HCA alternating, MTP last),
    HCA rate 8 so short sequences emit several HCA entries, 8 indexer heads (fewer make exact-
    zero score ties, spec §4.7), top-k 3 so the indexer really drops entries.
    """
    cfg = dict(
        model_type="deepseek_v4", vocab_size=97, hidden_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, qk_rope_head_dim=8,
        q_lora_rank=24, o_groups=2, o_lora_rank=16, sliding_window=6,
        compress_ratios=[0, 0, 4, 8, 4, 8, 0], index_n_heads=8, index_head_dim=16, index_topk=3,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
        num_hash_layers=3, num_nextn_predict_layers=1, rope_theta=10000.0,
        compress_rope_theta=160000.0, rope_scaling=dict(YARN), max_position_embeddings=1048576,
        routed_scaling_factor=1.5, scoring_func="sqrtsoftplus", norm_topk_prob=True,
        swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
        bos_token_id=0, eos_token_id=1,
    )
    cfg.update(over)
    return cfg


FLASH_LIKE = tiny_config()
# Pro-shaped: HCA first, no window-only layers; routed scale 2.5; a low SwiGLU limit so the
# clamp of routed and shared experts really triggers.
PRO_LIKE = tiny_config(
    num_hidden_layers=5, compress_ratios=[8, 8, 4, 8, 4, 0], routed_scaling_factor=2.5,
    swiglu_limit=0.5, num_attention_heads=8, o_groups=4,
)


def prefill_then_decode(model, ids, n_prefill: int):
    """Logits [B, L, V] (numpy) of `ids` fed as one prefill of `n_prefill` tokens, then one
    decode step a token, through one fresh cache."""
    import numpy as np

    cache = model.make_cache()
    a = model(ids[:, :n_prefill], cache=cache)
    b = [model(ids[:, i:i + 1], cache=cache) for i in range(n_prefill, ids.shape[1])]
    return np.array(mx.concatenate([a] + b, axis=1))


def gpu_logits_kernel_on_off(monkeypatch, env_var: str, make_model=None, on=None):
    """(kernels as dispatched, `env_var`=ops): logits of one tiny Flash-like model (fp32, random
    weights, seed 2; or `make_model()`, built on the GPU), prefill of 12 tokens then 6 decode
    steps, on the GPU. `on`: the value of `env_var` for the first run (an opt-in family)."""
    from dsv4_mlx.model import Model, ModelArgs
    from dsv4_mlx.random_weights import load_random

    if on is not None:
        monkeypatch.setenv(env_var, on)
    with mx.stream(mx.gpu):
        mx.set_default_device(mx.gpu)
        try:
            model = make_model() if make_model is not None else \
                load_random(Model(ModelArgs.from_dict(dict(FLASH_LIKE, num_nextn_predict_layers=0))), seed=2)
            ids = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28]])
            got = prefill_then_decode(model, ids, 12)
            monkeypatch.setenv(env_var, "ops")
            want = prefill_then_decode(model, ids, 12)
        finally:
            mx.set_default_device(mx.cpu)
    return got, want


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """The C++ emulator of the kernel bodies (`test_indexer_kernel.Emulator`), one for the
    session: its compiled libraries are keyed by the hash of their whole source."""
    from test_indexer_kernel import CXX, Emulator

    if CXX is None:
        pytest.skip("no C++ compiler (g++/c++/clang++) on PATH")
    return Emulator(tmp_path_factory.mktemp("kernel_emu"))
