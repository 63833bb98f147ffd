"""Conversion recipes: ordered (selector -> format) rules, so a new recipe is data, not code.

A rule's selector matches a logical weight by its MLX module path (regex, `name`) and/or by its
source format (`source`: fp8, fp4, bf16, f32, i64). The first matching rule gives the output
format:

* ``mxfp4``   e2m1 + one E8M0 scale per 32 inputs (MLX ``mode="mxfp4"``, 4.25 bits/weight)
* ``mxfp8``   e4m3 + one E8M0 scale per 32 inputs (MLX ``mode="mxfp8"``, 8.25 bits/weight)
* ``affine8`` / ``affine4``  MLX affine, group 64, bf16 scale and bias
* ``bf16``    dequantized bf16
* ``keep``    unchanged (BF16 stays BF16, F32 stays F32, I64 becomes int32)

FP4 -> mxfp4 and FP8 -> mxfp8 are repacks of the same bytes (bit-exact); FP4/FP8 -> bf16 is
exact too (every e2m1/e4m3 value times a power of two fits bf16). Anything else re-quantizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

FORMATS = ("mxfp4", "mxfp8", "affine8", "affine4", "bf16", "keep")
QUANT = {
    "mxfp4": dict(group_size=32, bits=4, mode="mxfp4"),
    "mxfp8": dict(group_size=32, bits=8, mode="mxfp8"),
    "affine8": dict(group_size=64, bits=8, mode="affine"),
    "affine4": dict(group_size=64, bits=4, mode="affine"),
}
EXACT = {("fp4", "mxfp4"), ("fp8", "mxfp8"), ("fp4", "bf16"), ("fp8", "bf16"), ("bf16", "bf16")}

EXPERTS = r"\.ffn\.experts\.w[123]$"
EMBED_HEAD = r"^(embed|head)$"


@dataclass(frozen=True)
class Rule:
    fmt: str
    name: Optional[str] = None  # regex on the module path
    source: Optional[str] = None  # fp8 | fp4 | bf16 | f32 | i64

    def matches(self, path: str, source: str) -> bool:
        if self.name is not None and not re.search(self.name, path):
            return False
        if self.source is not None and self.source != source:
            return False
        return True


RECIPES: Dict[str, List[Rule]] = {
    "mixed-4-8": [
        Rule("mxfp4", name=EXPERTS),
        Rule("affine8", name=EMBED_HEAD),
        Rule("mxfp8", source="fp8"),
        Rule("keep"),
    ],
    "q4-q8": [
        Rule("affine4", name=EXPERTS),
        Rule("affine8", name=EMBED_HEAD),
        Rule("affine8", source="fp8"),
        Rule("keep"),
    ],
    "bf16": [
        Rule("bf16", source="fp8"),
        Rule("bf16", source="fp4"),
        Rule("keep"),
    ],
}


def parse_override(text: str) -> Rule:
    """`PATTERN=FORMAT` -> a rule matching module paths by regex."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not PATTERN=FORMAT")
    pat, fmt = text.rsplit("=", 1)
    if fmt not in FORMATS:
        raise ValueError(f"override {text!r}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    try:
        re.compile(pat)
    except re.error as e:
        raise ValueError(f"override {text!r}: bad pattern ({e})") from None
    return Rule(fmt, name=pat)


def rules_for(recipe: str, overrides: Sequence[str] = ()) -> List[Rule]:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r} (one of {', '.join(RECIPES)})")
    return [parse_override(o) for o in overrides] + RECIPES[recipe]


def choose(rules: Sequence[Rule], path: str, source: str) -> str:
    for r in rules:
        if r.matches(path, source):
            fmt = r.fmt
            if source in ("f32", "i64") and fmt != "keep":
                return "keep"  # never quantize the small fp32/int tensors
            return fmt
    return "keep"
