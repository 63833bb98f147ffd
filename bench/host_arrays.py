"""GPU time of a kernel reading a small array made on the host (MLX's CUDA backend).

    ncu --metrics gpu__time_duration.sum --csv --log-file F.csv -k regex:dsv4_probe_read \\
        python bench/host_arrays.py
    python bench/host_arrays.py --parse-ncu F.csv

MLX's CUDA allocator puts arrays made on the host in managed memory; those of at most 8 bytes
go to a pool the GPU reads in place (cudaMemAdviseSetAccessedBy), larger ones migrate their
page to the GPU at the first GPU access after the host wrote them. A per-call host array
larger than 8 bytes (a kernel's runtime sizes, say) therefore costs a page migration on every
call. Arrays a GPU op makes of more than 8 bytes live in device memory.

Two kernels: one thread reading the array once ("1 block"), and 512 blocks of 128 threads
whose every block reads it once, as a real kernel's blocks read a count or a position
("512 blocks": the pool's cost is paid by every block, every wave). Feeds, CALLS calls each:
one host array made once and reused; a new 16-byte host array a call; a new 8-byte host array
a call; one 4-byte host array made once (a `dispatch.vector` constant); one GPU-made 16-byte
array; a new GPU-made 16-byte array a call (one more launch a call, not timed here).
"""

from __future__ import annotations

import argparse
import statistics

from common import ncu_kernel_times  # (bench/ is the script's folder)

CALLS = 6
KINDS = ["host 16 B, made once", "host 16 B, new each call", "host 8 B, new each call",
         "host 4 B, made once", "GPU-made 16 B, once", "GPU-made 16 B, new each call"]
SHAPES = [("1 block", (1, 1, 1), (1, 1, 1)), ("512 blocks", (512 * 128, 1, 1), (128, 1, 1))]


def run():
    import mlx.core as mx

    mx.set_default_device(mx.gpu)
    k = mx.fast.cuda_kernel(name="dsv4_probe_read", input_names=["x"], output_names=["y"],
                            source="if (threadIdx.x == 0) y[blockIdx.x] = x[0] + (int)blockIdx.x;")

    def call(x, grid, tg):
        mx.eval(k(inputs=[x], output_shapes=[(grid[0] // tg[0],)], output_dtypes=[mx.int32],
                  grid=grid, threadgroup=tg, stream=mx.gpu)[0])

    once = mx.array([1, 2, 3, 4], mx.int32)
    once4 = mx.array([1], mx.int32)
    gpu = mx.arange(4, dtype=mx.int32) + 1
    mx.eval(once, once4, gpu)
    feeds = [lambda i: once, lambda i: mx.array([i, 2, 3, 4], mx.int32),
             lambda i: mx.array([i, 2], mx.int32), lambda i: once4, lambda i: gpu,
             lambda i: mx.arange(4, dtype=mx.int32) + i]
    for _, grid, tg in SHAPES:
        for f in feeds:
            for i in range(CALLS):
                call(f(i), grid, tg)


def parse(path):
    t = [us for _, name, us in ncu_kernel_times(path) if "dsv4_probe_read" in name]
    print(f"{'kernel':>10} {'input':>30} {'median us':>10}  calls (us)")
    for j, (shape, _, _) in enumerate(SHAPES):
        for i, name in enumerate(KINDS):
            v = t[(j * len(KINDS) + i) * CALLS:(j * len(KINDS) + i + 1) * CALLS]
            if v:
                print(f"{shape:>10} {name:>30} {statistics.median(v):>10.1f}  "
                      f"{' '.join(f'{x:.1f}' for x in v)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parse-ncu", default=None, metavar="CSV")
    a = ap.parse_args()
    parse(a.parse_ncu) if a.parse_ncu else run()
