"""The 8-bit head GEMV kernel (`kernels.qgemv`, opt-in) vs MLX's quantized matmul, one token, on
a GPU.

    python bench/qgemv.py [--calls 16] [--shapes 129280x4096,129280x7168,32768x1024]

Affine 8-bit weights (group 64) with fp32 scales and biases and fp32 x, as the model's head
(`Model.sanitize`); median ms a call over 20 evaluations of `--calls` calls each (queued back
to back), the bytes a call reads (codes, scales, biases) per second, and that against a copy's
bandwidth measured in the same run. The kernel becomes the default only if it is faster here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_store import timed  # noqa: E402  (median ms a call of fn(i), i < calls)

from dsv4_mlx.bench import copy_bandwidth  # noqa: E402
from dsv4_mlx.kernels import dispatch  # noqa: E402
from dsv4_mlx.kernels import qgemv as kq  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--shapes", default="129280x4096,129280x7168,32768x1024")
    a = ap.parse_args()
    backend = dispatch.select_backend(kq.ENV_VAR, "auto")
    if backend == "ops":
        sys.exit("no GPU backend: this benchmark compares the GPU kernel with MLX's matmul")
    bw = copy_bandwidth()
    print(f"{mx.default_device()} ({backend}): copy bandwidth {bw:.0f} GB/s; {a.calls} calls an "
          f"evaluation")
    print(f"{'O x K':>14} {'MB':>7} {'MLX ms':>8} {'kernel ms':>10} {'kernel/MLX':>10} "
          f"{'MLX GB/s':>9} {'kernel GB/s':>11} {'max |diff|':>10}")
    rng = np.random.default_rng(0)
    for shape in a.shapes.split(","):
        O, K = (int(v) for v in shape.split("x"))
        W = mx.random.normal((O, K)) / np.sqrt(K)
        w, s, b = mx.quantize(W, group_size=64, bits=8, mode="affine")
        del W
        xs = [mx.array(rng.standard_normal((1, 1, K)).astype(np.float32)) for _ in range(a.calls)]
        mx.eval(w, s, b, xs)
        nbytes = w.nbytes + s.nbytes + b.nbytes

        def f_mlx(i):
            return mx.quantized_matmul(xs[i], w, s, b, transpose=True, group_size=64, bits=8,
                                       mode="affine")

        def f_ker(i):
            return kq.qgemv_kernel(w, s, b, xs[i], 64, backend=backend)

        diff = float(mx.abs(f_ker(0) - f_mlx(0)).max())
        t_mlx, t_ker = timed(f_mlx, a.calls), timed(f_ker, a.calls)
        print(f"{shape:>14} {nbytes / 1e6:>7.0f} {t_mlx:>8.4f} {t_ker:>10.4f} "
              f"{t_ker / t_mlx:>10.2f} {nbytes / t_mlx / 1e6:>9.0f} {nbytes / t_ker / 1e6:>11.0f} "
              f"{diff:>10.2e}")
        w = s = b = xs = None  # (rebound, not deleted: the closures name them)
        mx.clear_cache()


if __name__ == "__main__":
    main()
