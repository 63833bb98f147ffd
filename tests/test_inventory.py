"""Tensor inventory anchors (spec §3.1, §3.2, §9) for the published V4 configs and tiny configs."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest

from dsv4_mlx.model.inventory import TensorInfo, parameter_counts, tensor_inventory

CONFIGS = Path(__file__).parent / "data" / "configs"


def _load(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


@pytest.fixture(scope="module")
def flash() -> dict:
    return _load("v4-flash")


@pytest.fixture(scope="module")
def pro() -> dict:
    return _load("v4-pro")


@pytest.fixture(scope="module")
def flash_inv(flash):
    return {t.name: t for t in tensor_inventory(flash)}


def _tiny(**over) -> dict:
    cfg = {
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "qk_rope_head_dim": 8,
        "q_lora_rank": 48,
        "o_groups": 2,
        "o_lora_rank": 32,
        "index_n_heads": 2,
        "index_head_dim": 16,
        "index_topk": 3,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "num_hash_layers": 1,
        "hc_mult": 4,
        "num_nextn_predict_layers": 1,
        "compress_ratios": [0, 4, 8, 4, 0],
    }
    cfg.update(over)
    return cfg


# ---------------------------------------------------------------------------------------------
# published totals (§3.1 / §9)


def test_flash_file_totals(flash):
    inv = tensor_inventory(flash)
    assert len(inv) == 69_187
    assert sum(t.nbytes for t in inv) == 159_609_485_896
    assert len({t.name for t in inv}) == len(inv)
    # the MTP block is part of the files: 1,575 tensors (§3.2)
    assert sum(t.name.startswith("mtp.0.") for t in inv) == 1_575
    assert len(tensor_inventory(flash, include_mtp=False)) == 69_187 - 1_575


def test_pro_file_totals(pro):
    inv = tensor_inventory(pro)
    assert len(inv) == 145_116
    assert sum(t.nbytes for t in inv) == 864_704_792_696


def test_flash_parameter_counts(flash):
    pc = parameter_counts(flash)
    # exact values computed by this inventory (spec §1: 284.33B total, ~13.3B active)
    assert pc["total"] == 284_334_567_511
    assert round(pc["total"] / 1e9, 2) == 284.33
    assert pc["active"] == 13_272_428_631
    assert round(pc["active"] / 1e9, 1) == 13.3
    assert round(pc["active_with_embedding"] / 1e9, 1) == 13.8
    assert pc["embedding"] == 129_280 * 4096
    assert pc["routed_experts"] == 43 * 256 * 3 * 4096 * 2048
    assert pc["mtp"] == 6_610_048_891


def test_pro_parameter_counts(pro):
    pc = parameter_counts(pro)
    assert pc["total"] == 1_572_999_528_803
    assert round(pc["total"] / 1e9, 1) == 1573.0
    assert pc["active"] == 48_854_729_059
    assert round(pc["active"] / 1e9, 1) == 48.9
    assert round(pc["active_with_embedding"] / 1e9, 1) == 49.8
    assert pc["mtp"] == 25_840_145_979


# ---------------------------------------------------------------------------------------------
# shapes / dtypes from the §3.2 tables (Flash column)


@pytest.mark.parametrize(
    "name, shape, dtype",
    [
        ("embed.weight", (129280, 4096), "BF16"),
        ("head.weight", (129280, 4096), "BF16"),
        ("norm.weight", (4096,), "BF16"),
        ("hc_head_fn", (4, 16384), "F32"),
        ("hc_head_base", (4,), "F32"),
        ("hc_head_scale", (1,), "F32"),
        ("layers.0.hc_attn_fn", (24, 16384), "F32"),
        ("layers.0.hc_ffn_base", (24,), "F32"),
        ("layers.0.hc_attn_scale", (3,), "F32"),
        ("layers.12.attn.wq_a.weight", (1024, 4096), "F8_E4M3"),
        ("layers.12.attn.wq_a.scale", (8, 32), "F8_E8M0"),
        ("layers.12.attn.wq_b.scale", (256, 8), "F8_E8M0"),
        ("layers.12.attn.wkv.scale", (4, 32), "F8_E8M0"),
        ("layers.12.attn.wo_a.weight", (8192, 4096), "F8_E4M3"),
        ("layers.12.attn.wo_b.scale", (32, 64), "F8_E8M0"),
        ("layers.12.attn.attn_sink", (64,), "F32"),
        ("layers.0.ffn.gate.tid2eid", (129280, 6), "I64"),
        ("layers.3.ffn.gate.bias", (256,), "F32"),
        ("layers.12.ffn.experts.37.w1.weight", (2048, 2048), "I8"),
        ("layers.12.ffn.experts.37.w1.scale", (2048, 128), "F8_E8M0"),
        ("layers.12.ffn.experts.37.w2.weight", (4096, 1024), "I8"),
        ("layers.12.ffn.experts.37.w2.scale", (4096, 64), "F8_E8M0"),
        ("layers.12.ffn.shared_experts.w1.scale", (16, 32), "F8_E8M0"),
        ("layers.12.ffn.shared_experts.w2.weight", (4096, 2048), "F8_E4M3"),
        # CSA layer 2 / HCA layer 3
        ("layers.2.attn.compressor.wkv.weight", (1024, 4096), "BF16"),
        ("layers.2.attn.compressor.ape", (4, 1024), "F32"),
        ("layers.3.attn.compressor.wgate.weight", (512, 4096), "BF16"),
        ("layers.3.attn.compressor.ape", (128, 512), "F32"),
        ("layers.3.attn.compressor.norm.weight", (512,), "BF16"),
        ("layers.2.attn.indexer.wq_b.weight", (8192, 1024), "F8_E4M3"),
        ("layers.2.attn.indexer.wq_b.scale", (64, 8), "F8_E8M0"),
        ("layers.2.attn.indexer.weights_proj.weight", (64, 4096), "BF16"),
        ("layers.2.attn.indexer.compressor.wkv.weight", (256, 4096), "BF16"),
        ("layers.2.attn.indexer.compressor.ape", (4, 256), "F32"),
        ("layers.2.attn.indexer.compressor.norm.weight", (128,), "BF16"),
        # MTP (§3.2)
        ("mtp.0.e_proj.weight", (4096, 4096), "F8_E4M3"),
        ("mtp.0.h_proj.scale", (32, 32), "F8_E8M0"),
        ("mtp.0.enorm.weight", (4096,), "BF16"),
        ("mtp.0.norm.weight", (4096,), "BF16"),
        ("mtp.0.hc_head_fn", (4, 16384), "F32"),
        ("mtp.0.ffn.gate.bias", (256,), "F32"),
        ("mtp.0.ffn.experts.255.w3.weight", (2048, 2048), "I8"),
    ],
)
def test_flash_shapes(flash_inv, name, shape, dtype):
    t = flash_inv[name]
    assert (t.shape, t.dtype) == (shape, dtype)


def test_flash_structure(flash_inv):
    names = flash_inv.keys()
    assert not any(n.startswith("model.") for n in names)
    # hash layers: tid2eid and no bias; others the reverse
    for layer in range(43):
        assert (f"layers.{layer}.ffn.gate.tid2eid" in names) == (layer < 3)
        assert (f"layers.{layer}.ffn.gate.bias" in names) == (layer >= 3)
    # SWA-only layers 0-1 and the MTP block have no compressor
    for p in ("layers.0.", "layers.1.", "mtp.0."):
        assert not any(n.startswith(p + "attn.compressor") for n in names)
        assert not any(n.startswith(p + "attn.indexer") for n in names)
    assert "layers.3.attn.indexer.wq_b.weight" not in names
    assert "mtp.0.ffn.gate.tid2eid" not in names
    assert "mtp.0.embed.weight" not in names and "mtp.0.head.weight" not in names
    # every quantized weight has exactly one scale sibling and vice versa
    for n, t in flash_inv.items():
        if t.dtype in ("F8_E4M3", "I8"):
            assert flash_inv[n[: -len("weight")] + "scale"].dtype == "F8_E8M0"
        if t.is_scale:
            assert flash_inv[n[: -len("scale")] + "weight"].dtype in ("F8_E4M3", "I8")
    counts = Counter(t.dtype for t in flash_inv.values())
    assert counts["I64"] == 3
    assert counts["I8"] == 44 * 256 * 3


def test_tensor_info_properties():
    t = TensorInfo("layers.0.ffn.experts.0.w1.weight", (2048, 2048), "I8")
    assert t.logical_shape == (2048, 4096) and t.nbytes == 2048 * 2048 and not t.is_scale
    s = TensorInfo("layers.0.ffn.experts.0.w1.scale", (2048, 128), "F8_E8M0")
    assert s.is_scale and s.nbytes == 2048 * 128 and s.logical_shape == (2048, 128)
    b = TensorInfo("embed.weight", (10, 4), "BF16")
    assert b.nbytes == 80 and b.logical_shape == (10, 4)
    assert TensorInfo("x", (3,), "I64").nbytes == 24
    assert not TensorInfo("hc_head_scale", (1,), "F32").is_scale


# ---------------------------------------------------------------------------------------------
# expert formats and small configs


def test_flash_fp8_experts(flash):
    inv = {t.name: t for t in tensor_inventory(flash, expert_dtype="fp8")}
    assert inv["layers.5.ffn.experts.0.w1.weight"].shape == (2048, 4096)
    assert inv["layers.5.ffn.experts.0.w1.weight"].dtype == "F8_E4M3"
    assert inv["layers.5.ffn.experts.0.w1.scale"].shape == (16, 32)
    assert inv["layers.5.ffn.experts.0.w2.scale"].shape == (32, 16)
    assert len(inv) == 69_187
    # config key expert_dtype is honoured too
    cfg = dict(flash, expert_dtype="fp8")
    assert {t.name: t for t in tensor_inventory(cfg)} == inv
    # logical parameter counts do not depend on the storage format
    assert parameter_counts(cfg) == parameter_counts(flash)


def test_tiny_config_layer_types():
    cfg = _tiny(quantization_config={"weight_block_size": [128, 128]})
    inv = {t.name: t for t in tensor_inventory(cfg)}
    # layer 1: CSA (kappa 2 + indexer), layer 2: m=8 -> HCA-style (kappa 1, ape [8, c])
    assert inv["layers.1.attn.compressor.wkv.weight"].shape == (64, 64)
    assert inv["layers.1.attn.compressor.ape"].shape == (4, 64)
    assert inv["layers.1.attn.indexer.compressor.ape"].shape == (4, 32)
    assert inv["layers.1.attn.indexer.wq_b.weight"].shape == (32, 48)
    assert inv["layers.1.attn.indexer.wq_b.scale"].shape == (1, 1)
    assert inv["layers.2.attn.compressor.wkv.weight"].shape == (32, 64)
    assert inv["layers.2.attn.compressor.ape"].shape == (8, 32)
    assert "layers.2.attn.indexer.weights_proj.weight" not in inv
    assert "layers.0.attn.compressor.ape" not in inv
    assert "mtp.0.attn.compressor.ape" not in inv  # ratio index 4 = 0
    assert inv["layers.0.ffn.gate.tid2eid"].shape == (100, 2)
    assert "layers.1.ffn.gate.tid2eid" not in inv
    assert inv["layers.1.ffn.gate.bias"].shape == (4,)
    # FP4 experts by default when quantization_config is present
    assert inv["layers.1.ffn.experts.3.w1.weight"].shape == (32, 32)
    assert inv["layers.1.ffn.experts.3.w1.weight"].dtype == "I8"
    assert inv["layers.1.ffn.experts.3.w2.scale"].shape == (64, 1)
    assert inv["layers.1.attn.wo_a.weight"].shape == (2 * 32, 4 * 32 // 2)


def test_tiny_config_unquantized():
    cfg = _tiny()
    inv = tensor_inventory(cfg)
    assert not any(t.is_scale for t in inv)
    assert not any(t.dtype in ("F8_E4M3", "F8_E8M0", "I8") for t in inv)
    d = {t.name: t for t in inv}
    assert d["layers.1.attn.wq_b.weight"] == TensorInfo(
        "layers.1.attn.wq_b.weight", (128, 48), "BF16"
    )
    assert d["layers.1.ffn.experts.0.w2.weight"].shape == (64, 32)
    assert d["layers.0.ffn.gate.tid2eid"].dtype == "I64"
    assert d["layers.0.hc_attn_fn"].dtype == "F32"
    pc = parameter_counts(cfg)
    per_expert = 3 * 64 * 32
    assert pc["routed_experts"] == 4 * 4 * per_expert
    assert pc["active"] == pc["total"] - pc["embedding"] - pc["routed_experts"] + 4 * 2 * per_expert
    assert pc["total"] == sum(t.num_params for t in inv if not t.name.startswith("mtp."))


def test_fp4_needs_multiple_of_32():
    cfg = _tiny(hidden_size=48, quantization_config={})
    with pytest.raises(ValueError, match="multiple of 32"):
        tensor_inventory(cfg)


def test_short_compress_ratios():
    cfg = _tiny(compress_ratios=[0, 4, 8, 4])
    with pytest.raises(ValueError, match="compress_ratios"):
        tensor_inventory(cfg)
    assert len(tensor_inventory(cfg, include_mtp=False)) > 0


def test_config_not_mutated(flash):
    before = copy.deepcopy(flash)
    tensor_inventory(flash, include_mtp=False)
    assert flash == before
