"""The mHC pre step (`kernels.mhc.hc_pre_kernel`) vs the ops path, one decode token, on a GPU.

    python bench/mhc.py [--tg 512] [--sink 2,1,0] [--reg 1,0] [--iters 20] [--calls 16]

Flash sizes (4 streams x 4096, 20 Sinkhorn rounds), bf16 streams; median ms a call over 20
evaluations of `--calls` calls each (wall time: kernels queued back to back). Timed apart, in
one process: the ops path; the mix projection (`flatten(X) . fn^T`, 24 x 16384 fp32) by this
project's GEMV kernel and by MLX's matmul (what 94ebe39 used); the pre kernel alone on given
logits for each threadgroup size x Sinkhorn placement (SINK 2: every warp, 1: warp 0, 0:
thread 0) x register use (REG); and the whole step as the model runs it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import mhc as km
from dsv4_mlx.kernels.gemv import matvec_flat
from dsv4_mlx.model import mhc as ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_store import timed  # noqa: E402  (median ms a call of fn(i), i < calls)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--tg", default=str(km.PRE_TG))
    ap.add_argument("--sink", default="2,1,0")
    ap.add_argument("--reg", default="1,0")
    ap.add_argument("--iters", default="20",
                    help="Sinkhorn rounds, comma list (20 is the model's; fewer separate their "
                         "cost)")
    a = ap.parse_args()
    backend = dispatch.select_backend(km.ENV_VAR)
    if backend == "ops":
        sys.exit("no GPU backend: this benchmark compares the GPU kernel with the ops path")
    n, D, iters = 4, 4096, 20
    rng = np.random.default_rng(0)
    Xs = [mx.array(rng.standard_normal((1, 1, n, D)).astype(np.float32)).astype(mx.bfloat16)
          for _ in range(a.calls)]
    fn = mx.array((rng.standard_normal(((2 + n) * n, n * D)) / np.sqrt(n * D)).astype(np.float32))
    scale = mx.array(rng.uniform(0.5, 2, 3).astype(np.float32))
    base = mx.array(rng.standard_normal((2 + n) * n).astype(np.float32))
    mx.eval(Xs, fn, scale, base)

    def f_ops(i):
        pre, post, comb = ops.hc_params(Xs[i], fn, scale, base, n, iters, 1e-6, 1e-6)
        return ops.collapse(Xs[i], pre), post, comb

    t_ops = timed(f_ops, a.calls)
    print(f"{mx.default_device()} ({backend}): hc_pre, {n} x {D}, {iters} rounds, {a.calls} calls "
          f"an evaluation; ops {t_ops:.4f} ms a call")
    # the mix projection alone: this project's GEMV kernel, MLX's matmul
    t_gemv = timed(lambda i: matvec_flat(fn, Xs[i]), a.calls)
    t_mlx = timed(lambda i: fn @ Xs[i].reshape(n * D, 1).astype(mx.float32), a.calls)
    print(f"mix projection: GEMV kernel {t_gemv:.4f} ms a call, MLX matmul {t_mlx:.4f} ms")
    mixes = [matvec_flat(fn, X) for X in Xs]
    mx.eval(mixes)
    defaults = (km.PRE_TG, km.PRE_SINK, km.PRE_REG)
    for it in [int(v) for v in a.iters.split(",")]:
        for tg in [int(v) for v in a.tg.split(",")]:
            for sink in [int(v) for v in a.sink.split(",")]:
                for reg in [bool(int(v)) for v in a.reg.split(",")]:
                    km.PRE_TG, km.PRE_SINK, km.PRE_REG = tg, sink, reg
                    f_pre = lambda i: km.hc_pre_from_mix(  # noqa: E731
                        Xs[i], mixes[i], scale, base, it, 1e-6, 1e-6, backend=backend)
                    diff = "" if it != iters else ", max |diff| %.2e" % max(
                        float(mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max())
                        for g, w in zip(f_pre(0), f_ops(0)))
                    t = timed(f_pre, a.calls)
                    print(f"pre kernel alone TG {tg:4d} SINK {sink} REG {int(reg)}, {it:2d} rounds: "
                          f"{t:.4f} ms a call{diff}")
    km.PRE_TG, km.PRE_SINK, km.PRE_REG = defaults
    f_ker = lambda i: km.hc_pre_kernel(Xs[i], fn, scale, base, iters, 1e-6, 1e-6,  # noqa: E731
                                       backend=backend)
    t = timed(f_ker, a.calls)
    print(f"whole step (GEMV + pre kernel, TG {km.PRE_TG} SINK {km.PRE_SINK} REG "
          f"{int(km.PRE_REG)}): {t:.4f} ms a call ({t_ops / t:.2f}x the ops path)")

if __name__ == "__main__":
    main()
