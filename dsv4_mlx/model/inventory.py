"""Tensor inventory of the published DeepSeek-V4 checkpoints, computed from ``config.json``.

Spec references (``dsv4-architecture.md``):

- §2.1 config keys, §2.2 layer schedule (``compress_ratios`` has one extra entry per MTP block),
  §2.3 quantization metadata;
- §3.1 naming (official names, no ``model.`` prefix) and file totals;
- §3.2 tensor inventory (symbolic shapes and dtypes) and the MTP block;
- §3.4 which tensors are stored in which format;
- §9 inventory anchors (Flash: 69,187 tensors / 159,609,485,896 bytes; Pro: 145,116 tensors).

The enumeration is driven purely by the config, so it also works for tiny test configs.

Format rules used here:

- ``quantization_config`` present: the large linears (attention ``wq_a``/``wq_b``/``wkv``/
  ``wo_a``/``wo_b``, indexer ``wq_b``, shared experts, MTP ``e_proj``/``h_proj``) are FP8 e4m3
  (``F8_E4M3``) with a sibling ``.scale`` of UE8M0 bytes (``F8_E8M0``), one per
  ``weight_block_size`` block (128x128 in the published configs).
- Routed experts follow ``expert_dtype``: ``"fp4"`` = packed e2m1 in ``I8`` [out, in/2] with a
  [out, in/32] ``F8_E8M0`` scale; ``"fp8"`` = like the other FP8 linears; ``"bf16"`` = plain.
  Resolution order: the function argument, then the config's top-level ``expert_dtype``, then
  ``"fp4"`` when ``quantization_config`` is present.
- No ``quantization_config``: every linear weight is BF16 with its logical shape and no
  ``.scale`` (the config's ``expert_dtype`` is then ignored; an explicit ``expert_dtype``
  argument still applies to the routed experts). F32 / I64 tensors keep their dtypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "DTYPE_SIZES",
    "TensorInfo",
    "tensor_inventory",
    "parameter_counts",
]

#: Bytes per element for the safetensors dtype strings used by the checkpoints.
DTYPE_SIZES: dict[str, int] = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I8": 1,
    "U8": 1,
    "I16": 2,
    "I32": 4,
    "I64": 8,
    "BOOL": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: official name, stored shape and safetensors dtype string."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "BF16", "F32", "F8_E4M3", "F8_E8M0", "I8", "I64"

    @property
    def numel(self) -> int:
        """Number of stored elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes occupied in the safetensors file."""
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def is_scale(self) -> bool:
        """True for the ``X.scale`` siblings of FP8/FP4 weights (§3.1)."""
        return self.name.endswith(".scale")

    @property
    def is_packed_fp4(self) -> bool:
        """True for packed FP4 weights: ``I8`` container, two e2m1 codes per byte (§3.3)."""
        return self.dtype == "I8" and self.name.endswith(".weight")

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """Shape of the logical tensor: [out, in] for packed FP4 ``I8`` [out, in/2] weights."""
        if self.is_packed_fp4:
            return (*self.shape[:-1], self.shape[-1] * 2)
        return self.shape

    @property
    def num_params(self) -> int:
        """Logical parameter count (0 for scale tensors)."""
        if self.is_scale:
            return 0
        return math.prod(self.logical_shape)


# --------------------------------------------------------------------------------------------
# helpers


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _resolve_expert_dtype(config: dict, expert_dtype: str | None) -> str:
    quantized = config.get("quantization_config") is not None
    if expert_dtype is None:
        if quantized:
            expert_dtype = config.get("expert_dtype") or "fp4"
        else:
            expert_dtype = "bf16"
    expert_dtype = str(expert_dtype).lower()
    if expert_dtype not in ("fp4", "fp8", "bf16"):
        raise ValueError(f"unknown expert_dtype {expert_dtype!r} (expected fp4, fp8 or bf16)")
    return expert_dtype


def _block_size(config: dict) -> tuple[int, int]:
    qc = config.get("quantization_config") or {}
    block = qc.get("weight_block_size", [128, 128])
    if len(block) != 2 or min(block) <= 0:
        raise ValueError(f"bad quantization_config.weight_block_size {block!r}")
    return int(block[0]), int(block[1])


class _Builder:
    """Accumulates TensorInfo entries; knows how to emit a linear in each format."""

    def __init__(self, block: tuple[int, int]):
        self.block = block
        self.items: list[TensorInfo] = []

    def add(self, name: str, shape, dtype: str) -> None:
        self.items.append(TensorInfo(name, tuple(int(s) for s in shape), dtype))

    def linear(self, prefix: str, out: int, inp: int, fmt: str) -> None:
        """``prefix.weight`` [out, in] (+ ``prefix.scale``) in ``fmt`` (fp8 / fp4 / bf16)."""
        if fmt == "fp8":
            bo, bi = self.block
            self.add(f"{prefix}.weight", (out, inp), "F8_E4M3")
            self.add(f"{prefix}.scale", (_ceil_div(out, bo), _ceil_div(inp, bi)), "F8_E8M0")
        elif fmt == "fp4":
            if inp % 32:
                raise ValueError(
                    f"{prefix}: FP4 needs the input width to be a multiple of 32, got {inp}"
                )
            self.add(f"{prefix}.weight", (out, inp // 2), "I8")
            self.add(f"{prefix}.scale", (out, inp // 32), "F8_E8M0")
        elif fmt == "bf16":
            self.add(f"{prefix}.weight", (out, inp), "BF16")
        else:  # pragma: no cover - guarded by callers
            raise ValueError(f"unknown linear format {fmt!r}")


def _block(
    b: _Builder,
    p: str,
    cfg: dict,
    ratio: int,
    hash_layer: bool,
    lin: str,
    expert_fmt: str,
) -> None:
    """Tensors of one decoder block (a main layer or the body of an MTP block), §3.2."""
    D = cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    c = cfg["head_dim"]
    d_q = cfg["q_lora_rank"]
    G = cfg["o_groups"]
    d_g = cfg["o_lora_rank"]
    E = cfg["n_routed_experts"]
    I = cfg["moe_intermediate_size"]
    V = cfg["vocab_size"]
    k = cfg["num_experts_per_tok"]
    n = cfg.get("hc_mult", 4)
    n_shared = cfg.get("n_shared_experts", 1)
    mix = (2 + n) * n

    if (H * c) % G:
        raise ValueError(f"num_attention_heads*head_dim={H * c} not divisible by o_groups={G}")

    b.add(f"{p}attn_norm.weight", (D,), "BF16")
    b.add(f"{p}ffn_norm.weight", (D,), "BF16")
    for part in ("attn", "ffn"):
        b.add(f"{p}hc_{part}_fn", (mix, n * D), "F32")
        b.add(f"{p}hc_{part}_base", (mix,), "F32")
        b.add(f"{p}hc_{part}_scale", (3,), "F32")

    # attention, common path
    b.linear(f"{p}attn.wq_a", d_q, D, lin)
    b.add(f"{p}attn.q_norm.weight", (d_q,), "BF16")
    b.linear(f"{p}attn.wq_b", H * c, d_q, lin)
    b.linear(f"{p}attn.wkv", c, D, lin)
    b.add(f"{p}attn.kv_norm.weight", (c,), "BF16")
    b.linear(f"{p}attn.wo_a", G * d_g, H * c // G, lin)
    b.linear(f"{p}attn.wo_b", D, G * d_g, lin)
    b.add(f"{p}attn.attn_sink", (H,), "F32")

    # KV compressor: ratio 4 = CSA (overlap, kappa=2, + indexer); other m > 0 = HCA (kappa=1)
    if ratio < 0:
        raise ValueError(f"negative compress ratio {ratio}")
    if ratio > 0:
        kappa = 2 if ratio == 4 else 1
        b.add(f"{p}attn.compressor.wkv.weight", (kappa * c, D), "BF16")
        b.add(f"{p}attn.compressor.wgate.weight", (kappa * c, D), "BF16")
        b.add(f"{p}attn.compressor.ape", (ratio, kappa * c), "F32")
        b.add(f"{p}attn.compressor.norm.weight", (c,), "BF16")
    if ratio == 4:
        H_I = cfg["index_n_heads"]
        c_I = cfg["index_head_dim"]
        b.linear(f"{p}attn.indexer.wq_b", H_I * c_I, d_q, lin)
        b.add(f"{p}attn.indexer.weights_proj.weight", (H_I, D), "BF16")
        b.add(f"{p}attn.indexer.compressor.wkv.weight", (2 * c_I, D), "BF16")
        b.add(f"{p}attn.indexer.compressor.wgate.weight", (2 * c_I, D), "BF16")
        b.add(f"{p}attn.indexer.compressor.ape", (ratio, 2 * c_I), "F32")
        b.add(f"{p}attn.indexer.compressor.norm.weight", (c_I,), "BF16")

    # MoE
    b.add(f"{p}ffn.gate.weight", (E, D), "BF16")
    if hash_layer:
        b.add(f"{p}ffn.gate.tid2eid", (V, k), "I64")
    else:
        b.add(f"{p}ffn.gate.bias", (E,), "F32")
    for e in range(E):
        b.linear(f"{p}ffn.experts.{e}.w1", I, D, expert_fmt)
        b.linear(f"{p}ffn.experts.{e}.w2", D, I, expert_fmt)
        b.linear(f"{p}ffn.experts.{e}.w3", I, D, expert_fmt)
    I_s = I * n_shared
    b.linear(f"{p}ffn.shared_experts.w1", I_s, D, lin)
    b.linear(f"{p}ffn.shared_experts.w2", D, I_s, lin)
    b.linear(f"{p}ffn.shared_experts.w3", I_s, D, lin)


# --------------------------------------------------------------------------------------------
# public API


def tensor_inventory(
    config: dict, include_mtp: bool = True, expert_dtype: str | None = None
) -> list[TensorInfo]:
    """Every tensor of the published checkpoint for ``config`` (§3.2), with official names.

    ``include_mtp`` adds the ``mtp.{i}.*`` blocks (they are part of the published files).
    ``expert_dtype`` overrides the routed-expert format (``"fp4"``, ``"fp8"`` or ``"bf16"``).
    """
    L = config["num_hidden_layers"]
    D = config["hidden_size"]
    V = config["vocab_size"]
    n = config.get("hc_mult", 4)
    n_hash = config.get("num_hash_layers", 0)
    n_mtp = config.get("num_nextn_predict_layers", 0) if include_mtp else 0
    ratios = list(config.get("compress_ratios") or [0] * (L + n_mtp))
    if len(ratios) < L + n_mtp:
        raise ValueError(
            f"compress_ratios has {len(ratios)} entries; need num_hidden_layers ({L}) + "
            f"MTP blocks ({n_mtp}) = {L + n_mtp}"
        )
    lin = "fp8" if config.get("quantization_config") is not None else "bf16"
    expert_fmt = _resolve_expert_dtype(config, expert_dtype)

    b = _Builder(_block_size(config))
    b.add("embed.weight", (V, D), "BF16")
    for layer in range(L):
        _block(
            b,
            f"layers.{layer}.",
            config,
            ratio=int(ratios[layer]),
            hash_layer=layer < n_hash,
            lin=lin,
            expert_fmt=expert_fmt,
        )
    for i in range(n_mtp):
        p = f"mtp.{i}."
        b.linear(f"{p}e_proj", D, D, lin)
        b.linear(f"{p}h_proj", D, D, lin)
        b.add(f"{p}enorm.weight", (D,), "BF16")
        b.add(f"{p}hnorm.weight", (D,), "BF16")
        _block(
            b,
            p,
            config,
            ratio=int(ratios[L + i]),
            hash_layer=False,  # the MTP block always uses learned routing (§2.2)
            lin=lin,
            expert_fmt=expert_fmt,
        )
        b.add(f"{p}norm.weight", (D,), "BF16")
        b.add(f"{p}hc_head_fn", (n, n * D), "F32")
        b.add(f"{p}hc_head_base", (n,), "F32")
        b.add(f"{p}hc_head_scale", (1,), "F32")
    b.add("norm.weight", (D,), "BF16")
    b.add("head.weight", (V, D), "BF16")
    b.add("hc_head_fn", (n, n * D), "F32")
    b.add("hc_head_base", (n,), "F32")
    b.add("hc_head_scale", (1,), "F32")

    names = [t.name for t in b.items]
    if len(set(names)) != len(names):  # pragma: no cover - internal consistency
        raise AssertionError("duplicate tensor names in inventory")
    return b.items


def parameter_counts(config: dict) -> dict:
    """Logical parameter counts (§1, §9). Scales are never counted; packed FP4 counts 2/byte.

    Keys (all ``int``):

    - ``total``: every tensor of the main model (embedding, head, all layers, including the
      hash layers' ``tid2eid`` tables), excluding MTP;
    - ``embedding``: ``embed.weight``;
    - ``routed_experts``: routed-expert weights of the main layers (MTP excluded);
    - ``per_expert``: one routed expert (w1 + w2 + w3);
    - ``active``: per-token active parameters excluding the embedding but counting the head:
      ``total - embedding - routed_experts + num_hidden_layers * num_experts_per_tok *
      per_expert``;
    - ``active_with_embedding``: ``active + embedding``;
    - ``mtp``: all ``mtp.*`` tensors (which share ``embed``/``head`` with the main model).
    """
    inv = tensor_inventory(config, include_mtp=True)
    total = embedding = routed = mtp = 0
    for t in inv:
        p = t.num_params
        if t.name.startswith("mtp."):
            mtp += p
            continue
        total += p
        if t.name == "embed.weight":
            embedding += p
        elif ".ffn.experts." in t.name:
            routed += p
    D = config["hidden_size"]
    I = config["moe_intermediate_size"]
    per_expert = 3 * D * I
    L = config["num_hidden_layers"]
    k = config["num_experts_per_tok"]
    active = total - embedding - routed + L * k * per_expert
    return {
        "total": total,
        "active": active,
        "active_with_embedding": active + embedding,
        "mtp": mtp,
        "embedding": embedding,
        "routed_experts": routed,
        "per_expert": per_expert,
    }
