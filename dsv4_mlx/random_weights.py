"""Random weights with the checkpoint's official names, for tests, benchmarks and demo models.

Every tensor is generated on its own from (seed, name), so a checkpoint of any size can be
written one tensor at a time. Names and shapes are those of a published checkpoint after
dequantization (`ffn.experts.{e}.w1.weight` per expert, `ffn.gate.tid2eid` int64, ...). Scales
are chosen so every sub-module sees O(1) activations: projections ~ N(0, 1/fan_in), norms near
1, mHC logits O(1), sinks and `ape` O(1).
"""

from __future__ import annotations

import zlib
from typing import Dict, Iterator, Tuple

import numpy as np

from .model.config import ModelArgs

Spec = Tuple[Tuple[int, ...], str]  # (shape, kind)


def _block_specs(args: ModelArgs, p: str, ratio: int, hash_routed: bool) -> Dict[str, Spec]:
    D, H, c = args.hidden_size, args.num_attention_heads, args.head_dim
    n, dq, G, dg = args.hc_mult, args.q_lora_rank, args.o_groups, args.o_lora_rank
    E, I, k = args.n_routed_experts, args.moe_intermediate_size, args.num_experts_per_tok
    cI, HI = args.index_head_dim, args.index_n_heads
    s: Dict[str, Spec] = {
        f"{p}.attn_norm.weight": ((D,), "norm"),
        f"{p}.ffn_norm.weight": ((D,), "norm"),
    }
    for site in ("attn", "ffn"):
        s[f"{p}.hc_{site}_fn"] = (((2 + n) * n, n * D), "lin")
        s[f"{p}.hc_{site}_base"] = (((2 + n) * n,), "half")
        s[f"{p}.hc_{site}_scale"] = ((3,), "scale")
    a = f"{p}.attn"
    s.update({
        f"{a}.wq_a.weight": ((dq, D), "lin"), f"{a}.q_norm.weight": ((dq,), "norm"),
        f"{a}.wq_b.weight": ((H * c, dq), "lin"), f"{a}.wkv.weight": ((c, D), "lin"),
        f"{a}.kv_norm.weight": ((c,), "norm"), f"{a}.wo_a.weight": ((G * dg, H * c // G), "lin"),
        f"{a}.wo_b.weight": ((D, G * dg), "lin"), f"{a}.attn_sink": ((H,), "normal"),
    })
    comps = []
    if ratio:
        comps.append((f"{a}.compressor", c, ratio, 2 if ratio == 4 else 1))
    if ratio == 4:
        comps.append((f"{a}.indexer.compressor", cI, 4, 2))
        s[f"{a}.indexer.wq_b.weight"] = ((HI * cI, dq), "lin")
        s[f"{a}.indexer.weights_proj.weight"] = ((HI, D), "lin")
    for cp, hd, m, kappa in comps:
        s[f"{cp}.wkv.weight"] = ((kappa * hd, D), "lin")
        s[f"{cp}.wgate.weight"] = ((kappa * hd, D), "lin")
        s[f"{cp}.ape"] = ((m, kappa * hd), "half")
        s[f"{cp}.norm.weight"] = ((hd,), "norm")
    f = f"{p}.ffn"
    s[f"{f}.gate.weight"] = ((E, D), "lin")
    if hash_routed:
        s[f"{f}.gate.tid2eid"] = ((args.vocab_size, k), f"tid2eid:{E}")
    else:
        s[f"{f}.gate.bias"] = ((E,), "tenth")
    for e in range(E):
        s[f"{f}.experts.{e}.w1.weight"] = ((I, D), "lin")
        s[f"{f}.experts.{e}.w3.weight"] = ((I, D), "lin")
        s[f"{f}.experts.{e}.w2.weight"] = ((D, I), "lin")
    for w, shape in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I))):
        s[f"{f}.shared_experts.{w}.weight"] = (shape, "lin")
    return s


def weight_specs(args: ModelArgs) -> Dict[str, Spec]:
    """name -> (shape, init kind) for every tensor of a checkpoint for `args`."""
    D, V, n = args.hidden_size, args.vocab_size, args.hc_mult
    s: Dict[str, Spec] = {
        "embed.weight": ((V, D), "normal"),
        "head.weight": ((V, D), "lin"),
        "norm.weight": ((D,), "norm"),
        "hc_head_fn": ((n, n * D), "lin"),
        "hc_head_base": ((n,), "half"),
        "hc_head_scale": ((1,), "scale"),
    }
    for i in range(args.num_hidden_layers):
        s.update(_block_specs(args, f"layers.{i}", args.layer_ratio(i), i < args.num_hash_layers))
    for i in range(args.num_nextn_predict_layers):
        p = f"mtp.{i}"
        s.update(_block_specs(args, p, args.mtp_ratio(i), False))
        s[f"{p}.e_proj.weight"] = ((D, D), "lin")
        s[f"{p}.h_proj.weight"] = ((D, D), "lin")
        for name in ("enorm", "hnorm", "norm"):
            s[f"{p}.{name}.weight"] = ((D,), "norm")
        s[f"{p}.hc_head_fn"] = ((n, n * D), "lin")
        s[f"{p}.hc_head_base"] = ((n,), "half")
        s[f"{p}.hc_head_scale"] = ((1,), "scale")
    return s


def make_weight(name: str, spec: Spec, seed: int = 0) -> np.ndarray:
    """The tensor `name`, drawn from its own stream seeded by (seed, name)."""
    shape, kind = spec
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if kind == "lin":
        return rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), shape).astype(np.float32)
    if kind == "norm":
        return (1.0 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    if kind == "normal":
        return rng.standard_normal(shape, dtype=np.float32)
    if kind == "half":
        return (0.5 * rng.normal(size=shape)).astype(np.float32)
    if kind == "tenth":
        return (0.1 * rng.normal(size=shape)).astype(np.float32)
    if kind == "scale":
        return (0.5 + rng.uniform(size=shape)).astype(np.float32)
    if kind.startswith("tid2eid:"):
        E = int(kind.split(":")[1])  # k distinct experts per token
        return np.argsort(rng.random((shape[0], E)), axis=1)[:, : shape[1]].astype(np.int64)
    raise ValueError(kind)


def iter_random_weights(args: ModelArgs, seed: int = 0) -> Iterator[Tuple[str, np.ndarray]]:
    for name, spec in weight_specs(args).items():
        yield name, make_weight(name, spec, seed)


def random_weights(args: ModelArgs, seed: int = 0) -> Dict[str, np.ndarray]:
    """All tensors of a checkpoint for `args` (official names, float32 / int64)."""
    return dict(iter_random_weights(args, seed))


def load_random(model, seed: int = 0, dtype=None):
    """Fill an MLX `Model` with `random_weights` (optionally cast float tensors to `dtype`)."""
    import mlx.core as mx

    weights = {}
    for k, v in iter_random_weights(model.args, seed):
        a = mx.array(v)
        if dtype is not None and a.dtype == mx.float32:
            a = a.astype(dtype)
        weights[k] = a
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model
