"""GPU time of one decode step (CUDA, Nsight Compute) against its wall time.

    python bench/decode_gpu_time.py --context 4096                       # wall time a step
    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file F.csv \\
        python bench/decode_gpu_time.py --context 4096 --profile          # kernels of N steps
    python bench/decode_gpu_time.py --parse-ncu F.csv --steps 5          # GPU time a step

The profiled steps sit between two marker kernels; the parse sums the kernel durations between
them, divides by the steps, and lists the kernels that take the time. If the GPU time of a
step is well below its wall time, the step is bound by launching and synchronising, not by
the GPU's work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_marker, cuda_profiler as _profiler, ncu_kernel_times  # noqa: E402


def run(a):
    from gpu_decode import build

    model, args = build(a.preset, a.layers, a.experts)
    tokens = [(7 * i + 3) % args.vocab_size for i in range(a.context + 1)]
    cache = model.make_cache()
    for p in range(0, a.context, 2048):
        mx.eval(model(mx.array([tokens[p: p + 2048]]), cache=cache, last_only=True),
                [c.state for c in cache])
    y = mx.array(tokens[a.context])

    def step(y):
        y = mx.argmax(model(y.reshape(1, 1), cache=cache)[0, -1])
        mx.eval(y)
        return y

    for _ in range(3):  # kernels compiled
        y = step(y)
    if a.profile:
        _profiler(True)
        cuda_marker("begin")
        for _ in range(a.steps):
            y = step(y)
        cuda_marker("end")
        _profiler(False)
        return
    ms = []
    for _ in range(a.steps):
        t = time.perf_counter()
        y = step(y)
        ms.append(1e3 * (time.perf_counter() - t))
    print(f"{a.preset} dims, {a.layers} layers, {a.experts} experts, context {a.context}: "
          f"wall {statistics.median(ms):.2f} ms a step (median of {a.steps})")


def parse(path: str, steps: int, top: int):
    rows = ncu_kernel_times(path)
    inside, kept = False, []
    for _, name, us in rows:
        if "dsv4mark_begin" in name:
            inside = True
        elif "dsv4mark_end" in name:
            inside = False
        elif inside:
            kept.append((name, us))
    by = defaultdict(list)
    for name, us in kept:
        by[name.split("(")[0].split("<")[0][:60]].append(us)
    total = sum(us for _, us in kept)
    print(f"{len(kept) / steps:.1f} kernels a step, GPU time {total / steps / 1e3:.3f} ms a step "
          f"(sum of kernel durations under ncu, which locks the clocks to base; {steps} steps)")
    print(f"{'kernel':60s} {'us/step':>9s} {'n/step':>7s} {'share':>6s} {'median us/call':>15s} "
          f"{'max us/call':>12s}")
    for name, v in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"{name:60s} {sum(v) / steps:9.1f} {len(v) / steps:7.1f} {100 * sum(v) / total:5.1f}% "
              f"{statistics.median(v):15.1f} {max(v):12.1f}")
    # the longest single calls of one step (the first): which launch a kernel's time is in
    # (e.g. MLX's qmv: the head's one call vs the layers' projections)
    n = len(kept) // steps
    first = sorted(enumerate(kept[:n]), key=lambda iv: -iv[1][1])[:10]
    print("longest calls of the first step (position in the step, kernel, us):")
    for i, (name, us) in first:
        print(f"  {i:4d} {name.split('(')[0][:70]:70s} {us:8.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="(under ncu) bracket the steps")
    ap.add_argument("--parse-ncu", default=None, metavar="CSV")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    if a.parse_ncu:
        parse(a.parse_ncu, a.steps, a.top)
    else:
        run(a)


if __name__ == "__main__":
    main()
