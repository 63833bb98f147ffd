"""Decode/prefill speed of a Flash- or Pro-dimensioned model on a GPU, built in place.

Writing a real-size random checkpoint and converting it would take longer than the measurement,
so the model is built directly in the `mixed-4-8` layout: every tensor is drawn lazily and
quantized on the device (routed experts mxfp4, FP8-source linears mxfp8, embed/head affine
8-bit, norms/mHC/router/compressor/indexer projections unquantized), one tensor at a time.
The byte layout is that of a converted checkpoint; the values are random.

    python bench/gpu_decode.py --preset flash --layers 4 --experts 256 --max-context 65536

Prints the `dsv4 bench` table, the primitives per decode step, and the bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from dsv4_mlx.bench import run_bench, write_csv
from dsv4_mlx.demo import preset_config
from dsv4_mlx.model import Model, ModelArgs

FP8_LINEARS = re.compile(r"(\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|\.indexer\.wq_b|\.shared_experts\.w[123]|e_proj|h_proj)$")


def build(preset: str, layers: int, experts: int, seed: int = 0):
    cfg = preset_config(preset, layers, experts)
    cfg["num_nextn_predict_layers"] = 0
    args = ModelArgs.from_dict(cfg)
    mx.random.seed(seed)
    model = Model(args)
    D, E, k = args.hidden_size, args.n_routed_experts, args.num_experts_per_tok
    # realistic routing: random router, distinct hash experts per token
    for i, layer in enumerate(model.layers):
        g = layer.ffn.gate
        g.weight = mx.random.normal(g.weight.shape) * D**-0.5
        if hasattr(g, "tid2eid"):
            # k distinct experts per token (37 is odd, so j -> 37 j mod E is injective for E = 2^n)
            g.tid2eid = ((mx.arange(args.vocab_size)[:, None] * 7 + mx.arange(k)[None] * 37) % E).astype(mx.int32)
        for site in ("attn", "ffn"):
            setattr(layer, f"hc_{site}_fn", mx.random.normal(getattr(layer, f"hc_{site}_fn").shape) * 0.01)
        layer.attn.attn_sink = mx.random.normal((args.num_attention_heads,))
    model.hc_head_fn = mx.random.normal(model.hc_head_fn.shape) * 0.01
    keep32 = ("hc_", "attn_sink", "ape", "gate.bias", "tid2eid", "compressor.w", "gate.weight", ".experts.")
    model.update(tree_unflatten([(k, v.astype(mx.bfloat16)) for k, v in tree_flatten(model.parameters())
                                 if v.dtype == mx.float32 and not any(s in k for s in keep32)]))

    # routed experts: drawn and quantized to mxfp4 in blocks of 32 experts (one draw of a whole
    # [E, out, in] tensor is billions of elements: too large for one kernel launch)
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    for layer in model.layers:
        ex = layer.ffn.experts
        for name in ("w1", "w2", "w3"):
            E_, out, inp = getattr(ex, name).weight.shape
            ws, ss = [], []
            for e0 in range(0, E_, 32):
                w = mx.random.uniform(-(inp**-0.5), inp**-0.5, (min(32, E_ - e0), out, inp)).astype(mx.bfloat16)
                qw, sc = mx.quantize(w, 32, 4, mode="mxfp4")
                mx.eval(qw, sc)
                ws.append(qw)
                ss.append(sc)
            q = QuantizedSwitchLinear(32, 32, 1, bias=False, group_size=32, bits=4, mode="mxfp4")
            q.weight, q.scales = mx.concatenate(ws), mx.concatenate(ss)
            mx.eval(q.weight, q.scales)
            setattr(ex, name, q)

    def pred(path, m):
        if ".ffn.experts." in path:
            return False
        if path in ("embed", "head"):
            return {"group_size": 64, "bits": 8, "mode": "affine"}
        if FP8_LINEARS.search(path):
            return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
        return False

    nn.quantize(model, class_predicate=pred)
    from dsv4_mlx.kernels.qgemv import use_for_linears
    use_for_linears(model)  # (as `dsv4_mlx.load` does: only with DSV4_MX_GEMV_KERNEL set)
    # as Model.sanitize leaves a loaded head: fp32 scales and biases (the head takes fp32 input)
    model.head.scales = model.head.scales.astype(mx.float32)
    model.head.biases = model.head.biases.astype(mx.float32)
    for name, p in tree_flatten(model.parameters()):  # one tensor at a time: bounded memory
        try:
            mx.eval(p)
        except RuntimeError as e:
            raise RuntimeError(f"materialising {name} {p.shape} {p.dtype}: {e}") from None
    return model, args


def matmul_peak_tflops(n: int = 8192, repeats: int = 5) -> float:
    a = mx.random.normal((n, n)).astype(mx.bfloat16)
    b = mx.random.normal((n, n)).astype(mx.bfloat16)
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--max-context", type=int, default=65536)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--kv-format", default="fp8")
    ap.add_argument("--out", default="bench/out")
    a = ap.parse_args()
    t = time.time()
    model, args = build(a.preset, a.layers, a.experts)
    model.kv_format = a.kv_format
    wb = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    print(f"built {a.preset} dims, {a.layers} layers, {a.experts} experts: {wb / 2**30:.2f} GiB of weights "
          f"in {time.time() - t:.0f}s on {mx.default_device()}", flush=True)
    peak = matmul_peak_tflops(8192 if "gpu" in str(mx.default_device()) else 1024)
    print(f"bf16 matmul peak: {peak:.1f} TFLOP/s", flush=True)
    rep = run_bench(model, None, a.max_context, decode_tokens=a.decode_tokens,
                    progress=lambda s: print(s, flush=True) if s.startswith("context") else None)
    rep["matmul_peak_tflops"] = peak
    from dsv4_mlx.model.inventory import parameter_counts

    active = parameter_counts(preset_config(a.preset, a.layers, a.experts))["active"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if "gpu" in str(mx.default_device()) else "cpu"
    write_csv(rep, out / f"bench_{a.preset}{a.layers}_{dev}.csv")
    (out / f"bench_{a.preset}{a.layers}_{dev}.json").write_text(json.dumps(rep, indent=1))
    print(f"{'context':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/tok':>7} {'build':>6} {'eval':>6} "
          f"{'pipelined':>10} {'1st pass s':>10} {'state MiB':>10} {'peak GiB':>9} {'BW used':>8} {'(pipel.)':>8} {'prims/layer':>11}")
    for r in rep["frontiers"]:
        print(f"{r['context']:>8} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.2f} {r['decode_ms_median']:>7.2f} "
              f"{r['decode_build_ms']:>6.2f} {r['decode_eval_ms']:>6.2f} {r['decode_pipelined_tok_s']:>10.2f} "
              f"{r['decode_first_pass_s']:>10.2f} "
              f"{r['state_bytes'] / 2**20:>10.1f} {r['peak_memory_bytes'] / 2**30:>9.2f} {100 * r['bandwidth_fraction']:>7.1f}% "
              f"{100 * r['bandwidth_fraction_pipelined']:>7.1f}% {r['primitives_per_layer']:>11.1f}")
    print(f"weights read per decode token {rep['weight_bytes_per_token'] / 2**20:.1f} MiB; copy bandwidth "
          f"{rep['bandwidth_gb_s']:.0f} GB/s; primitives per decode step at {rep['primitives']['context']} "
          f"{rep['primitives']['total']} ({rep['primitives']['per_layer']:.0f}/layer)")
    fr = {r["context"]: r for r in rep["frontiers"]}
    if 2048 in fr and a.max_context in fr:
        print(f"decode at {a.max_context} / decode at 2048: {fr[a.max_context]['decode_tok_s'] / fr[2048]['decode_tok_s']:.2f}"
              f" (pipelined: {fr[a.max_context]['decode_pipelined_tok_s'] / fr[2048]['decode_pipelined_tok_s']:.2f})")
    if 8192 in fr:
        # matmul FLOPs per prefill token: 2 x (active weights), attention not counted
        flops = 2 * active * fr[8192]["prefill_tok_s"]
        print(f"prefill at 8K: {fr[8192]['prefill_tok_s']:.0f} tok/s = {flops / 1e12:.1f} TFLOP/s of weight "
              f"matmuls, {100 * flops / (peak * 1e12):.1f}% of the bf16 matmul peak")


if __name__ == "__main__":
    main()
