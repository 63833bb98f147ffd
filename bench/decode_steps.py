"""Decode step by step on a growing context: per-step time, and which kernel family costs it.

    python bench/decode_steps.py [--preset flash] [--layers 4] [--experts 256] [--context 2048]
                                 [--steps 16] [--bisect]

Builds the random-weight model of `gpu_decode.py`, prefills `--context` tokens, then decodes
`--steps` greedy tokens one at a time (each built, then evaluated), printing each step's build
and evaluation time and the sizes of the dispatch caches (launches, kernel objects, indexer
plans): a cache that grows every step, or a step far slower than its neighbours, is a kernel
rebuilt or a probe run at every new shape (the context grows by one token a step, a CSA
layer's entries by one every 4). Then the same steps again from the same state, timed (what
`dsv4 bench` reports: the first pass compiles what is new). With ``--bisect``, the same again with each kernel family
sent to the ops path in turn (its environment variable set to ``ops``), from the same state:
the family whose removal restores the speed is the one to look at. Diagnostic, not a
benchmark table: `dsv4 bench` / `gpu_decode.py` measure decode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_decode import build  # noqa: E402

from dsv4_mlx.bench import count_primitives, decode_steps, fixed_tokens  # noqa: E402
from dsv4_mlx.cache import restore, snapshot  # noqa: E402
from dsv4_mlx.kernels import dispatch  # noqa: E402
from dsv4_mlx.kernels import indexer as ki  # noqa: E402
from dsv4_mlx.kernels.selfcheck import FAMILIES  # noqa: E402


def cache_sizes() -> str:
    return (f"launches {len(dispatch._launches)} kernels {len(dispatch._kernels)} "
            f"plans {len(ki._plans)} probed {len(dispatch._ok)}")


def _show(i: int, build_s: float, eval_s: float) -> None:
    print(f"  step {i:>3}: build {1000 * build_s:7.2f} ms  eval {1000 * eval_s:8.2f} ms  "
          f"{cache_sizes()}", flush=True)


def steps(model, cache, y, n: int, verbose: bool):
    """[(build ms, eval ms)] of `n` steps (`dsv4 bench`'s step loop)."""
    _, build, evals, _ = decode_steps(model, cache, y, n, _show if verbose else None)
    return [(1000 * b, 1000 * e) for b, e in zip(build, evals)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--bisect", action="store_true")
    a = ap.parse_args()
    model, args = build(a.preset, a.layers, a.experts)
    print(f"{mx.default_device()}: {a.preset} dims, {a.layers} layers, {a.experts} experts, "
          f"context {a.context}", flush=True)
    tokens = fixed_tokens(a.context + 1, None, args.vocab_size)
    cache = model.make_cache()
    for p in range(0, a.context, 2048):
        logits = model(mx.array([tokens[p:min(a.context, p + 2048)]]), cache=cache, last_only=True)
        mx.eval(logits, [c.state for c in cache])
    y0 = mx.argmax(logits[0, -1])
    mx.eval(y0)
    print(f"prefilled; {cache_sizes()}", flush=True)
    # as `dsv4 bench` does at a frontier: count the step's primitives, two discarded steps,
    # then the timed steps from the restored state
    prims = count_primitives(model, cache)
    print(f"primitives a step {prims['total']} ({prims['per_layer']:.1f} a layer)", flush=True)
    snap = snapshot(cache)
    y = y0
    for _ in range(2):
        y = mx.argmax(model(y.reshape(1, 1), cache=cache)[0, -1])
        mx.eval(y)
    cache[:] = restore(snap)
    print(f"two discarded steps; {cache_sizes()}", flush=True)
    print("first pass (every step; a spike is a first use: compilation):", flush=True)
    first = steps(model, cache, y0, a.steps, True)
    cache[:] = restore(snap)
    rows = [("first pass", first), ("as is", steps(model, cache, y0, a.steps, False))]
    if a.bisect:
        for fam, var in FAMILIES.items():
            old = os.environ.get(var)
            os.environ[var] = "ops"
            try:
                cache[:] = restore(snap)
                steps(model, cache, y0, a.steps, False)  # (untimed: this path's first use)
                cache[:] = restore(snap)
                rows.append((f"{fam} -> ops", steps(model, cache, y0, a.steps, False)))
            finally:
                if old is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = old
        cache[:] = restore(snap)
        rows.append(("as is, again", steps(model, cache, y0, a.steps, False)))
    print(f"\n{'variant':<32} {'build med':>10} {'eval med':>10} {'eval max':>10} {'sum ms':>10}"
          f" {'steps':>6}")
    for name, r in rows:
        b = [x[0] for x in r]
        e = [x[1] for x in r]
        print(f"{name:<32} {statistics.median(b):>10.2f} {statistics.median(e):>10.2f} "
              f"{max(e):>10.2f} {sum(b) + sum(e):>10.1f} {len(r):>6}")
    print(cache_sizes())


if __name__ == "__main__":
    main()
