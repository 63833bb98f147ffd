"""Why `dsv4 bench`'s pipelined column (mlx-lm's `generate_step`) can sit near the one-step
figure while `decode_profile.py`'s gets ~1.7x more: one model and state, several loops, every
step's time printed (outliers vs a uniform slowdown), median and mean side by side.

    python bench/pipeline_probe.py --experts 64,256 --context 2048 --steps 48

Loops, each from the same state (a snapshot restored before each):
  sync      build a step's graph, evaluate it (`dsv4 bench`'s decode column)
  mlx-lm    `generate_step` (`dsv4 bench`'s pipelined column; runs on mlx-lm's own stream)
  own       the same pipelining by hand on the default stream: step t+1 built and queued
            (`mx.async_eval`) before step t's token is read
  own-new   `own` inside `mx.stream(new stream)` (what a stream other than the state's costs)
for the compiled decode parts off and on (`--compile 0,1`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import build  # noqa: E402

from dsv4_mlx.bench import decode_steps, pipelined_step_times  # noqa: E402
from dsv4_mlx.cache import restore, snapshot  # noqa: E402


def own_loop(model, cache, y, n):
    """Seconds between tokens of a hand-written pipelined loop (the first left out)."""
    def step(tok):
        logits = model(tok.reshape(1, 1), cache=cache)
        nxt = mx.argmax(logits[0, -1])
        mx.async_eval(nxt)
        return nxt

    times = []
    nxt = step(y)
    t = time.perf_counter()
    for _ in range(n + 1):
        cur = nxt
        nxt = step(cur)
        cur.item()
        t2 = time.perf_counter()
        times.append(t2 - t)
        t = t2
    mx.synchronize()
    return times[1:]


def show(name, times):
    ms = [1e3 * x for x in times]
    med, mean = statistics.median(ms), statistics.mean(ms)
    print(f"  {name:<8} median {med:6.2f} ms ({1e3 / med:6.1f} tok/s)  mean {mean:6.2f} ms "
          f"({1e3 / mean:6.1f} tok/s)  max {max(ms):6.2f}  steps: "
          + " ".join(f"{x:.1f}" for x in ms), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", default="64,256")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--compile", default="0,1")
    a = ap.parse_args()
    for E in [int(x) for x in a.experts.split(",")]:
        model, args = build(a.preset, a.layers, E)
        tokens = [(7 * i + 3) % args.vocab_size for i in range(a.context + 1)]
        cache = model.make_cache()
        for p in range(0, a.context, 2048):
            logits = model(mx.array([tokens[p: p + 2048]]), cache=cache, last_only=True)
            mx.eval(logits, [c.state for c in cache])
        y = mx.argmax(logits[0, -1])
        mx.eval(y)
        snap = snapshot(cache)
        other = mx.new_stream(mx.default_device())
        for comp in [int(x) for x in a.compile.split(",")]:
            model.set_compile_decode(bool(comp))
            print(f"{a.preset} dims, {a.layers} layers, {E} experts, context {a.context}, "
                  f"compiled decode {comp}, {mx.default_device()}", flush=True)
            # warm every loop once (traces, first-use compiles, new shapes), then time
            for timed in (False, True):
                cache = restore(snap)
                _, build_s, eval_s, _ = decode_steps(model, cache, y, a.steps)
                if timed:
                    print(f"  sync     build {1e3 * statistics.median(build_s):.2f} ms, eval "
                          f"{1e3 * statistics.median(eval_s):.2f} ms a step (medians)")
                    show("sync", [b + e for b, e in zip(build_s, eval_s)])
                cache = restore(snap)
                t = pipelined_step_times(model, cache, y, a.steps)
                if timed:
                    show("mlx-lm", t)
                cache = restore(snap)
                t = own_loop(model, cache, y, a.steps)
                if timed:
                    show("own", t)
                cache = restore(snap)
                with mx.stream(other):
                    t = own_loop(model, cache, y, a.steps)
                if timed:
                    show("own-new", t)
        del model, cache, snap
        mx.clear_cache()


if __name__ == "__main__":
    main()
