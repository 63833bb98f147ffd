"""What `dsv4 info` reports: schedule, parameter counts, decode-state size (spec §2.2, §3.2, §5.3).

State sizes come from the real cache objects of the config (`LayerCache.nbytes_at`), the same
objects the model fills while generating; a test checks that their computed sizes equal the
bytes they hold after real runs.
"""

from __future__ import annotations

from typing import Dict

from ..cache import make_layer_caches
from .config import ModelArgs
from .inventory import parameter_counts
from .kv_formats import DEFAULT_KV_FORMAT

CONTEXTS = (4096, 32768, 131072, 1048576)


def state_bytes(args: ModelArgs, tokens: int, kv_format: str = DEFAULT_KV_FORMAT, itemsize: int = 2) -> int:
    return int(sum(c.nbytes_at(tokens, itemsize) for c in make_layer_caches(args, kv_format)))


def model_summary(args: ModelArgs, cfg: Dict, kv_format: str = DEFAULT_KV_FORMAT) -> Dict:
    caches = make_layer_caches(args, kv_format)
    itemsize = 2  # bf16 compute dtype (RoPE dims of the fp8 format; everything in bf16)
    counts = parameter_counts(cfg)
    contexts = sorted(set(CONTEXTS) | {int(args.max_position_embeddings)})
    ratios = [args.layer_ratio(i) for i in range(args.num_hidden_layers)]
    return {
        "num_layers": args.num_hidden_layers,
        "num_mtp_layers": args.num_nextn_predict_layers,
        "compress_ratios": list(args.compress_ratios),
        "layer_kinds": args.layer_kinds,
        "hca_rates": sorted({r for r in ratios if r not in (0, 4)}),
        "index_topk": args.index_topk,
        "parameters_total": counts["total"],
        "parameters_active": counts["active"],
        "parameters_mtp": counts["mtp"],
        "kv_format": kv_format,
        "state_bytes_per_token": sum(c.growth_per_token(itemsize) for c in caches),
        "state_bytes_at": {str(t): int(sum(c.nbytes_at(t, itemsize) for c in caches)) for t in contexts},
    }
