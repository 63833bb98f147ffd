"""The decode attention (one query, sinks, stored FP8 KV) at Flash sizes: the kernel
(`kernels.attention`, two launches) vs the ops path (decode the ring, gather the picks,
concatenate, MLX's SDPA with sinks, which composes ~15 primitives for 512-dim heads).

    python bench/attention.py [--calls 16] [--csv bench/out/attention.csv]
    ncu --metrics gpu__time_duration.sum --csv --log-file F.csv -k regex:dsv4_sink \
        python bench/attention.py --profile [--spl ..] [--tg ..] [--hg ..]   # kernels only
    python bench/attention.py --parse-ncu F.csv [same sweep options]     # GPU time a call

Each case: 64 heads x 512 dims, window 128 (full), bf16 queries; `--calls` calls are built
into one evaluation and the median wall time of an evaluation over 20 is divided by it.
Wall time of so small a call is mostly building and launching; `--profile` under Nsight
Compute gives the GPU time of the two kernels (median of PROFILE_CALLS calls, base clocks,
caches flushed before each kernel as in a decode step, where other layers evict them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsv4_mlx.kernels import attention as ka  # noqa: E402
from dsv4_mlx.kernels import dispatch  # noqa: E402
from dsv4_mlx.model.attention import sink_attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ncu_kernel_times, write_rows_csv  # noqa: E402
from dsv4_mlx.model.kv_formats import FP8KVCodec, PlainCodec  # noqa: E402

CASES = [  # name, entries stored, keys used (dense count or picks), sparse
    ("window only", 0, 0, False),
    ("HCA 64K ctx (512 dense)", 512, 512, False),
    ("HCA 256K ctx (2048 dense)", 2048, 2048, False),
    ("HCA 1M ctx (8192 dense)", 8192, 8192, False),
    ("CSA 64K ctx (512 of 16K)", 16384, 512, True),
    ("CSA 1M ctx (512 of 256K)", 262144, 512, True),
]


def ops_path(codec, q, ring, comp, n, idx, sinks, scale):
    keys = codec.decode(ring)
    if idx is not None:
        picked = {k: mx.take_along_axis(v, idx.reshape(*idx.shape, *([1] * (v.ndim - 2))), axis=1)
                  for k, v in comp.items()}
        keys = mx.concatenate([keys, codec.decode(picked)], axis=1)
    elif n:
        keys = mx.concatenate([keys, codec.decode({k: v[:, :n] for k, v in comp.items()})], axis=1)
    return sink_attention(q, keys, None, sinks, scale)


def timed(fn, calls, reps=20):
    mx.eval([fn() for _ in range(calls)])
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval([fn() for _ in range(calls)])
        ts.append((time.perf_counter() - t) / calls)
    return 1e3 * statistics.median(ts)


PROFILE_CALLS = 5


def _inputs(codec, rng, cap, n, sparse, H, C, W):
    ring = codec.encode(mx.array(rng.standard_normal((1, W, C)).astype(np.float32)).astype(mx.bfloat16))
    comp = codec.encode(mx.array(rng.standard_normal((1, max(cap, 1), C)).astype(np.float32)).astype(mx.bfloat16))
    idx = mx.array(np.sort(rng.permutation(cap)[:n])[None].astype(np.int32)) if sparse else None
    q = mx.array(rng.standard_normal((1, H, 1, C)).astype(np.float32)).astype(mx.bfloat16)
    sinks = mx.array(rng.standard_normal(H).astype(np.float32))
    mx.eval(ring, comp, q, sinks, *(() if idx is None else (idx,)))
    return ring, comp, idx, q, sinks


def parse_ncu(path, cases):
    """Median GPU time (us) of (split, combine) per (case, launch) from an ncu CSV of
    `--profile`: the rows come in launch order, PROFILE_CALLS x 2 kernels per case."""
    t = [us for _, _, us in ncu_kernel_times(path)]
    per = 2 * PROFILE_CALLS
    if len(t) != per * len(cases):
        sys.exit(f"{path}: {len(t)} kernels, expected {per * len(cases)} for this sweep")
    print(f"{'case':>28} {'SPL':>4} {'TG':>4} {'HG':>3} {'KU':>3} {'PF':>3} {'split us':>9} {'combine us':>11} {'total us':>9}")
    for i, (name, spl, tg, hg, ku, pf) in enumerate(cases):
        sp = statistics.median(t[i * per: (i + 1) * per: 2])
        co = statistics.median(t[i * per + 1: (i + 1) * per: 2])
        print(f"{name:>28} {spl:>4} {tg:>4} {hg:>3} {ku:>3} {pf:>3} {sp:>9.1f} {co:>11.1f} {sp + co:>9.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--kv-format", default="fp8", choices=("fp8", "bf16"))
    ap.add_argument("--csv", default="bench/out/attention.csv")
    ap.add_argument("--spl", default=None,
                    help="comma list of keys a split to sweep (kernels.attention.SPL; default as set)")
    ap.add_argument("--tg", default=None, help="comma list of threads a group (kernels.attention.TG)")
    ap.add_argument("--hg", default=None, help="comma list of heads a group (kernels.attention.HG)")
    ap.add_argument("--ku", default=None, help="comma list of keys a warp at once (kernels.attention.KU)")
    ap.add_argument("--pf", default=None,
                    help="comma list of 0/1: the next round's loads during this round's math "
                         "(kernels.attention.PF)")
    ap.add_argument("--profile", action="store_true",
                    help="(under ncu) only the kernel, PROFILE_CALLS evaluated calls a case")
    ap.add_argument("--parse-ncu", default=None, metavar="CSV")
    a = ap.parse_args()
    ints = lambda v, d: [int(x) for x in v.split(",")] if v else [d]  # noqa: E731
    launches = [(s, t, h, u, f) for s in ints(a.spl, ka.SPL) for t in ints(a.tg, ka.TG)
                for h in ints(a.hg, ka.HG) for u in ints(a.ku, ka.KU) for f in ints(a.pf, ka.PF)]
    if a.parse_ncu:
        return parse_ncu(a.parse_ncu, [(c[0], *v) for c in CASES for v in launches])
    backend = dispatch.select_backend(ka.ENV_VAR)
    if backend == "ops":
        sys.exit("no GPU backend: this benchmark compares the GPU kernel with the ops path")
    H, C, W = 64, 512, 128
    codec = FP8KVCodec(C, 64) if a.kv_format == "fp8" else PlainCodec(C)
    rng = np.random.default_rng(0)
    scale = C ** -0.5
    rows = []
    print(f"{mx.default_device()} ({backend}), H {H}, C {C}, window {W}, {a.kv_format} KV, "
          f"{a.calls} calls an evaluation")
    if a.profile:
        for (name, cap, n, sparse), (spl, tg, hg, ku, pf) in [(c, v) for c in CASES for v in launches]:
            ring, comp, idx, q, sinks = _inputs(codec, rng, cap, n, sparse, H, C, W)
            for _ in range(PROFILE_CALLS):
                mx.eval(ka.sink_decode(q, ring, W, comp if cap else None, n, idx, sinks, scale, codec,
                                       backend, tg=tg, hg=hg, spl=spl, ku=ku, pf=pf))
        return
    print(f"{'case':>28} {'SPL':>4} {'TG':>4} {'HG':>3} {'KU':>3} {'PF':>3} {'ops ms':>8} {'kernel ms':>10} {'ratio':>6} "
          f"{'max |diff|':>11}")
    for (name, cap, n, sparse), (spl, tg, hg, ku, pf) in [(c, v) for c in CASES for v in launches]:
        ring, comp, idx, q, sinks = _inputs(codec, rng, cap, n, sparse, H, C, W)
        f_ops = lambda: ops_path(codec, q, ring, comp, n, idx, sinks, scale)  # noqa: E731
        f_ker = lambda: ka.sink_decode(q, ring, W, comp if cap else None, n, idx, sinks, scale,  # noqa: E731
                                       codec, backend, tg=tg, hg=hg, spl=spl, ku=ku, pf=pf)
        diff = float(mx.abs(f_ops().astype(mx.float32) - f_ker().astype(mx.float32)).max())
        t_ops, t_ker = timed(f_ops, a.calls), timed(f_ker, a.calls)
        rows.append(dict(case=name, spl=spl, tg=tg, hg=hg, ku=ku, pf=pf, entries=cap, keys=W + n, ops_ms=t_ops,
                         kernel_ms=t_ker, ratio=t_ops / t_ker, max_abs_diff=diff))
        print(f"{name:>28} {spl:>4} {tg:>4} {hg:>3} {ku:>3} {pf:>3} {t_ops:>8.4f} {t_ker:>10.4f} {t_ops / t_ker:>6.2f} {diff:>11.2e}")
    write_rows_csv(a.csv, rows)


if __name__ == "__main__":
    main()
