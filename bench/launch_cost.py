"""What one custom-kernel launch costs the host, and how much of it grows with the kernel's
source text (GPU only: `mx.fast.cuda_kernel` / `mx.fast.metal_kernel`).

    python bench/launch_cost.py [--calls 2000] [--chain 64] [--csv FILE]

MLX builds the whole kernel source (its prelude, our header, the body) into a string at
every call of a custom kernel, and MLX's CUDA backend hashes that string at every
evaluation. Our kernels carry a ~11 KB dialect header each. This script times, for a trivial
copy kernel with bodies padded by comment text to 0.5, 10, 20 and 40 KB:

* build: the Python call that adds one launch to the graph (no evaluation), median of
  ``--calls`` calls;
* eval: ``--chain`` launches chained (each reads the previous one's output) evaluated at
  once, per launch, median of 20 rounds (includes the GPU's ~2-3 us a launch).

It prints one table row per size. The difference between rows is what trimming a kernel's
source would save a launch; a decode step makes ~150 launches (4 layers: ~60 custom).

Then the same for MLX's own primitives, chained (64 an evaluation): a dtype view (bf16 words
as uint32 and back, as the matrix-unit scorer's queries), a cast, an elementwise add, a
reshape, and the trivial custom kernel: what one more primitive costs a decode step.

Last, the trivial kernel with 4 and 13 template constants (as the indexer's launches pass
them: MLX converts each from Python, formats it into the kernel's name and into the source at
every call) against the same constants written into its source (no template): what baking
the constants into a kernel object per specialisation would save a launch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

from common import write_rows_csv  # noqa: E402

_BODY = {
    "cuda": "  const int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
            "  if (i < 256) y[i] = x[i] + 1.0f;\n",
    "metal": "  const uint i = thread_position_in_grid.x;\n"
             "  if (i < 256) y[i] = x[i] + 1.0f;\n",
}


def _kernel(backend: str, pad: int, tag: str):
    line = "// " + "padding text of a comment, as a kernel's header carries " * 2 + "\n"
    header = (line * (pad // len(line) + 1))[:pad].rsplit("\n", 1)[0] + "\n" if pad else ""
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return make(name=f"launch_cost_{tag}_{pad}", input_names=["x"], output_names=["y"],
                source=_BODY[backend], header=header, ensure_row_contiguous=True)


def _launch(kern, x, template=None):
    kw = {"template": template} if template else {}
    return kern(inputs=[x], output_shapes=[(256,)], output_dtypes=[mx.float32],
                grid=(256, 1, 1), threadgroup=(256, 1, 1), stream=mx.gpu, **kw)[0]


# 13 constants as the one-launch indexer kernel takes them (their values are read by the body)
_TEMPLATE = [("D", 128), ("H", 64), ("NW", 4), ("KC", 128), ("SMEM4", 2176), ("QRES", True),
             ("TPT", 2), ("IDEC", 2), ("MMAPTX", 1), ("K", 512), ("U", 8), ("CAP", 2048),
             ("WALK", False)]


def measure_template(backend: str, n: int, baked: bool, calls: int, chain: int, tag: str):
    """The trivial kernel reading n constants: as template arguments, or (`baked`) written
    into its source."""
    tmpl = _TEMPLATE[:n]
    use = " + ".join(f"(int){k}" for k, _ in tmpl) or "0"
    body = _BODY[backend].replace("x[i] + 1.0f", f"x[i] + (float)({use}) * 0.0f + 1.0f")
    if baked:
        body = "".join(f"  constexpr int {k} = {int(v)};\n" for k, v in tmpl) + body
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    kern = make(name=f"launch_cost_t{n}{'b' if baked else ''}_{tag}", input_names=["x"],
                output_names=["y"], source=body, ensure_row_contiguous=True)
    m = measure_op("", lambda y: _launch(kern, y, None if baked else tmpl), 1, calls, chain)
    return {"constants": n, "how": "in the source" if baked else "template",
            "build_us": m["build_us"], "eval_us_a_launch": m["eval_us_a_primitive"]}


def measure(backend: str, pad: int, calls: int, chain: int, tag: str) -> dict:
    kern = _kernel(backend, pad, tag)
    m = measure_op("custom kernel", lambda y: _launch(kern, y), 1, calls, chain)
    return {"backend": backend, "source_kb": round((pad + len(_BODY[backend])) / 1024, 1),
            "build_us": m["build_us"], "eval_us_a_launch": m["eval_us_a_primitive"]}


# name -> (one link of the chain, primitives a link)
_OPS = {
    "view (u32 <-> f32)": (lambda y: y.view(mx.uint32).view(mx.float32), 2),
    "astype (bf16 <-> f32)": (lambda y: y.astype(mx.bfloat16).astype(mx.float32), 2),
    "add (y + 1)": (lambda y: y + 1.0, 1),
    "reshape (16 x 16 <-> 256)": (lambda y: y.reshape(16, 16).reshape(256), 2),
}


def measure_op(name: str, link, prims: int, calls: int, chain: int) -> dict:
    """Building one link (`calls` times), and evaluating `chain` primitives of links, each
    link reading the one before (20 rounds); medians a primitive."""
    x = mx.zeros((256,), mx.float32)
    mx.eval(link(x))  # (compiles once)
    build = []
    for _ in range(calls):
        t0 = time.perf_counter()
        link(x)
        build.append((time.perf_counter() - t0) / prims)
    evals = []
    for _ in range(20):
        y = x
        for _ in range(chain // prims):
            y = link(y)
        t0 = time.perf_counter()
        mx.eval(y)
        evals.append((time.perf_counter() - t0) / (chain // prims * prims))
    return {"primitive": name, "build_us": round(1e6 * statistics.median(build), 2),
            "eval_us_a_primitive": round(1e6 * statistics.median(evals), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--chain", type=int, default=64)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        backend = "cuda"
    elif mx.metal.is_available():
        backend = "metal"
    else:
        print("launch_cost: needs a GPU (MLX's CUDA or Metal backend); nothing measured.")
        return 1
    tag = str(int(time.time()))  # fresh kernel names: no cached library from another run
    rows = [measure(backend, pad, args.calls, args.chain, tag)
            for pad in (0, 10240, 20480, 40960)]
    print(f"{backend}: host cost of one custom-kernel launch by source size (medians)")
    print("| source KB | build us | eval us a launch |\n|---|---|---|")
    for r in rows:
        print(f"| {r['source_kb']} | {r['build_us']} | {r['eval_us_a_launch']} |")
    ops = [measure_op(n, f, p, args.calls // 4, args.chain) for n, (f, p) in _OPS.items()]
    ops.append({"primitive": f"custom kernel ({rows[0]['source_kb']} KB)",  # (measured above)
                "build_us": rows[0]["build_us"],
                "eval_us_a_primitive": rows[0]["eval_us_a_launch"]})
    print(f"\n{backend}: host cost of one primitive, {args.chain} chained an evaluation")
    print("| primitive | build us | eval us a primitive |\n|---|---|---|")
    for r in ops:
        print(f"| {r['primitive']} | {r['build_us']} | {r['eval_us_a_primitive']} |")
    tm = [measure_template(backend, n, baked, args.calls // 4, args.chain, tag)
          for n, baked in ((0, False), (4, False), (13, False), (13, True))]
    print(f"\n{backend}: the trivial kernel's host cost by its constants (medians)")
    print("| constants | how | build us | eval us a launch |\n|---|---|---|---|")
    for r in tm:
        print(f"| {r['constants']} | {r['how']} | {r['build_us']} | {r['eval_us_a_launch']} |")
    if args.csv:
        write_rows_csv(args.csv, rows)
        write_rows_csv(Path(args.csv).with_name(Path(args.csv).stem + "_ops.csv"), ops)
        write_rows_csv(Path(args.csv).with_name(Path(args.csv).stem + "_template.csv"), tm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
