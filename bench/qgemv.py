"""The one-token projection kernels (`kernels.qgemv`) vs MLX's quantized matmuls, on a GPU.

    python bench/qgemv.py [--calls 16] [--affine OxK,...] [--mxfp8 OxK,...] [--experts OxKxP[p],...]
                          [--sweep]

`--experts`: mxfp4 experts (64 of them) gathered by P picks (`p`: x one row a pick, as w2 reads
the activations; otherwise one row for all, as w1/w3), `mx_gemv_kernel` vs `mx.gather_qmm`;
`--mxfp8` now times `mx_gemv_kernel` (the microscaled kernel) against `mx.quantized_matmul`.
`--sweep`: every (warps a row, rows a warp group) launch for each microscaled case.

Affine 8-bit weights (group 64) with fp32 scales and biases and fp32 x, as the model's head
(`Model.sanitize`), mxfp8 weights with bf16 x, as Flash's FP8 linears, and mxfp4 experts;
median ms a call over 20 evaluations of `--calls` calls each (queued back to back; the
microscaled cases read another copy of their weights at each call, as a decode step never
finds them in L2), the bytes a call reads (codes, scales, biases) per second. On an H100
(2026-12-07) the head's kernel was faster (now the default, `DSV4_QGEMV_KERNEL`); the
microscaled kernel is opt-in (`DSV4_MX_GEMV_KERNEL`) until this script has measured it.
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
# Flash's routed experts a decode step runs: w1/w3 fused (4096 rows), w2, six picks
FLASH_EXPERTS = "4096x4096x6,4096x2048x6p"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--affine", default="129280x4096,129280x7168",
                    help="affine 8-bit, group 64, fp32 scales and x (the head)")
    ap.add_argument("--mxfp8", default=FLASH_FP8,
                    help="mxfp8 (the FP8 linears), bf16 x: OxK list")
    ap.add_argument("--experts", default=FLASH_EXPERTS,
                    help="mxfp4 experts gathered, bf16 x: OxKxP[p] list")
    ap.add_argument("--sweep", action="store_true")
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
        [("mxfp8", sh) for sh in a.mxfp8.split(",") if sh] + \
        [("experts", sh) for sh in a.experts.split(",") if sh]
    for mode, shape in cases:
        if mode == "experts":
            O, K, P = (int(v.rstrip("p")) for v in shape.split("x"))
            xpp = shape.endswith("p")
        else:
            (O, K), P, xpp = (int(v) for v in shape.split("x")), 1, False
        bits = {"affine": 8, "mxfp8": 8, "experts": 4}[mode]
        qmode = {"affine": "affine", "mxfp8": "mxfp8", "experts": "mxfp4"}[mode]
        gs, xdt = (64, mx.float32) if mode == "affine" else (32, mx.bfloat16)
        E = 16 if mode == "experts" else 0
        # the microscaled cases: a weight copy a call (a decode step never finds its weights
        # in L2; 16 calls of one 17 MB matrix would); the head is larger than L2 anyway
        ncopy = 1 if mode == "affine" else a.calls
        ws = []
        for _ in range(ncopy):
            W = mx.random.normal((E, O, K) if E else (O, K)) / np.sqrt(K)
            q = mx.quantize(W, group_size=gs, bits=bits, mode=qmode)
            ws.append(q if mode == "affine" else (*q, None))
            mx.eval(*[t for t in ws[-1] if t is not None])
            del W, q
        xs = [mx.array(rng.standard_normal(((P if xpp else 1), 1, K)).astype(np.float32))
              .astype(xdt) for _ in range(a.calls)]
        inds = [mx.array(rng.choice(E, P, replace=False).astype(np.uint32)) for _ in range(a.calls)] \
            if E else None
        lhs = mx.array(np.arange(P, dtype=np.uint32) if xpp else np.zeros(P, np.uint32))
        mx.eval(xs, *(inds or []))
        w, s, b = ws[0]
        # bytes a call reads: the picked experts' (all P distinct) or the whole matrix
        nbytes = (w.nbytes + s.nbytes + (0 if b is None else b.nbytes)) * (P / E if E else 1)

        def f_mlx(i):
            w, s, b = ws[i % ncopy]
            if E:
                return mx.gather_qmm(xs[i], w, s, None, lhs_indices=lhs, rhs_indices=inds[i],
                                     transpose=True, group_size=32, bits=4, mode="mxfp4")
            return mx.quantized_matmul(xs[i], w, s, b, transpose=True, group_size=gs, bits=8,
                                       mode=qmode)

        def kernel(wpr=None, rw=None):
            if mode == "affine":
                return lambda i: kq.qgemv_kernel(w, s, b, xs[i], gs, backend=backend)
            return lambda i: kq.mx_gemv_kernel(
                ws[i % ncopy][0], ws[i % ncopy][1], xs[i].reshape(-1, K), bits=bits,
                backend=backend, inds=inds[i] if E else None, x_per_pick=xpp, wpr=wpr, rw=rw)

        f_ker = kernel()
        diff = float(mx.abs(f_ker(0).reshape(-1).astype(mx.float32)
                            - f_mlx(0).reshape(-1).astype(mx.float32)).max())
        t_mlx, t_ker = timed(f_mlx, a.calls), timed(f_ker, a.calls)
        label = "mxfp4" if E else mode
        print(f"{label:>7} {shape:>12} {nbytes / 1e6:>7.1f} {t_mlx:>8.4f} {t_ker:>10.4f} "
              f"{t_ker / t_mlx:>10.2f} {nbytes / t_mlx / 1e6:>9.0f} {nbytes / t_ker / 1e6:>11.0f} "
              f"{diff:>10.2e}  {'' if mode == 'affine' else kq.mx_launch(O, P, K, bits)}")
        if a.sweep and mode != "affine":
            for wpr in (1, 2, 4, 8):
                for rw in (1, 2, 4, 8):
                    if K * bits // 128 < 32 * wpr:
                        continue
                    t = timed(kernel(wpr, rw), a.calls)
                    print(f"{'':>7} {'':>12} {'':>7} {'':>8} {t:>10.4f} {t / t_mlx:>10.2f} "
                          f"{'':>9} {nbytes / t / 1e6:>11.0f} {'':>10}  wpr {wpr} rw {rw}")
        w = s = b = ws = xs = inds = None  # (rebound, not deleted: the closures name them)
        mx.clear_cache()


if __name__ == "__main__":
    main()
