"""`dsv4 bench`: speed and memory at context frontiers, measured in one run.

One fixed token stream is prefilled incrementally to each frontier (2K, 4K, 8K, ... up to a
limit). At each frontier: prefill tok/s of the new interval; decode tok/s of a fixed greedy
probe (the state is copied before and restored after, so the walk continues from the frontier);
state bytes; peak memory. Once per run: the weight bytes one decode token reads (from the
loaded layout: every non-expert weight, k of E experts per MoE layer, one embedding row, the
head), the memory bandwidth measured by a copy in the same process. At each frontier also the number
of primitives one decode step dispatches (its MLX graph, `mx.export_to_dot`; a compiled region
counts once); the report's headline count is the last frontier's. Decode is measured twice:
step by step (each step built, then evaluated: the two medians tell which bounds it) and in
mlx-lm's pipelined `generate_step` (what `dsv4 chat` gets), both after an untimed first pass
over the same tokens from the same state: a shape met for the first time (the compressed-entry
counts grow during the probe) may compile a kernel (MLX's JIT on CUDA: seconds on a machine
whose kernel cache is cold), which is not decode speed; the first pass's seconds are reported
apart (``decode_first_pass_s``). A frontier's prefill is timed as it comes, so it includes the
first use of any kernel variant new at that length.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import LayerCache, restore, snapshot

FRONTIERS = (2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)
_WORDS = ("the model reads a long document about rivers mountains trade and the history of "
          "maps while the indexer keeps the best compressed entries for every new token").split()


def fixed_tokens(n: int, tokenizer=None, vocab_size: int = 129280) -> List[int]:
    """A deterministic token stream of length n (a fixed text repeated with a counter)."""
    if tokenizer is None:
        return [(1000 + 7919 * i) % (vocab_size - 2) + 2 for i in range(n)]
    out: List[int] = [0]
    i = 0
    while len(out) < n:
        words = " ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(50))
        out += tokenizer.encode(f" Part {i}: {words}.", add_special_tokens=False)
        i += 1
    return out[:n]


@dataclass
class FrontierResult:
    context: int
    prefill_tokens: int
    prefill_s: float
    prefill_tok_s: float
    decode_tokens: int
    decode_tok_s: float
    decode_ms_median: float
    state_bytes: int
    peak_memory_bytes: int
    weight_bytes_per_token: int
    bandwidth_gb_s: float
    primitives_per_layer: float
    bandwidth_fraction: float
    # the synchronous probe split: building a step's graph (Python) vs evaluating it
    decode_build_ms: float = 0.0
    decode_eval_ms: float = 0.0
    # mlx-lm's generate_step (what `dsv4 chat` runs): step t+1 is built while step t runs
    decode_pipelined_tok_s: float = 0.0
    bandwidth_fraction_pipelined: float = 0.0
    # its median and slowest token (the tok/s above is the mean: a few slow steps weigh in)
    decode_pipelined_ms_median: float = 0.0
    decode_pipelined_ms_max: float = 0.0
    # the untimed first pass of the probe (the same tokens from the same state), compilation
    # of new shapes included: seconds in all
    decode_first_pass_s: float = 0.0


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode token reads, from the loaded (quantized) layout."""
    a = model.args
    total = 0
    for name, p in tree_flatten(model.parameters()):
        if name.startswith("mtp."):
            continue
        n = p.nbytes
        if ".ffn.experts." in name:
            n = n * a.num_experts_per_tok // a.n_routed_experts
        elif name.startswith("embed."):
            n = n // a.vocab_size
        total += n
    return int(total)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of `y = x + 0` over a `nbytes` buffer (bytes read + written), best of `repeats`."""
    x = mx.zeros((nbytes // 4,), dtype=mx.float32)
    mx.eval(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        y = x + 0
        mx.eval(y)
        best = min(best, time.perf_counter() - t)
        del y
    return 2 * nbytes / best / 1e9


def _graph_ops(*outs) -> List[str]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "step.dot"
        mx.export_to_dot(str(path), *outs)
        text = path.read_text()
    return re.findall(r'\[label ="([^"]+)", shape=rectangle\]', text)


def count_primitives(model, cache: List[LayerCache], token: int = 5) -> Dict:
    """Primitives in one decode step's graph (the logits and the updated state), taken on an
    evaluated copy of `cache` (which is left as it is). ``per_layer`` divides the whole step
    by the layers; ``per_block`` leaves out the embedding and the head (once a step, whatever
    the depth), counted apart on the same token."""
    from .kernels.embed import embed_streams
    from .kernels.mhc import hc_head

    work = restore(snapshot(cache))
    mx.eval([c.state for c in work])
    ids = mx.array([[token]])
    logits = model(ids, cache=work)
    ops = _graph_ops(logits, *[a for c in work for a in c.state])
    counts: Dict[str, int] = {}
    for o in ops:
        counts[o] = counts.get(o, 0) + 1
    a = model.args
    X = embed_streams(model.embed, ids, a.hc_mult)
    n_embed = len(_graph_ops(X))
    mx.eval(X)
    n_head = len(_graph_ops(model.lm_head(hc_head(X, model.hc_head_fn, model.hc_head_scale,
                                                  model.hc_head_base, a.hc_eps, a.rms_norm_eps,
                                                  model.norm))))
    L = len(model.layers)
    return {"total": len(ops), "per_layer": len(ops) / L,
            "per_block": (len(ops) - n_embed - n_head) / L, "embed_and_head": n_embed + n_head,
            "by_op": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


def pipelined_step_times(model, cache: List[LayerCache], y: mx.array, n: int) -> List[float]:
    """Seconds per token of `n` greedy tokens from mlx-lm's `generate_step` (the loop `dsv4
    chat` runs: it builds step t+1's graph while step t is evaluated) from token `y` on
    `cache` (which it advances); the first, which includes `y`'s own step, is left out."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    times = []
    t = time.perf_counter()
    for _ in zip(range(n + 1), generate_step(y.reshape(1), model, max_tokens=n + 1,
                                             sampler=make_sampler(0.0), prompt_cache=cache)):
        t2 = time.perf_counter()
        times.append(t2 - t)
        t = t2
    mx.synchronize()  # generate_step has queued the step after the last one taken
    return times[1:]


def decode_steps(model, cache: List[LayerCache], y: mx.array, n: int,
                 on_step: Optional[Callable[[int, float, float], None]] = None):
    """`n` greedy one-token steps from token `y` on `cache` (which they advance), each built
    then evaluated: (seconds a step, of which building its graph, evaluating it; the last
    token). `on_step(i, build_s, eval_s)` after each step."""
    times, build, evals = [], [], []
    for i in range(n):
        t = time.perf_counter()
        logits = model(y.reshape(1, 1), cache=cache)
        y = mx.argmax(logits[0, -1])
        t1 = time.perf_counter()
        mx.eval(y)
        t2 = time.perf_counter()
        times.append(t2 - t)
        build.append(t1 - t)
        evals.append(t2 - t1)
        if on_step is not None:
            on_step(i, t1 - t, t2 - t1)
    return times, build, evals, y


def run_bench(model, tokenizer=None, max_context: int = 32768, frontiers: Sequence[int] = FRONTIERS,
              decode_tokens: int = 32, prefill_chunk: int = 2048,
              progress: Optional[Callable[[str], None]] = None) -> Dict:
    say = progress or (lambda s: None)
    fr = [f for f in frontiers if f <= max_context]
    if not fr:
        raise ValueError(f"no frontier <= {max_context}")
    tokens = fixed_tokens(fr[-1] + decode_tokens + 1, tokenizer, model.args.vocab_size)
    wbytes = weight_bytes_per_token(model)
    say("measuring memory bandwidth")
    bw = copy_bandwidth()
    # warm-up on a throwaway state: the first use of each kernel compiles it (MLX's JIT on CUDA,
    # Metal's pipeline compilation), which must not count as prefill or decode time. Long
    # enough that CSA layers pass top-k (the sparse path) and with full-size chunks.
    say("warming up (kernel compilation)")
    warm = model.make_cache()
    n_warm = min(fr[-1], max(2 * prefill_chunk, 4 * model.args.index_topk + prefill_chunk))
    for p in range(0, n_warm, prefill_chunk):
        mx.eval(model(mx.array([tokens[p : p + prefill_chunk]]), cache=warm, last_only=True), [c.state for c in warm])
    for t in range(3):
        mx.eval(model(mx.array([[tokens[t]]]), cache=warm))
    del warm
    cache = model.make_cache()
    prims = None
    results: List[FrontierResult] = []
    done = 0
    for f in fr:
        mx.reset_peak_memory()
        t = time.perf_counter()
        while done < f:
            n = min(prefill_chunk, f - done)
            logits = model(mx.array([tokens[done : done + n]]), cache=cache, last_only=True)
            mx.eval(logits, [c.state for c in cache])
            done += n
            say(f"prefill {done:,}/{f:,}")
        pre_s = time.perf_counter() - t
        interval = f - (results[-1].context if results else 0)
        # the graph of one decode step at this frontier (it grows once a CSA layer passes
        # top-k: the indexer runs from then on)
        say("counting primitives of one decode step")
        prims = count_primitives(model, cache)
        snap = snapshot(cache)
        y0 = mx.argmax(logits[0, -1])
        # the probe twice from the same state: the first pass (untimed) meets every shape the
        # timed one will (the compressed-entry counts grow during the probe, and a new shape or
        # a kernel's first use compiles it: MLX's JIT on CUDA, Metal's pipeline compilation),
        # so the timed pass is steady-state decode; the first pass's time is kept apart
        # (two steps more: the pipelined loop below runs one step past its n + 1 tokens)
        t = time.perf_counter()
        decode_steps(model, cache, y0, decode_tokens + 2)
        warm_s = time.perf_counter() - t
        cache[:] = restore(snap)
        times, build, evals, _ = decode_steps(model, cache, y0, decode_tokens)
        cache[:] = restore(snap)
        pipe = pipelined_step_times(model, cache, y0, decode_tokens)
        cache[:] = restore(snap)
        dec = decode_tokens / sum(times)
        dec_pipe = len(pipe) / sum(pipe)
        r = FrontierResult(
            context=f, prefill_tokens=interval, prefill_s=pre_s, prefill_tok_s=interval / pre_s,
            decode_tokens=decode_tokens, decode_tok_s=dec, decode_ms_median=1000 * statistics.median(times),
            state_bytes=int(sum(c.nbytes for c in cache)), peak_memory_bytes=int(mx.get_peak_memory()),
            weight_bytes_per_token=wbytes, bandwidth_gb_s=bw,
            bandwidth_fraction=wbytes * dec / (bw * 1e9),
            primitives_per_layer=prims["per_layer"],
            decode_build_ms=1000 * statistics.median(build),
            decode_eval_ms=1000 * statistics.median(evals),
            decode_pipelined_tok_s=dec_pipe,
            bandwidth_fraction_pipelined=wbytes * dec_pipe / (bw * 1e9),
            decode_pipelined_ms_median=1000 * statistics.median(pipe),
            decode_pipelined_ms_max=1000 * max(pipe),
            decode_first_pass_s=warm_s,
        )
        results.append(r)
        say(f"context {f:,}: prefill {r.prefill_tok_s:,.1f} tok/s, decode {r.decode_tok_s:,.2f} tok/s")
    # the report's count: the last frontier's (every layer type in its long-context path)
    return {"frontiers": [asdict(r) for r in results], "primitives": dict(prims, context=fr[-1]),
            "weight_bytes_per_token": wbytes, "bandwidth_gb_s": bw,
            "device": str(mx.default_device()), "kv_format": getattr(model, "kv_format", "?"),
            "layers": len(model.layers),
            "compiled_decode": bool(getattr(model.layers[0], "compile_decode", False))}


def write_csv(report: Dict, path: Path) -> None:
    import csv

    rows = report["frontiers"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, primitives_per_layer=round(r["primitives_per_layer"], 1)))


def write_png(report: Dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["frontiers"]
    ctx = [r["context"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ctx, [r["prefill_tok_s"] for r in rows], "o-", label="prefill")
    ax[0].plot(ctx, [r["decode_tok_s"] for r in rows], "s-", label="decode")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("context (tokens)")
    ax[0].set_ylabel("tokens / s")
    ax[0].legend()
    ax[1].plot(ctx, [r["state_bytes"] / 2**20 for r in rows], "o-", label="state")
    ax[1].plot(ctx, [r["peak_memory_bytes"] / 2**20 for r in rows], "s-", label="peak memory")
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("context (tokens)")
    ax[1].set_ylabel("MiB")
    ax[1].legend()
    fig.suptitle(f"dsv4 bench ({report['device']}, {report['layers']} layers, {report['kv_format']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
