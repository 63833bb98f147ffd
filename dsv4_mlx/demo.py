"""Random-weight models in the real architecture: the published FP8/FP4 layout (what
`dsv4 convert` reads) or, through the converter, a ready MLX folder.

Presets: `tiny` (small dimensions, the real vocabulary and tokenizer: runs anywhere in seconds),
`flash` and `pro` (the real dimensions with fewer layers and experts, for measuring speed and
memory where the real weights do not fit).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .convert import formats
from .convert.safetensors_io import float32_to_bf16
from .convert.writer import ShardWriter
from .model.config import ModelArgs
from .model.inventory import tensor_inventory
from .random_weights import make_weight, weight_specs

REFERENCE = {
    "flash": dict(
        vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64,
        head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
        index_n_heads=64, index_head_dim=128, index_topk=512, n_routed_experts=256,
        num_experts_per_tok=6, moe_intermediate_size=2048, routed_scaling_factor=1.5,
    ),
    "pro": dict(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
        head_dim=512, qk_rope_head_dim=64, q_lora_rank=1536, o_groups=16, o_lora_rank=1024,
        index_n_heads=64, index_head_dim=128, index_topk=1024, n_routed_experts=384,
        num_experts_per_tok=6, moe_intermediate_size=3072, routed_scaling_factor=2.5,
    ),
    "tiny": dict(
        vocab_size=129280, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        head_dim=64, qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=64,
        index_n_heads=8, index_head_dim=32, index_topk=8, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=64, routed_scaling_factor=1.5,
    ),
}


def preset_config(preset: str, layers: Optional[int] = None, experts: Optional[int] = None) -> Dict:
    """A config.json in the published form for a preset, optionally with fewer layers/experts."""
    if preset not in REFERENCE:
        raise ValueError(f"unknown preset {preset!r} (tiny, flash or pro)")
    r = dict(REFERENCE[preset])
    L = layers or r["num_hidden_layers"]
    if preset == "pro":
        ratios = [128, 128] + [4 if i % 2 == 0 else 128 for i in range(L - 2)]
    else:  # flash and tiny: two window-only layers, then CSA/HCA alternating
        ratios = [0, 0] + [4 if i % 2 == 0 else 128 for i in range(L - 2)]
    ratios = ratios[:L]
    if preset == "tiny":
        ratios = [0, 4, 16, 4][:L] + [4 if i % 2 else 16 for i in range(max(0, L - 4))]
    E = experts or r["n_routed_experts"]
    r.update(
        num_hidden_layers=L, n_routed_experts=E, num_experts_per_tok=min(r["num_experts_per_tok"], E),
        compress_ratios=ratios + [0],
    )
    cfg = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1, "hc_eps": 1e-6,
        "hc_mult": 4, "hc_sinkhorn_iters": 20, "hidden_act": "silu",
        "max_position_embeddings": 1048576, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_hash_layers": 3, "num_key_value_heads": 1, "num_nextn_predict_layers": 1,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        "expert_dtype": "fp4", "rms_norm_eps": 1e-6,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                         "original_max_position_embeddings": 65536, "type": "yarn"},
        "rope_theta": 10000, "compress_rope_theta": 160000, "scoring_func": "sqrtsoftplus",
        "sliding_window": 128, "swiglu_limit": 10.0, "tie_word_embeddings": False,
        "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "vocab_size": 129280,
        "dsv4_demo": {"preset": preset, "random_weights": True},
    }
    cfg.update(r)
    return cfg


def _encode(dtype: str, w: np.ndarray):
    """A float tensor in its published storage: [(dtype, array)] plus its scale for FP8/FP4."""
    if dtype == "F8_E4M3":
        q, sc = formats.quantize_fp8_block(w)
        return ("F8_E4M3", q), ("F8_E8M0", sc)
    if dtype == "I8":
        q, sc = formats.quantize_fp4(w)
        return ("I8", q), ("F8_E8M0", sc)
    if dtype == "BF16":
        return ("BF16", float32_to_bf16(w)), None
    return (dtype, w), None


def write_source_checkpoint(folder: Path, config: Dict, seed: int = 0, shards: int = 3) -> Path:
    """Random weights in exactly the published layout: official names, F8_E4M3 weights with
    F8_E8M0 128x128 scales, I8-packed FP4 experts with 1x32 scales, BF16/F32/I64, sharded,
    with `model.safetensors.index.json`, config and the real V4 tokenizer files.

    Written one tensor at a time (each drawn from its own seeded stream), so memory stays at
    one tensor whatever the model size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict(config)
    specs = weight_specs(args)
    inv = tensor_inventory(config)
    info = {t.name: t for t in inv}
    weights = [t for t in inv if not t.is_scale]
    if {t.name for t in weights} != set(specs):
        raise RuntimeError("the random-weight names and the checkpoint inventory differ")
    per = -(-len(weights) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = weights[i * per : (i + 1) * per]
        layout = []
        for t in part:
            layout.append((t.name, t.dtype, tuple(t.shape)))
            sname = t.name[: -len(".weight")] + ".scale"
            if sname in info:
                layout.append((sname, info[sname].dtype, tuple(info[sname].shape)))
        w = ShardWriter(folder / fname, layout, {"format": "pt"})
        try:
            for t in part:
                main, scale = _encode(t.dtype, make_weight(t.name, specs[t.name], seed))
                w.write(t.name, main[1])
                if scale is not None:
                    w.write(t.name[: -len(".weight")] + ".scale", scale[1])
            w.close()
        except BaseException:
            w.abort()
            raise
        weight_map.update({name: fname for name, _, _ in layout})
        total += sum(info[name].nbytes for name, _, _ in layout)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.0, "top_p": 1.0}))
    from .encoding import tokenizer_files_dir

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_files_dir() / f, folder / f)
    return folder
