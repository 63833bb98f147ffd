"""Model configuration (spec §2).

`ModelArgs.from_dict(config.json)` reads the published `config.json` of DeepSeek-V4-Flash and
-Pro (and any smaller config with the same keys). Names follow `config.json`, not the official
runtime's `inference/config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mlx_lm.models.base import BaseModelArgs


class ConfigError(ValueError):
    """A config.json that is not a usable DeepSeek-V4 config."""


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "deepseek_v4"
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    compress_ratios: List[int] = field(default_factory=list)
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: Any = 1
    tie_word_embeddings: bool = False
    quantization: Optional[Dict[str, Any]] = None
    quantization_config: Optional[Dict[str, Any]] = None
    expert_dtype: Optional[str] = None

    def __post_init__(self):
        if self.model_type not in ("deepseek_v4",):
            raise ConfigError(
                f"model_type is {self.model_type!r}; this runner implements 'deepseek_v4' only"
            )
        L = self.num_hidden_layers
        if not self.compress_ratios:
            raise ConfigError("config.json has no 'compress_ratios' (the per-layer schedule)")
        self.compress_ratios = [int(r) for r in self.compress_ratios]
        if len(self.compress_ratios) < L + self.num_nextn_predict_layers:
            raise ConfigError(
                f"'compress_ratios' has {len(self.compress_ratios)} entries; "
                f"expected num_hidden_layers + num_nextn_predict_layers = "
                f"{L + self.num_nextn_predict_layers}"
            )
        if any(r < 0 for r in self.compress_ratios):
            raise ConfigError("'compress_ratios' entries must be >= 0")
        if self.num_key_value_heads != 1:
            raise ConfigError("DeepSeek-V4 has exactly one KV head (num_key_value_heads: 1)")
        if self.n_shared_experts != 1:
            raise ConfigError("DeepSeek-V4 has exactly one shared expert")
        if self.num_attention_heads % self.o_groups:
            raise ConfigError("num_attention_heads must be a multiple of o_groups")
        if self.scoring_func != "sqrtsoftplus":
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > min(
            self.head_dim, self.index_head_dim
        ):
            raise ConfigError("qk_rope_head_dim must be even and fit in head_dim/index_head_dim")

    # -- the schedule (spec §2.2) ---------------------------------------------------------
    def layer_ratio(self, layer: int) -> int:
        """Compression rate of main layer `layer`: 0 window only, 4 CSA, other m>0 HCA-style."""
        return self.compress_ratios[layer]

    def mtp_ratio(self, i: int = 0) -> int:
        return self.compress_ratios[self.num_hidden_layers + i]

    @staticmethod
    def kind(ratio: int) -> str:
        if ratio == 0:
            return "window"
        if ratio == 4:
            return "csa"
        return "hca"

    @property
    def layer_kinds(self) -> List[str]:
        return [self.kind(self.layer_ratio(i)) for i in range(self.num_hidden_layers)]

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim
