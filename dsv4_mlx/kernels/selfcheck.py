"""`dsv4 check`: are the GPU kernels right on this machine?

The Metal kernels are written without a Mac to run them on (compiled as C++ against a
stand-in header, checked in a C++ emulation); the CUDA twins run on a lent GPU. A kernel that
fails to build falls back to the ops path with a warning, but one that builds and computes
something wrong would not. This check runs a model (by default its first four layers: window,
window, CSA, HCA in Flash's schedule) over a prompt long enough for the CSA layers to pass
the indexer's top-k, prefill then a few decode steps, once with every kernel family on the
plain-ops path and once with the kernels as dispatched, and compares the logits. If they
disagree, each family is then switched on alone to name the culprit; its override variable
(e.g. ``DSV4_MHC_KERNEL=ops``) then keeps it on the ops path.

Tolerance: the largest logit difference relative to the largest logit, at most `TOLERANCE`
for the model's dtype (bf16 rounding after reordered sums moves logits by a few 1e-3 of their
range; a wrong kernel moves them by their whole range).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np

from . import (attention, dispatch, embed, fp4_round, gemv, kv_store, mhc, norm_rope, qgemv, router,
               swiglu)

#: kernel family -> the variable that forces it onto the ops path
FAMILIES: Dict[str, str] = {
    "lightning indexer": dispatch.ENV_VAR,
    "mHC": mhc.ENV_VAR,
    "decode attention": attention.ENV_VAR,
    "MoE router": router.ENV_VAR,
    "KV store": kv_store.ENV_VAR,
    "indexer query FP4": fp4_round.ENV_VAR,
    "one-token projections": gemv.ENV_VAR,
    "norm + RoPE": norm_rope.ENV_VAR,
    "SwiGLU": swiglu.ENV_VAR,
    "embedding": embed.ENV_VAR,
    "8-bit head GEMV": qgemv.ENV_VAR,
}
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


@dataclass
class FamilyResult:
    family: str
    env_var: str
    status: str  # "ok", "mismatch", "error"
    rel_diff: Optional[float]
    detail: str = ""


def _set_env(values: Dict[str, Optional[str]]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def _env(values: Dict[str, Optional[str]]):
    """The variables set (None: unset) inside the block, as they were after it."""
    old = {k: os.environ.get(k) for k in values}
    try:
        _set_env(values)
        yield
    finally:
        _set_env(old)


def _logits(model, ids: List[int], decode: int) -> np.ndarray:
    """Logits (fp32 numpy) of the prompt's last token, prefilled with all but the last
    `decode` ids, then of each of those fed as one decode step (fixed tokens, not sampled: a
    near-tie picked differently by the two paths must not make them read different text)."""
    cache = model.make_cache()[: len(model.layers)]  # (the layers being checked)
    n = len(ids) - decode
    out = [model(mx.array([ids[:n]]), cache=cache, last_only=True)[0, -1]]
    for t in ids[n:]:
        out.append(model(mx.array([[t]]), cache=cache)[0, -1])
    out = [x.astype(mx.float32) for x in out]
    mx.eval(out)
    return np.stack([np.array(x) for x in out])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def prompt_length(args, layers: Optional[int] = None) -> int:
    """Tokens enough for every CSA layer (of the first `layers`) to hold more compressed
    entries than the top-k."""
    ratios = [r for r in args.compress_ratios[: layers or args.num_hidden_layers] if r]
    csa = min(ratios) if ratios else 4
    return csa * args.index_topk + 4 * csa + 8


def check(model, layers: Optional[int] = 4, decode: int = 4, seed: int = 0,
          families: Optional[Dict[str, str]] = None,
          progress: Optional[Callable[[str], None]] = None) -> dict:
    """Kernels vs the ops path on `model` (its first `layers` layers; None: all). Returns
    {"backend", "dtype", "tolerance", "prompt_tokens", "rel_diff", "ok", "families": [...]}
    (families listed only when the whole-model comparison fails). `progress(what)` is told
    each run as it starts (the first on a new machine compiles every kernel it meets: minutes
    on a GPU whose kernel cache is cold)."""
    families = dict(FAMILIES if families is None else families)
    say = progress or (lambda what: None)
    with _env({v: None for v in FAMILIES.values()}):  # what runs when nothing is overridden
        backend = dispatch.select_backend()
    dtype = str(model.embed.scales.dtype if hasattr(model.embed, "scales")
                else model.embed.weight.dtype).replace("mlx.core.", "")
    tol = TOLERANCE.get(dtype, 5e-2)
    report = {"backend": backend, "dtype": dtype, "tolerance": tol, "prompt_tokens": 0,
              "rel_diff": None, "ok": True, "families": [], "fallbacks": {}}
    if backend == "ops":
        report["note"] = "no GPU kernels on this device: the plain-ops path runs; nothing to check"
        return report
    all_layers = model.layers
    if layers is not None and layers < len(all_layers):
        model.layers = all_layers[:layers]
    try:
        n = prompt_length(model.args, len(model.layers))
        rng = np.random.default_rng(seed)
        ids = rng.integers(2, model.args.vocab_size, n + decode).tolist()
        report["prompt_tokens"] = n
        # (the opt-in mxfp8 GEMV, if set when the model was loaded, is off in the baseline too)
        off = {**{v: "ops" for v in families.values()}, qgemv.MX_ENV_VAR: "ops"}
        on = {v: None for v in families.values()}
        say(f"the plain-ops path ({n:,}-token prompt + {decode} decode steps)")
        with _env(off):
            want = _logits(model, ids, decode)
        say(f"the {backend} kernels (the same tokens)")
        try:
            with _env(on):
                got = _logits(model, ids, decode)
            report["rel_diff"] = _rel(got, want)
            report["ok"] = report["rel_diff"] <= tol
        except Exception as e:  # a kernel that raises is as broken as a wrong one
            report["ok"], report["error"] = False, f"{type(e).__name__}: {e}"[:200]
        # kernels that failed to build ran on the ops path (with a warning): say which
        report["fallbacks"] = {str(k): v for k, v in dispatch._broken.items()}
        if report["ok"]:
            return report
        for i, (name, var) in enumerate(families.items()):
            say(f"the {name} kernels alone ({i + 1} of {len(families)})")
            try:
                with _env(dict(off, **{var: None})):
                    r = _rel(_logits(model, ids, decode), want)
                res = FamilyResult(name, var, "ok" if r <= tol else "mismatch", r)
            except Exception as e:  # a kernel that raises is as broken as a wrong one
                res = FamilyResult(name, var, "error", None, f"{type(e).__name__}: {e}"[:200])
            report["families"].append(asdict(res))
        return report
    finally:
        model.layers = all_layers


__all__ = ["check", "FAMILIES", "TOLERANCE", "prompt_length"]
