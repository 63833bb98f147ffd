"""GPU time of a kernel reading a small array made on the host (MLX's CUDA backend).

    ncu --metrics gpu__time_duration.sum --csv --log-file F.csv -k regex:dsv4_probe_read \\
        python bench/host_arrays.py
    python bench/host_arrays.py --parse-ncu F.csv

MLX's CUDA allocator puts arrays made on the host in managed memory; those of at most 8 bytes
go to a pool the GPU reads in place (cudaMemAdviseSetAccessedBy), larger ones migrate their
page to the GPU at the first GPU access after the host wrote them. A per-call host array
larger than 8 bytes (a kernel's runtime sizes, say) therefore costs a page migration on every
call. Five ways to feed a one-thread kernel, CALLS calls each: one host array made once and
reused; a new 16-byte host array a call; a new 8-byte host array a call; one GPU-made array;
a new GPU-made array a call.
"""

from __future__ import annotations

import argparse
import statistics

from common import ncu_kernel_times  # (bench/ is the script's folder)

CALLS = 6
KINDS = ["host 16 B, made once", "host 16 B, new each call", "host 8 B, new each call",
         "GPU-made 16 B, once", "GPU-made 16 B, new each call"]


def run():
    import mlx.core as mx

    mx.set_default_device(mx.gpu)
    k = mx.fast.cuda_kernel(name="dsv4_probe_read", input_names=["x"], output_names=["y"],
                            source="y[0] = x[0] + x[1];")

    def call(x):
        mx.eval(k(inputs=[x], output_shapes=[(1,)], output_dtypes=[mx.int32], grid=(1, 1, 1),
                  threadgroup=(1, 1, 1), stream=mx.gpu)[0])

    once = mx.array([1, 2, 3, 4], mx.int32)
    gpu = mx.arange(4, dtype=mx.int32) + 1
    mx.eval(once, gpu)
    feeds = [lambda i: once, lambda i: mx.array([i, 2, 3, 4], mx.int32),
             lambda i: mx.array([i, 2], mx.int32), lambda i: gpu,
             lambda i: mx.arange(4, dtype=mx.int32) + i]
    for f in feeds:
        for i in range(CALLS):
            call(f(i))


def parse(path):
    t = [us for _, name, us in ncu_kernel_times(path) if "dsv4_probe_read" in name]
    print(f"{'input':>30} {'median us':>10}  calls (us)")
    for i, name in enumerate(KINDS):
        v = t[i * CALLS:(i + 1) * CALLS]
        print(f"{name:>30} {statistics.median(v):>10.1f}  {' '.join(f'{x:.1f}' for x in v)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parse-ncu", default=None, metavar="CSV")
    a = ap.parse_args()
    parse(a.parse_ncu) if a.parse_ncu else run()
