"""The decode step's FP8 KV store: kernel (`kernels.kv_store`) vs the ops path (encode chain +
three slice updates), on a GPU.

    python bench/kv_store.py [--calls 16]

Flash sizes (C 512, 64 RoPE dims, window 128), batch 1, bf16 KV; median ms a call over 20
evaluations of `--calls` independent stores each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from dsv4_mlx.cache import LayerCache
from dsv4_mlx.kernels import dispatch
from dsv4_mlx.kernels import kv_store as ks


def timed(fn, calls, reps=20):
    mx.eval([fn(i) for i in range(calls)])
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval([fn(i) for i in range(calls)])
        ts.append((time.perf_counter() - t) / calls)
    return 1e3 * statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=16)
    a = ap.parse_args()
    backend = dispatch.select_backend(ks.ENV_VAR)
    if backend == "ops":
        sys.exit("no GPU backend: this benchmark compares the GPU kernel with the ops path")
    W, C, R = 128, 512, 64
    base = LayerCache(W, 0, C, 0, R, "fp8")
    codec = base.codec
    rng = np.random.default_rng(0)
    ring = codec.encode(mx.array(rng.standard_normal((1, W, C)).astype(np.float32)).astype(mx.bfloat16))
    kvs = [mx.array(rng.standard_normal((1, 1, C)).astype(np.float32)).astype(mx.bfloat16)
           for _ in range(a.calls)]
    mx.eval(ring, kvs)

    def ops(i):
        c = LayerCache(W, 0, C, 0, R, "fp8")
        c.ring, c.offset = dict(ring), 1000 + i
        c.update_ring(codec.encode(kvs[i]))
        return list(c.ring.values())

    def ker(i):
        return list(ks.store_kernel(ring, kvs[i], (1000 + i) % W, codec, backend=backend).values())

    same = all(bool(mx.array_equal(x, y)) for i in range(a.calls) for x, y in zip(ops(i), ker(i)))
    t_ops, t_ker = timed(ops, a.calls), timed(ker, a.calls)
    print(f"{mx.default_device()} ({backend}): FP8 KV store, C {C}, window {W}, {a.calls} calls an "
          f"evaluation")
    print(f"ops {t_ops:.4f} ms, kernel {t_ker:.4f} ms a call ({t_ops / t_ker:.2f}x); "
          f"bit-identical rings: {same}")


if __name__ == "__main__":
    main()
