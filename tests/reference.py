"""The oracle: transformers 5.23 `DeepseekV4ForCausalLM` (fp32, CPU) loaded with the same
official-named weights as the MLX model, via the rename table of spec §3.5."""

from __future__ import annotations

import re
from typing import Dict

import numpy as np
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

_TYPES = {0: "sliding_attention", 4: "compressed_sparse_attention"}

_RENAMES = [
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^hc_head_(fn|base|scale)$", r"model.hc_head.hc_\1"),
    (r"^layers\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^layers\.(\d+)\.hc_attn_(fn|base|scale)$", r"model.layers.\1.attn_hc.\2"),
    (r"^layers\.(\d+)\.hc_ffn_(fn|base|scale)$", r"model.layers.\1.ffn_hc.\2"),
    (r"^layers\.(\d+)\.attn\.wq_a\.", r"model.layers.\1.self_attn.q_a_proj."),
    (r"^layers\.(\d+)\.attn\.q_norm\.", r"model.layers.\1.self_attn.q_a_norm."),
    (r"^layers\.(\d+)\.attn\.wq_b\.", r"model.layers.\1.self_attn.q_b_proj."),
    (r"^layers\.(\d+)\.attn\.wkv\.", r"model.layers.\1.self_attn.kv_proj."),
    (r"^layers\.(\d+)\.attn\.kv_norm\.", r"model.layers.\1.self_attn.kv_norm."),
    (r"^layers\.(\d+)\.attn\.wo_a\.", r"model.layers.\1.self_attn.o_a_proj."),
    (r"^layers\.(\d+)\.attn\.wo_b\.", r"model.layers.\1.self_attn.o_b_proj."),
    (r"^layers\.(\d+)\.attn\.attn_sink$", r"model.layers.\1.self_attn.sinks"),
    (r"^layers\.(\d+)\.attn\.indexer\.compressor\.", r"model.layers.\1.self_attn.compressor.indexer.C."),
    (r"^layers\.(\d+)\.attn\.indexer\.wq_b\.", r"model.layers.\1.self_attn.compressor.indexer.q_b_proj."),
    (r"^layers\.(\d+)\.attn\.indexer\.weights_proj\.", r"model.layers.\1.self_attn.compressor.indexer.scorer.weights_proj."),
    (r"^layers\.(\d+)\.attn\.compressor\.", r"model.layers.\1.self_attn.compressor.C."),
    (r"^layers\.(\d+)\.ffn\.gate\.bias$", r"model.layers.\1.mlp.gate.e_score_correction_bias"),
    (r"^layers\.(\d+)\.ffn\.gate\.", r"model.layers.\1.mlp.gate."),
    (r"^layers\.(\d+)\.ffn\.shared_experts\.w1\.", r"model.layers.\1.mlp.shared_experts.gate_proj."),
    (r"^layers\.(\d+)\.ffn\.shared_experts\.w3\.", r"model.layers.\1.mlp.shared_experts.up_proj."),
    (r"^layers\.(\d+)\.ffn\.shared_experts\.w2\.", r"model.layers.\1.mlp.shared_experts.down_proj."),
]
_COMPRESSOR_PARTS = {"wkv.weight": "kv_proj.weight", "wgate.weight": "gate_proj.weight",
                     "ape": "position_bias", "norm.weight": "kv_norm.weight"}


def hf_config(cfg: dict) -> DeepseekV4Config:
    """transformers config for one of our configs (all HCA layers share one rate)."""
    L = cfg["num_hidden_layers"]
    ratios = cfg["compress_ratios"][:L]
    hca = sorted({r for r in ratios if r not in (0, 4)})
    assert len(hca) <= 1, "transformers has one HCA rate per model"
    types = [_TYPES.get(r, "heavily_compressed_attention") for r in ratios]
    rs = cfg["rope_scaling"]
    c = DeepseekV4Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        moe_intermediate_size=cfg["moe_intermediate_size"], num_hidden_layers=L,
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=1,
        head_dim=cfg["head_dim"], q_lora_rank=cfg["q_lora_rank"],
        num_experts_per_tok=cfg["num_experts_per_tok"], n_routed_experts=cfg["n_routed_experts"],
        n_shared_experts=1, routed_scaling_factor=cfg["routed_scaling_factor"],
        max_position_embeddings=cfg.get("max_position_embeddings", 1048576),
        rope_theta=cfg["rope_theta"], compress_rope_theta=cfg["compress_rope_theta"],
        layer_types=types,
        compress_rates={"compressed_sparse_attention": 4,
                        "heavily_compressed_attention": hca[0] if hca else 128},
        mlp_layer_types=["hash_moe" if i < cfg["num_hash_layers"] else "moe" for i in range(L)],
        hc_mult=cfg["hc_mult"], hc_sinkhorn_iters=cfg["hc_sinkhorn_iters"], hc_eps=cfg["hc_eps"],
        swiglu_limit=cfg["swiglu_limit"], sliding_window=cfg["sliding_window"],
        o_groups=cfg["o_groups"], o_lora_rank=cfg["o_lora_rank"],
        index_n_heads=cfg["index_n_heads"], index_head_dim=cfg["index_head_dim"],
        index_topk=cfg["index_topk"], rms_norm_eps=cfg["rms_norm_eps"],
        partial_rotary_factor=cfg["qk_rope_head_dim"] / cfg["head_dim"],
        rope_parameters={"rope_type": "yarn", "factor": rs["factor"],
                         "original_max_position_embeddings": rs["original_max_position_embeddings"],
                         "beta_fast": rs["beta_fast"], "beta_slow": rs["beta_slow"]},
        tie_word_embeddings=False,
    )
    c._attn_implementation = "eager"
    return c


def hf_state_dict(weights: Dict[str, np.ndarray], num_experts: int) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    experts: Dict[int, Dict[str, Dict[int, np.ndarray]]] = {}
    for k, v in weights.items():
        if k.startswith("mtp."):
            continue
        m = re.match(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$", k)
        if m:
            experts.setdefault(int(m.group(1)), {}).setdefault(m.group(3), {})[int(m.group(2))] = v
            continue
        name = k
        for pat, rep in _RENAMES:
            new = re.sub(pat, rep, name)
            if new != name:
                name = new
                break
        else:
            raise KeyError(f"no transformers name for {k}")
        if ".C." in name:
            head, part = name.split(".C.")
            name = f"{head}.{_COMPRESSOR_PARTS[part]}"
        out[name] = torch.from_numpy(np.ascontiguousarray(v))
    for layer, per in experts.items():
        p = f"model.layers.{layer}.mlp.experts"
        gu = [np.concatenate([per["w1"][e], per["w3"][e]], axis=0) for e in range(num_experts)]
        out[f"{p}.gate_up_proj"] = torch.from_numpy(np.stack(gu))
        out[f"{p}.down_proj"] = torch.from_numpy(np.stack([per["w2"][e] for e in range(num_experts)]))
    return out


def hf_model(cfg: dict, weights: Dict[str, np.ndarray]) -> DeepseekV4ForCausalLM:
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(hf_config(cfg)).float().eval()
    sd = hf_state_dict(weights, cfg["n_routed_experts"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "inv_freq" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model


@torch.no_grad()
def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(ids.astype(np.int64)), use_cache=False).logits.float().numpy()


def _rms(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)) * w


@torch.no_grad()
def hf_mtp_logits(cfg: dict, weights: Dict[str, np.ndarray], model, ids: np.ndarray,
                  next_ids: np.ndarray) -> np.ndarray:
    """MTP block 0 (spec §4.12) assembled from transformers' own decoder layer.

    X_final is captured at the input of transformers' `hc_head`; the block itself is a
    `DeepseekV4DecoderLayer` of type sliding_attention with learned routing, loaded with the
    `mtp.0.*` block tensors; e_proj/h_proj, the norms and MTP's hc_head are written out here.
    """
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4DecoderLayer, DeepseekV4RotaryEmbedding)

    got = {}
    hook = model.model.hc_head.register_forward_pre_hook(lambda m, a: got.__setitem__("X", a[0]))
    model(torch.from_numpy(ids.astype(np.int64)), use_cache=False)
    hook.remove()
    X = got["X"]  # [B, S, n, D]

    one = dict(cfg, num_hidden_layers=1, compress_ratios=[cfg["compress_ratios"][cfg["num_hidden_layers"]]],
               num_hash_layers=0)
    c1 = hf_config(one)
    layer = DeepseekV4DecoderLayer(c1, 0).float().eval()
    block = {k.replace("mtp.0.", "layers.0.", 1): v for k, v in weights.items()
             if k.startswith("mtp.0.") and not any(s in k for s in
             ("e_proj", "h_proj", "enorm", "hnorm", "mtp.0.norm", "mtp.0.hc_head"))}
    sd = {k.replace("model.layers.0.", "", 1): v for k, v in hf_state_dict(block, cfg["n_routed_experts"]).items()}
    missing, unexpected = layer.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "inv_freq" not in m], (missing, unexpected)

    t = {k: torch.from_numpy(v) for k, v in weights.items() if k.startswith("mtp.0.") or k in ("embed.weight", "head.weight")}
    eps = cfg["rms_norm_eps"]
    nxt = torch.from_numpy(next_ids.astype(np.int64))
    e = _rms(t["embed.weight"][nxt], t["mtp.0.enorm.weight"], eps)
    x0 = (e @ t["mtp.0.e_proj.weight"].T)[:, :, None, :] + _rms(X, t["mtp.0.hnorm.weight"], eps) @ t["mtp.0.h_proj.weight"].T

    B, S = nxt.shape
    pos = torch.arange(S)[None]
    rot = DeepseekV4RotaryEmbedding(c1)
    pe = {"main": rot(x0, pos, layer_type="main"), "compress": rot(x0, pos, layer_type="compress")}
    q, k = torch.arange(S)[:, None], torch.arange(S)[None]
    band = (k <= q) & (k > q - cfg["sliding_window"])
    mask = torch.zeros(S, S).masked_fill(~band, float("-inf"))[None, None]
    x1 = layer(x0, input_ids=nxt, position_embeddings=pe, position_ids=pos, attention_mask=mask)

    n, D = cfg["hc_mult"], cfg["hidden_size"]
    flat = x1.reshape(B, S, n * D)
    flat = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + eps)
    pre = torch.sigmoid((flat @ t["mtp.0.hc_head_fn"].T) * t["mtp.0.hc_head_scale"] + t["mtp.0.hc_head_base"]) + cfg["hc_eps"]
    y = (pre[..., None] * x1).sum(2)
    return (_rms(y, t["mtp.0.norm.weight"], eps) @ t["head.weight"].T).numpy()
