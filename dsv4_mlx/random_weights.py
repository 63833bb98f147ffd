"""Random weights with the checkpoint's official names, for tests, benchmarks and demo models.

`random_weights(args)` returns a dict of float32 numpy arrays named and shaped as a published
checkpoint holds them after dequantization (`ffn.experts.{e}.w1.weight` per expert,
`ffn.gate.tid2eid` int64, ...). Scales are chosen so every sub-module sees O(1) activations:
projections ~ N(0, 1/fan_in), norms near 1, mHC logits O(1), sinks and `ape` O(1).
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from .model.config import ModelArgs


def _block_weights(args: ModelArgs, prefix: str, ratio: int, hash_routed: bool, rng) -> Dict[str, np.ndarray]:
    D, H, c = args.hidden_size, args.num_attention_heads, args.head_dim
    n, dq, G, dg = args.hc_mult, args.q_lora_rank, args.o_groups, args.o_lora_rank
    E, I, k = args.n_routed_experts, args.moe_intermediate_size, args.num_experts_per_tok
    cI, HI = args.index_head_dim, args.index_n_heads
    w: Dict[str, np.ndarray] = {}

    def lin(name, out, inp):
        w[name] = rng.normal(0.0, 1.0 / np.sqrt(inp), (out, inp)).astype(np.float32)

    def norm(name, dims):
        w[name] = (1.0 + 0.1 * rng.normal(size=(dims,))).astype(np.float32)

    p = prefix
    norm(f"{p}.attn_norm.weight", D)
    norm(f"{p}.ffn_norm.weight", D)
    for site in ("attn", "ffn"):
        mix = (2 + n) * n
        w[f"{p}.hc_{site}_fn"] = rng.normal(0, 1.0 / np.sqrt(n * D), (mix, n * D)).astype(np.float32)
        w[f"{p}.hc_{site}_base"] = (0.5 * rng.normal(size=(mix,))).astype(np.float32)
        w[f"{p}.hc_{site}_scale"] = (0.5 + rng.uniform(size=(3,))).astype(np.float32)
    a = f"{p}.attn"
    lin(f"{a}.wq_a.weight", dq, D)
    norm(f"{a}.q_norm.weight", dq)
    lin(f"{a}.wq_b.weight", H * c, dq)
    lin(f"{a}.wkv.weight", c, D)
    norm(f"{a}.kv_norm.weight", c)
    lin(f"{a}.wo_a.weight", G * dg, H * c // G)
    lin(f"{a}.wo_b.weight", D, G * dg)
    w[f"{a}.attn_sink"] = rng.normal(size=(H,)).astype(np.float32)
    comps = []
    if ratio:
        comps.append((f"{a}.compressor", c, ratio, 2 if ratio == 4 else 1))
    if ratio == 4:
        comps.append((f"{a}.indexer.compressor", cI, 4, 2))
        lin(f"{a}.indexer.wq_b.weight", HI * cI, dq)
        lin(f"{a}.indexer.weights_proj.weight", HI, D)
    for cp, hd, m, kappa in comps:
        lin(f"{cp}.wkv.weight", kappa * hd, D)
        lin(f"{cp}.wgate.weight", kappa * hd, D)
        w[f"{cp}.ape"] = (0.5 * rng.normal(size=(m, kappa * hd))).astype(np.float32)
        norm(f"{cp}.norm.weight", hd)
    f = f"{p}.ffn"
    lin(f"{f}.gate.weight", E, D)
    if hash_routed:
        # k distinct experts per token
        w[f"{f}.gate.tid2eid"] = np.argsort(rng.random((args.vocab_size, E)), axis=1)[:, :k].astype(np.int64)
    else:
        w[f"{f}.gate.bias"] = (0.1 * rng.normal(size=(E,))).astype(np.float32)
    for e in range(E):
        lin(f"{f}.experts.{e}.w1.weight", I, D)
        lin(f"{f}.experts.{e}.w3.weight", I, D)
        lin(f"{f}.experts.{e}.w2.weight", D, I)
    lin(f"{f}.shared_experts.w1.weight", I, D)
    lin(f"{f}.shared_experts.w3.weight", I, D)
    lin(f"{f}.shared_experts.w2.weight", D, I)
    return w


def random_weights(args: ModelArgs, seed: int = 0) -> Dict[str, np.ndarray]:
    """All tensors of a checkpoint for `args` (official names, float32 / int64)."""
    rng = np.random.default_rng(seed)
    D, V, n = args.hidden_size, args.vocab_size, args.hc_mult
    w: Dict[str, np.ndarray] = {
        "embed.weight": rng.normal(size=(V, D)).astype(np.float32),
        "head.weight": rng.normal(0, 1.0 / np.sqrt(D), (V, D)).astype(np.float32),
        "norm.weight": (1.0 + 0.1 * rng.normal(size=(D,))).astype(np.float32),
        "hc_head_fn": rng.normal(0, 1.0 / np.sqrt(n * D), (n, n * D)).astype(np.float32),
        "hc_head_base": (0.5 * rng.normal(size=(n,))).astype(np.float32),
        "hc_head_scale": (0.5 + rng.uniform(size=(1,))).astype(np.float32),
    }
    for i in range(args.num_hidden_layers):
        w.update(_block_weights(args, f"layers.{i}", args.layer_ratio(i), i < args.num_hash_layers, rng))
    for i in range(args.num_nextn_predict_layers):
        p = f"mtp.{i}"
        w.update(_block_weights(args, p, args.mtp_ratio(i), False, rng))
        for name in ("e_proj", "h_proj"):
            w[f"{p}.{name}.weight"] = rng.normal(0, 1.0 / np.sqrt(D), (D, D)).astype(np.float32)
        for name in ("enorm", "hnorm", "norm"):
            w[f"{p}.{name}.weight"] = (1.0 + 0.1 * rng.normal(size=(D,))).astype(np.float32)
        w[f"{p}.hc_head_fn"] = rng.normal(0, 1.0 / np.sqrt(n * D), (n, n * D)).astype(np.float32)
        w[f"{p}.hc_head_base"] = (0.5 * rng.normal(size=(n,))).astype(np.float32)
        w[f"{p}.hc_head_scale"] = (0.5 + rng.uniform(size=(1,))).astype(np.float32)
    return w


def load_random(model, seed: int = 0, dtype=None):
    """Fill an MLX `Model` with `random_weights` (optionally cast float tensors to `dtype`)."""
    import mlx.core as mx

    raw = random_weights(model.args, seed)
    weights = {}
    for k, v in raw.items():
        a = mx.array(v)
        if dtype is not None and a.dtype == mx.float32:
            a = a.astype(dtype)
        weights[k] = a
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model
