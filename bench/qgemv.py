"""The 8-bit GEMV kernel (`kernels.qgemv`) vs MLX's quantized matmul, one token, on a GPU.

    python bench/qgemv.py [--calls 16] [--affine OxK,...] [--mxfp8 OxK,...]

Affine 8-bit weights (group 64) with fp32 scales and biases and fp32 x, as the model's head
(`Model.sanitize`), and mxfp8 weights with bf16 x, as Flash's FP8 linears; median ms a call
over 20 evaluations of `--calls` calls each (queued back to back), the bytes a call reads
(codes, scales, biases) per second, and that against a copy's bandwidth measured in the same
run. On an H100 (2026-12-07) the head's variant was faster (now the default,
`DSV4_QGEMV_KERNEL`) and the mxfp8 one slower (opt-in, `DSV4_QGEMV_MXFP8_KERNEL`).
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

# Flash's FP8 linears a decode step runs (mxfp8 after `dsv4 convert`): wq_a, wq_b, wkv, wo_b,
# the shared expert's fused w1/w3 and its w2, the indexer's wq_b
FLASH_FP8 = "1024x4096,32768x1024,512x4096,4096x8192,4096x4096,4096x2048,8192x1024"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--affine", default="129280x4096,129280x7168",
                    help="affine 8-bit, group 64, fp32 scales and x (the head)")
    ap.add_argument("--mxfp8", default=FLASH_FP8,
                    help="mxfp8 (the FP8 linears), bf16 x: OxK list")
    a = ap.parse_args()
    backend = dispatch.select_backend(kq.ENV_VAR, "auto")
    if backend == "ops":
        sys.exit("no GPU backend: this benchmark compares the GPU kernel with MLX's matmul")
    bw = copy_bandwidth()
    print(f"{mx.default_device()} ({backend}): copy bandwidth {bw:.0f} GB/s; {a.calls} calls an "
          f"evaluation")
    print(f"{'mode':>7} {'O x K':>12} {'MB':>7} {'MLX ms':>8} {'kernel ms':>10} {'kernel/MLX':>10} "
          f"{'MLX GB/s':>9} {'kernel GB/s':>11} {'max |diff|':>10}")
    rng = np.random.default_rng(0)
    cases = [("affine", sh) for sh in a.affine.split(",") if sh] + \
        [("mxfp8", sh) for sh in a.mxfp8.split(",") if sh]
    for mode, shape in cases:
        O, K = (int(v) for v in shape.split("x"))
        gs, xdt = (64, mx.float32) if mode == "affine" else (32, mx.bfloat16)
        W = mx.random.normal((O, K)) / np.sqrt(K)
        q = mx.quantize(W, group_size=gs, bits=8, mode=mode)
        w, s, b = q if mode == "affine" else (*q, None)
        del W
        xs = [mx.array(rng.standard_normal((1, 1, K)).astype(np.float32)).astype(xdt)
              for _ in range(a.calls)]
        mx.eval(w, s, xs, *([] if b is None else [b]))
        nbytes = w.nbytes + s.nbytes + (0 if b is None else b.nbytes)

        def f_mlx(i):
            return mx.quantized_matmul(xs[i], w, s, b, transpose=True, group_size=gs, bits=8,
                                       mode=mode)

        def f_ker(i):
            return kq.qgemv_kernel(w, s, b, xs[i], gs, backend=backend, mode=mode)

        diff = float(mx.abs(f_ker(0).astype(mx.float32) - f_mlx(0).astype(mx.float32)).max())
        t_mlx, t_ker = timed(f_mlx, a.calls), timed(f_ker, a.calls)
        print(f"{mode:>7} {shape:>12} {nbytes / 1e6:>7.1f} {t_mlx:>8.4f} {t_ker:>10.4f} "
              f"{t_ker / t_mlx:>10.2f} {nbytes / t_mlx / 1e6:>9.0f} {nbytes / t_ker / 1e6:>11.0f} "
              f"{diff:>10.2e}")
        w = s = b = xs = None  # (rebound, not deleted: the closures name them)
        mx.clear_cache()

if __name__ == "__main__":
    main()
