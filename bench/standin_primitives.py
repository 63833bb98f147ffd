"""A decode step's primitives as the GPU graph has them, counted on a CPU-only MLX.

    python bench/standin_primitives.py [--tree DIR] [--layers 4] [--context 4096]

Where no GPU is at hand: the custom kernels and the `mx.fast` ops (which on the CPU are composed
from many primitives) are replaced by one stand-in node each (`mx.depends` on constants), the
kernel dispatch answers "cuda", and one decode step is counted as `dsv4 bench` counts it
(`dsv4_mlx.bench.count_primitives`). The model has tiny dimensions (counts do not depend on
them) and Flash's layer structure (two window layers, then CSA / HCA alternating), prefilled on
the real (ops) path to `--context` tokens so the CSA layers run the sparse indexer. ``--tree``
counts another checkout (e.g. ``git archive <commit> dsv4_mlx bench | tar -x -C DIR``).

It is an estimate, not the GPU count: the CPU still composes a few ops the GPU runs as one
(the FP4 quantization of the indexer keys, some views; `mx.dequantize`, the quantized
embedding's row, is a stand-in too since 2026-12-07). Checked against the H100 on the same
commit (94ebe39, Flash dimensions, 4 layers, context 4096): 305 here (views 102, others 203)
vs 273 there (views 83, others 190). Differences between two trees counted here are what it is
for.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import mlx.core as mx


def tiny_flash_config(preset_config):
    """A `preset_config` whose "tiny-flash" is the tiny preset with Flash's layer structure."""
    def cfg_for(preset, layers=None, experts=None):
        if preset != "tiny-flash":
            return preset_config(preset, layers, experts)
        cfg = preset_config("tiny", layers, experts)
        L = cfg["num_hidden_layers"]
        cfg["compress_ratios"] = ([0, 0] + [4 if i % 2 == 0 else 128 for i in range(L - 2)])[:L] + [0]
        return cfg
    return cfg_for


_consts: dict = {}


def _const(shape, dtype):
    key = (tuple(shape), dtype)
    if key not in _consts:
        _consts[key] = mx.zeros(shape, dtype)
        mx.eval(_consts[key])
    return _consts[key]


def standin(outs, deps):
    """One graph node with these (shape, dtype) outputs, depending on `deps`."""
    return mx.depends([_const(s, d) for s, d in outs], [x for x in deps if isinstance(x, mx.array)])


class _Kernel:
    def __call__(self, inputs, output_shapes, output_dtypes, **kw):
        return standin(list(zip(output_shapes, output_dtypes)), inputs)


def install():
    """From now on: kernel dispatch answers "cuda", kernels and `mx.fast` ops are stand-ins
    (their outputs are zeros: for counting, not for numbers)."""
    from dsv4_mlx.kernels import dispatch
    from dsv4_mlx.kernels import indexer as ki

    dispatch.select_backend = lambda env_var=dispatch.ENV_VAR, default="auto": (
        "ops" if default == "ops" else "cuda")  # (an opt-in kernel stays off, as on a GPU)
    dispatch.cuda_available = lambda: True
    dispatch.available_backends = lambda: ("cuda",)
    dispatch.kernel_usable = lambda key, probe, what: True
    dispatch.build_kernel = lambda backend, ks: _Kernel()
    ki._kernel = dispatch.build_kernel
    mx.stream = lambda *_, **__: contextlib.nullcontext()
    mx.fast.rms_norm = lambda x, w, eps: standin([(x.shape, x.dtype)], [x, w])[0]
    mx.fast.rope = lambda x, dims, **k: standin([(x.shape, x.dtype)],
                                                [x, k.get("freqs"), k.get("offset")])[0]
    mx.fast.scaled_dot_product_attention = lambda q, k, v, **kw: standin(
        [(q.shape[:-1] + (v.shape[-1],), q.dtype)], [q, k, v, kw.get("mask"), kw.get("sinks")])[0]
    # one primitive on a GPU (the CPU composes it from shifts, concatenations, ...): the
    # quantized embedding's row
    mx.dequantize = lambda w, scales, biases=None, group_size=None, bits=None, **k: standin(
        [(w.shape[:-1] + (w.shape[-1] * 32 // (bits or 4),), scales.dtype
          if k.get("mode", "affine") == "affine" else k.get("dtype") or mx.bfloat16)],
        [w, scales, biases])[0]


def prefilled(gpu_decode, layers: int, experts: int, context: int, extra: int = 1):
    """(model, args, tokens, cache): `gpu_decode`'s (the counted tree's) tiny model with
    Flash's layer structure, prefilled on the real (ops) path to `context` tokens of a fixed
    stream that runs `extra` tokens further."""
    gpu_decode.preset_config = tiny_flash_config(gpu_decode.preset_config)
    model, args = gpu_decode.build("tiny-flash", layers, experts)
    tokens = [(7 * i + 3) % args.vocab_size for i in range(context + extra)]
    cache = model.make_cache()
    for p in range(0, context, 2048):
        mx.eval(model(mx.array([tokens[p: min(p + 2048, context)]]), cache=cache,
                      last_only=True), [c.state for c in cache])
    return model, args, tokens, cache


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--compile", action="store_true",
                    help="a decode step's stateless parts as compiled functions (DSV4_COMPILE_DECODE=1)")
    ap.add_argument("--build-time", type=int, default=0, metavar="N",
                    help="also time building one decode step's graph (Python, no evaluation) "
                         "N times, each on a fresh copy of the state; prints the median")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(a.tree) / "bench"))
    sys.path.insert(0, a.tree)
    import gpu_decode
    from decode_profile import VIEWS

    from dsv4_mlx.bench import count_primitives

    model, args, tokens, cache = prefilled(gpu_decode, a.layers, a.experts, a.context)
    install()
    # one decode step first, as `dsv4 bench` warms up: small constants the kernels share are
    # made (and evaluated) once, at their first use, and are not part of a step's graph
    from dsv4_mlx.cache import restore, snapshot

    if a.compile:
        model.set_compile_decode(True)
    for _ in range(2 if a.compile else 1):  # (compiled: the second step traces)
        warm = restore(snapshot(cache))
        mx.eval(model(mx.array([[tokens[a.context]]]), cache=warm), [c.state for c in warm])
    p = count_primitives(model, cache)
    views = sum(v for k, v in p["by_op"].items() if k in VIEWS)
    print(f"{a.tree}: ratios {args.compress_ratios[:a.layers]}, context {a.context}: "
          f"{p['total']} primitives ({p['per_layer']:.1f} a layer), views {views}, "
          f"others {p['total'] - views} ({(p['total'] - views) / a.layers:.1f} a layer)"
          + (f"; {p['per_block']:.1f} a block without the embedding and head"
             if "per_block" in p else ""))
    print("  by op: " + ", ".join(f"{k} {v}" for k, v in p["by_op"].items()))
    if a.build_time:
        import statistics
        import time

        y = mx.array([[tokens[a.context]]])
        ms, graph = [], []
        for _ in range(a.build_time):
            c = restore(snapshot(cache))
            mx.eval([s.state for s in c])
            t0 = time.perf_counter()
            graph.append(model(y, cache=c))
            ms.append(1e3 * (time.perf_counter() - t0))
            graph.clear()  # (freed outside the timed part)
        print(f"  building a step's graph: median {statistics.median(ms):.3f} ms over "
              f"{a.build_time} (min {min(ms):.3f})")


if __name__ == "__main__":
    main()
