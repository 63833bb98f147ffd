"""Where a decode step's time goes: building the graph (Python) vs evaluating it, and what the
generation loop (mlx-lm's `generate_step`, which builds step t+1 while step t runs) gets.

    python bench/decode_profile.py --preset flash --layers 4 --experts 64 --context 4096
    python bench/decode_profile.py ... --compare DSV4_ATTN_KERNEL   # one kernel family off / on
    python bench/decode_profile.py ... --compare DSV4_COMPILE_DECODE  # plain / compiled parts
    python bench/decode_profile.py ... --compare DSV4_DEVICE_SCALARS --values 0,1

Prints, per mode, the median milliseconds of one decode step over `--steps` tokens, and the
primitives of one step split into views (no kernel) and the rest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import build  # noqa: E402

from dsv4_mlx.bench import count_primitives, decode_steps, pipelined_step_times  # noqa: E402
from dsv4_mlx.model.model import COMPILE_ENV  # noqa: E402

VIEWS = {"Reshape", "Transpose", "ExpandDims", "Broadcast", "BroadcastAxes", "Unflatten", "Flatten",
         "Squeeze", "Slice", "View float32", "View uint32", "View bfloat16", "View uint8", "Copy"}


def decode_sync(model, cache, y, steps):
    """(last token, build ms, eval ms) of `steps` steps (`dsv4 bench`'s step loop)."""
    _, build, evals, y = decode_steps(model, cache, y, steps)
    return y, [1e3 * b for b in build], [1e3 * e for e in evals]


def decode_pipelined(model, cache, y, steps):
    """ms a token of mlx-lm's pipelined loop over `steps` tokens (`dsv4 bench`'s
    `pipelined_step_times`; the first, which includes `y`'s own step, is left out)."""
    return [1e3 * t for t in pipelined_step_times(model, cache, y, steps - 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--compare", default=None,
                    help="a kernel override variable (e.g. DSV4_ATTN_KERNEL): time it =ops vs auto")
    ap.add_argument("--values", default=None,
                    help="with --compare: the variable's two values to time (e.g. 0,1), "
                         "instead of ops vs auto")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    model, args = build(a.preset, a.layers, a.experts)
    tokens = [(7 * i + 3) % args.vocab_size for i in range(a.context + 1)]
    cache = model.make_cache()
    for p in range(0, a.context, 2048):
        mx.eval(model(mx.array([tokens[p: p + 2048]]), cache=cache, last_only=True), [c.state for c in cache])
    y = mx.array(tokens[a.context])
    print(f"device {mx.default_device()}, {a.preset} dims, {a.layers} layers, {a.experts} experts, "
          f"context {a.context}")
    variants = [("as is", None)]
    if a.compare == COMPILE_ENV:  # the same model and state, plain vs compiled decode parts
        variants = [("plain", "0"), ("compiled", "1")]
    elif a.compare and a.values:  # the same model and state, the variable at two values
        variants = [(f"{a.compare}={v}", v) for v in a.values.split(",")]
    elif a.compare:  # the same model and state with one kernel family forced to the ops path
        variants = [(f"{a.compare}=ops", "ops"), ("kernels (auto)", None)]
    def use(val):
        if a.compare is None:
            return
        if a.compare == COMPILE_ENV:
            model.set_compile_decode(val == "1")  # (traced again by the warm-up steps below)
            return
        # "auto" rather than unset: an opt-in family (DSV4_MX_GEMV_KERNEL) is off when unset
        os.environ[a.compare] = "auto" if val is None else val

    counts = {}
    for name, val in variants:  # counted at one and the same position
        use(val)
        if a.compare == COMPILE_ENV and val == "1":  # (the first step runs plain, the second traces)
            for _ in range(2):
                count_primitives(model, cache)
        prims = counts[name] = count_primitives(model, cache)
        views = sum(v for k, v in prims["by_op"].items() if k in VIEWS)
        print(f"[{name}] primitives per step {prims['total']} ({prims['per_layer']:.1f}/layer): "
              f"views {views}, others {prims['total'] - views}")
        print(f"[{name}] by op:", ", ".join(f"{k} {v}" for k, v in prims["by_op"].items()))
    rows = []
    for rnd in range(a.rounds):
        for name, val in variants:
            use(val)
            prims = counts[name]
            y, *_ = decode_sync(model, cache, y, 3)  # this variant's kernels compiled
            y, b, e = decode_sync(model, cache, y, a.steps)
            tot = [x + z for x, z in zip(b, e)]
            pt = decode_pipelined(model, cache, y, a.steps)
            rows.append((rnd, name, prims["total"], statistics.median(b), statistics.median(e),
                         statistics.median(tot), statistics.median(pt)))
    print(f"{'round':>5} {'variant':>28} {'prims':>6} {'build ms':>9} {'eval ms':>8} {'sync ms':>8} "
          f"{'sync tok/s':>10} {'pipelined ms':>13} {'pipelined tok/s':>15}")
    for rnd, name, p, b, e, t, pt in rows:
        print(f"{rnd:>5} {name:>28} {p:>6} {b:>9.2f} {e:>8.2f} {t:>8.2f} {1e3 / t:>10.1f} {pt:>13.2f} "
              f"{1e3 / pt:>15.1f}")

if __name__ == "__main__":
    main()
