"""The conversion plan: every output tensor, its format, size and output shard, computed from
the source's safetensors headers (or from `config.json` alone for a dry run) before anything
is written. Source formats are decided by dtype (spec §3.1), never by name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .recipes import QUANT, Rule, choose

SOURCE_OF_DTYPE = {"F8_E4M3": "fp8", "I8": "fp4", "BF16": "bf16", "F32": "f32", "I64": "i64", "I32": "i64"}
SCALE_DTYPES = ("F8_E8M0", "F32")
DEFAULT_SHARD_BYTES = 5 * 2**30

_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


class PlanError(ValueError):
    """The source cannot be converted (one clear sentence)."""


@dataclass
class Item:
    """One logical weight and the output tensors it becomes."""

    path: str  # MLX module path (quantized / stacked) or the tensor name
    source: str  # fp8 | fp4 | bf16 | f32 | i64
    fmt: str
    members: List[str]  # source weight names (E of them for stacked experts)
    scales: List[Optional[str]]
    shape: Tuple[int, ...]  # logical shape (stacked: [E, out, in])
    outputs: List[Tuple[str, str, Tuple[int, ...]]] = field(default_factory=list)
    group_size: int = 0

    @property
    def params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def out_bytes(self) -> int:
        return sum(_nbytes(dt, shp) for _, dt, shp in self.outputs)

    @property
    def exact(self) -> bool:
        from .recipes import EXACT

        return self.fmt == "keep" or (self.source, self.fmt) in EXACT


_ITEMSIZE = {"U32": 4, "U8": 1, "BF16": 2, "F32": 4, "I32": 4, "I64": 8, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1}


def _nbytes(dtype: str, shape) -> int:
    n = _ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


@dataclass
class Plan:
    items: List[Item]
    shards: List[List[int]]  # item indices per output shard
    dropped: List[str]
    warnings: List[str]

    @property
    def out_bytes(self) -> int:
        return sum(i.out_bytes for i in self.items)

    @property
    def params(self) -> int:
        return sum(i.params for i in self.items)

    def bits_per_weight(self, quantized_only: bool = False) -> float:
        items = [i for i in self.items if not quantized_only or i.fmt in QUANT]
        p = sum(i.params for i in items)
        return 8.0 * sum(i.out_bytes for i in items) / max(p, 1)

    def shard_names(self) -> List[str]:
        n = len(self.shards)
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def fingerprint(self) -> str:
        desc = [(i.path, i.fmt, i.members, i.outputs) for i in self.items]
        return hashlib.sha256(json.dumps([desc, self.shards]).encode()).hexdigest()[:16]

    def quantization_config(self) -> Dict:
        """mlx-lm's `quantization` dict: a global default plus every quantized module."""
        q: Dict = dict(QUANT["mxfp8"])
        for it in self.items:
            if it.fmt in QUANT:
                q[it.path] = dict(QUANT[it.fmt], group_size=it.group_size)
        return q


def _outputs(path: str, name: str, fmt: str, shape: Tuple[int, ...], source: str):
    """Output tensors (name, dtype, shape) of one logical weight."""
    if fmt in QUANT:
        q = QUANT[fmt]
        *lead, out, inp = shape
        gs = q["group_size"]
        if fmt.startswith("affine") and inp % gs:
            gs = 32
        if inp % gs or inp * q["bits"] % 32:
            raise PlanError(f"{path}: input width {inp} does not fit {fmt} groups of {gs}")
        w = (path + ".weight", "U32", (*lead, out, inp * q["bits"] // 32))
        if fmt.startswith("mx"):
            return [w, (path + ".scales", "U8", (*lead, out, inp // gs))], gs
        s = (*lead, out, inp // gs)
        return [w, (path + ".scales", "BF16", s), (path + ".biases", "BF16", s)], gs
    if fmt == "bf16" or source in ("fp8", "fp4"):
        return [(name, "BF16", shape)], 0
    dtype = {"bf16": "BF16", "f32": "F32", "i64": "I32"}[source]
    return [(name, dtype, shape)], 0


def build_plan(
    listing: Dict[str, Tuple[str, Tuple[int, ...]]],
    config: Dict,
    rules: Sequence[Rule],
    keep_mtp: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Plan:
    """`listing`: source tensor name -> (safetensors dtype, shape)."""
    n_mtp = int(config.get("num_nextn_predict_layers", 0) or 0)
    dspark = any(k.startswith("dspark_") for k in config)
    warnings: List[str] = []
    dropped: List[str] = []
    if dspark and any(k.startswith("mtp.") for k in listing):
        warnings.append("the DSpark drafter stages (mtp.*) of this checkpoint are not supported and are skipped")
    weights: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    scales: Dict[str, str] = {}
    for name, (dtype, shape) in listing.items():
        m = re.match(r"^mtp\.(\d+)\.", name)
        if m and (not keep_mtp or dspark or int(m.group(1)) >= n_mtp
                  or name.endswith((".embed.weight", ".head.weight"))):
            dropped.append(name)
            continue
        if name.endswith(".scale"):
            if dtype not in SCALE_DTYPES:
                raise PlanError(f"{name} has dtype {dtype}; scales must be F8_E8M0 or F32")
            scales[name[: -len(".scale")] + ".weight"] = name
            continue
        if dtype not in SOURCE_OF_DTYPE:
            raise PlanError(f"{name} has dtype {dtype}, which no DeepSeek-V4 checkpoint uses")
        weights[name] = (dtype, tuple(shape))
    block = int((config.get("quantization_config") or {}).get("weight_block_size", [128, 128])[0])
    for w, s in scales.items():
        if w not in weights:
            raise PlanError(f"{s} has no weight {w}")
        dtype, (out, inp) = weights[w][0], weights[w][1]
        want = {"F8_E4M3": (-(-out // block), -(-inp // block)), "I8": (out, inp * 2 // 32)}.get(dtype)
        if want is not None and tuple(listing[s][1]) != want:
            raise PlanError(f"{s} has shape {list(listing[s][1])}, but {w} {[out, inp]} needs {list(want)}")

    items: List[Item] = []
    experts: Dict[str, Dict[int, str]] = {}
    for name, (dtype, shape) in weights.items():
        source = SOURCE_OF_DTYPE[dtype]
        if source in ("fp8", "fp4") and name not in scales:
            raise PlanError(f"{name} is {dtype} but has no '.scale' tensor")
        e = _EXPERT.match(name)
        if e:
            experts.setdefault(f"{e.group(1)}.{e.group(3)}", {})[int(e.group(2))] = name
            continue
        logical = (shape[0], shape[1] * 2) if source == "fp4" else shape
        path = name[: -len(".weight")] if name.endswith(".weight") else name
        fmt = choose(rules, path, source) if name.endswith(".weight") else "keep"
        if len(logical) != 2 and fmt in QUANT:
            fmt = "keep"
        outs, gs = _outputs(path, name, fmt, logical, source)
        items.append(Item(path, source, fmt, [name], [scales.get(name)], logical, outs, gs))
    E = int(config.get("n_routed_experts", 0))
    for path, per in experts.items():
        if sorted(per) != list(range(E)):
            missing = sorted(set(range(E)) - set(per))[:3]
            raise PlanError(f"{path}: expert tensors missing (e.g. experts {missing})")
        names = [per[i] for i in range(E)]
        kinds = {weights[n] for n in names}
        if len(kinds) != 1:
            raise PlanError(f"{path}: experts differ in dtype or shape")
        dtype, shape = kinds.pop()
        source = SOURCE_OF_DTYPE[dtype]
        logical = (E, shape[0], shape[1] * 2 if source == "fp4" else shape[1])
        fmt = choose(rules, path, source)
        outs, gs = _outputs(path, path + ".weight", fmt, logical, source)
        items.append(Item(path, source, fmt, names, [scales.get(n) for n in names], logical, outs, gs))

    items.sort(key=lambda it: _order_key(it.path))
    shards: List[List[int]] = [[]]
    size = 0
    for i, it in enumerate(items):
        if shards[-1] and size + it.out_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += it.out_bytes
    return Plan(items, shards, dropped, warnings)


def _order_key(path: str):
    m = re.match(r"^(layers|mtp)\.(\d+)\.(.*)$", path)
    if m:
        return (1 if m.group(1) == "layers" else 3, int(m.group(2)), m.group(3))
    return (0 if path.startswith("embed") else 2, 0, path)


def listing_from_inventory(config: Dict) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """The published layout of `config` without any file (for --dry-run)."""
    from ..model.inventory import tensor_inventory

    return {t.name: (t.dtype, tuple(t.shape)) for t in tensor_inventory(config)}
