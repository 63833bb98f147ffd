"""Benchmark: lightning-indexer top-k (spec §4.7), GPU kernels vs the pure-ops path.

    python bench/indexer.py                   # GPU if MLX has one, else CPU (small sizes)
    python bench/indexer.py --device cpu --entries 1024,4096 --queries 1,512

Per (key format, entries N, queries T), with H=64 heads, d=128, top-k 512, batch 1:

* ``ops``: `indexer_topk_ops` (matmul to [T, H, N], relu, weighted head sum, argpartition);
* ``kernel``: fused scoring kernel + radix-select top-k kernel (`indexer_topk_kernel`); the
  scoring runs on the matrix units (bf16 queries);
* ``kernel-frag`` (CUDA): the same with the register-fragment scoring kernel (opt-in);
* ``kernel-all``, ``kernel-one-all``, ``kernel-one-scr-all``, ``kernel-row-all``,
  ``kernel-frag-all``, ``kernel-fuse-all``, ``kernel-slices-all`` (CUDA, one query): the same
  with ``visible`` None (every entry visible, as a decode token passes it: the kernels read
  no count array), as the dispatch chooses, with scoring and top-k in one launch from 32K to
  128K entries (`indexer.SCORE_SELECT`, opt-in; its histograms in zeroed outputs, or in a
  caller's scratch: `indexer.SELECT_SCRATCH`), with the scorer and the one-group top-k apart
  (`indexer.TOPK_ROW`), with the register-fragment scorer, the fused top-k, or the S slices
  and their merge everywhere;
* ``kernel-fp32``: the same with the fp32 (CUDA-core / SIMD) scoring kernel;
* ``kernel+argp``: fused scoring kernel + ``mx.argpartition``;
* ``floor``: one tiny elementwise op (the visible counts + 1) evaluated the same way: what
  MLX takes for any evaluation (one call an evaluation) or any launched primitive (many
  calls an evaluation) on this machine, whatever the work. No path can take less.

Median wall time of one evaluated call (ms) and peak memory (``mx.get_peak_memory()`` after
``mx.reset_peak_memory()``; "extra" is the peak minus what was allocated before the call,
i.e. the call's own buffers). Queries are bf16, head weights fp32, keys mxfp4 or bf16; the
visible counts are those of the last prefill chunk of an N-entry context (all visible for
T=1). Combinations whose ops path would not fit in memory (its [T, H, N] fp32 buffers) or
exceed ``--max-gflop`` are skipped and listed. Writes ``bench/out/indexer_<device>.csv``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4_mlx.kernels import dispatch  # noqa: E402
from dsv4_mlx.kernels import indexer as ki  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_marker, cuda_profiler, ncu_kernel_times, write_rows_csv  # noqa: E402

MiB = 2**20


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def device_memory() -> int:
    info = mx.device_info()
    for k in ("total_memory", "memory_size"):
        if k in info:
            return int(info[k])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_inputs(T, N, H, D, keys_fmt, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((1, T, H, D)).astype(mx.bfloat16)
    w = mx.random.normal((1, T, H)) * (1.0 / (D**0.5 * H**0.5))
    kf = mx.random.normal((1, N, D))
    if keys_fmt == "fp4":
        keys = tuple(mx.quantize(kf, group_size=32, bits=4, mode="mxfp4"))
    else:
        keys = kf.astype(mx.bfloat16)
    # last prefill chunk of an N-entry context: query t sees N - (T - 1 - t) // 4 entries
    t = mx.arange(T)
    visible = mx.clip(N - (T - 1 - t) // 4, 0, N).astype(mx.int32)
    mx.eval(q, w, keys, visible)
    del kf
    return q, w, keys, visible


def timed(fn, budget_s: float, reps_min: int = 3, reps_max: int = 25):
    """(median ms, reps, peak MiB, extra MiB, median build ms) of fn() evaluated (build: the
    time fn() takes to make its lazy outputs, before the evaluation); the first, untimed call
    (kernel build, warm-up) gives the peak memory."""
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    mx.eval(out)
    mx.synchronize()
    peak = mx.get_peak_memory()
    del out
    times, builds = [], []
    start = time.perf_counter()
    while len(times) < reps_max and (len(times) < reps_min
                                     or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        mx.eval(out)
        mx.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        builds.append((t1 - t0) * 1e3)
        del out
    return (statistics.median(times), len(times), peak / MiB, (peak - base) / MiB,
            statistics.median(builds))


TUNE_SIZES = ((65536, 1), (262144, 1), (65536, 512))


def tune(backend, H, D, K, budget_s, sizes=TUNE_SIZES):
    """Scoring kernel, top-k kernel and argpartition timed apart, over launch parameters."""
    print("tune: parts timed apart (ms, one call an eval)")
    for fmt in ("fp4", "bf16"):
        for N, T in sizes:
            _tune_case(backend, H, D, K, budget_s, fmt, N, T)
            mx.clear_cache()  # the case's arrays died with its frame
    print()


def _tune_case(backend, H, D, K, budget_s, fmt, N, T):
    q, w, keys, vis = make_inputs(T, N, H, D, fmt)
    line = [f"  {fmt:4s} N={N:>7d} T={T:>4d} score"]
    for bn, e in ((64, 1), (128, 1), (128, 2), (256, 1), (128, 4), (128, 8)):
        ms = timed(lambda: ki.indexer_scores_kernel(q, w, keys, vis, backend=backend,
                                                    bn=bn, e=e, mma=False), budget_s)[0]
        line.append(f"bn{bn}/e{e} {ms:.3f}")
    if ki.mma_usable(backend, q, fmt):
        for tpt in MMA_TILES:
            ms = timed(lambda: ki.indexer_scores_kernel(q, w, keys, vis, backend=backend,
                                                        mma=True, tpt=tpt), budget_s)[0]
            line.append(f"mma/tpt{tpt} {ms:.3f}")
    dflt = ki.score_launch(1, T, N, H, D)
    line.append(f"(default bn{dflt[0]}/e{dflt[2]})")
    print("  ".join(line), flush=True)
    s = ki.indexer_scores_kernel(q, w, keys, vis, backend=backend)
    mx.eval(s)
    TG, U, S = ki.topk_launch(1, T, N, K)
    line = [f"  {fmt:4s} N={N:>7d} T={T:>4d} top-k"]
    for tg, u, sl in ((1024, 4, 1), (256, 4, 1), (TG, U, S), (TG, 8, S), (512, 4, S),
                      (TG, U, max(1, S // 2)), (TG, U, min(128, 2 * S))):
        for r in (0, None):
            ms = timed(lambda: ki.indexer_select_kernel(s, vis, K, backend=backend, tg=tg, u=u,
                                                        s=sl, r=r), budget_s)[0]
            line.append(f"tg{tg}/u{u}/s{sl}/r{'auto' if r is None else r} {ms:.3f}")

    def argp():
        i = mx.argpartition(-s, kth=K - 1, axis=-1)[..., :K].astype(mx.int32)
        return mx.where(i >= vis[None, :, None], -1, i)

    line.append(f"argpartition {timed(argp, budget_s)[0]:.3f}")
    line.append(f"(default tg{TG}/u{U}/s{S})")
    print("  ".join(line), flush=True)


def chained(fn, a, C: int, floor: bool = False):
    """C calls of `fn`, each one's queries the first's times (its predecessor's first pick
    >= -1: all ones): one compare and one multiply a link, the same for every path; the
    last call's output (every call before it is its input). ``floor``: the links alone."""
    q, out = a[0], None
    for _ in range(C):
        if out is not None:
            q = a[0] * (out.reshape(-1)[:1] >= -1)
        out = q.reshape(-1)[:1] if floor else fn((q, *a[1:]))
    return out


# ---- GPU time per call from Nsight Compute (CUDA): marker kernels bracket the timed calls


def _switched(fn, name="FRAG_SCORER", value=1):
    """`fn()` with the indexer switch `name` at `value` (`indexer.FRAG_SCORER`: the register-
    fragment scorer, or "TOPK_FUSE", "TOPK_ROW"; the planned launches are kept per value)."""
    was = getattr(ki, name)
    setattr(ki, name, value)
    try:
        return fn()
    finally:
        setattr(ki, name, was)


def _marker(i: int, what: str):
    cuda_marker(f"{i}_{what}")


PROFILE_CALLS = 3


def _profiled(i: int, fn) -> None:
    """Case `i`: two untimed calls of `fn`, then PROFILE_CALLS evaluated calls between its
    marker kernels, the profiler on only around them (with ncu --profile-from-start off)."""
    for _ in range(2):
        mx.eval(fn())
    cuda_profiler(True)
    _marker(i, "begin")
    for _ in range(PROFILE_CALLS):
        mx.eval(fn())
    _marker(i, "end")
    cuda_profiler(False)


def profile(backend, H, D, K, entries):
    """Run under ``ncu --metrics gpu__time_duration.sum --csv --log-file F``; then
    ``--parse-ncu F`` sums the kernel durations between the markers of each case."""
    cases = []
    for fmt in ("fp4", "bf16"):
        for N in entries:
            for path in ("ops", "kernel", "kernel-fp32"):
                a = make_inputs(1, N, H, D, fmt)
                fn = (lambda: ki.indexer_topk_ops(*a, K)) if path == "ops" else \
                    (lambda: ki.indexer_topk_kernel(*a, K, backend=backend,
                                                    mma=None if path == "kernel" else False))
                _profiled(len(cases), fn)
                cases.append((fmt, N, path))
                a = None  # (rebound, not deleted: the closures above name it)
    for i, c in enumerate(cases):
        print(f"case {i}: {c[0]} N={c[1]} {c[2]}")


SELECT_VARIANTS = ((1024, 4, 1, 0), (512, 4, 8, 0), (512, 4, 16, 0), (512, 4, 8, None),
                   (512, 4, 16, None), (256, 4, 16, None), (256, 4, 32, None),
                   (1024, 4, 16, None), (1024, 4, 8, None))  # (tg, u, s, r)
MMA_TILES = (1, 2, 4, 8, 16)
FRAG_LAUNCHES = (None, (4, 1, 1), (8, 1, 1), (4, 1, 2))  # (NW, TPW, ME); None: `frag_launch`
# the one-group top-k's launches (TG, U, CAP, HA): the default, its first adds aggregated, fewer
# and more loads in flight, a group of 512, and no bin copied (every pass streams the row)
ROW_VARIANTS = ((1024, 8, 2048, 0), (1024, 8, 2048, 1), (1024, 4, 2048, 0), (1024, 16, 2048, 0),
                (512, 8, 2048, 0), (1024, 8, 1, 0))


def profile_parts(backend, H, D, K, entries, defaults_only=False):
    """Like `profile`, the scoring kernels and top-k launch variants apart (fp4 keys, T=1);
    ``defaults_only``: the scoring and top-k as the dispatch launches them, nothing else."""
    cases = []
    for N in entries:
        a = make_inputs(1, N, H, D, "fp4")
        s = ki.indexer_scores_kernel(*a, backend=backend)
        mx.eval(s)
        if defaults_only:
            # a decode row (visible None: every entry visible, no count read): the scorers
            fns = [(f"score (default) frag {fr}, all visible", lambda fr=fr:
                    ki.indexer_scores_kernel(*a[:3], None, backend=backend, frag=fr))
                   for fr in (0, 1)]
            # the top-k: S slices + merge (default), one group a row (TOPK_ROW) by launch
            fns += [("select slices, all visible", lambda: ki.indexer_select_kernel(
                s, None, K, backend=backend, row=0))]
            fns += [(f"select row tg{tg} u{u} cap{cap} ha{ha}, all visible",
                     lambda tg=tg, u=u, cap=cap, ha=ha: ki.indexer_select_kernel(
                         s, None, K, backend=backend, row=1, tg=tg, u=u, cap=cap, ha=ha))
                    for tg, u, cap, ha in ROW_VARIANTS]
            # the whole call as planned: slices, fused, one group a row
            fns += [(f"score + select, {how} frag {fr}, all visible",
                     lambda f=f, r=r, fr=fr: ki.indexer_topk_kernel(
                         *a[:3], None, K, backend=backend,
                         launch={"fuse": f, "row": r, "frag": fr}))
                    for how, f, r, fr in (("slices", 0, 0, 0), ("fused", 1, 0, 0),
                                          ("row", 0, 1, 0), ("row", 0, 1, 1))]
            # scoring and the top-k in one launch (its work rows' fill included)
            fns += [(f"score + select, one launch u{u}, all visible",
                     lambda u=u: ki.indexer_topk_kernel(*a[:3], None, K, backend=backend,
                                                        launch={"one": 1, "u": u}))
                    for u in (4, 8, 16)]
            scr = mx.zeros((1, ki.SCRATCH_WORDS), mx.uint32)  # (calls one after another)
            fns += [("score + select, one launch, scratch, all visible",
                     lambda: ki.indexer_topk_kernel(*a[:3], None, K, backend=backend,
                                                    launch={"one": 1}, scratch=scr))]
            # with the counts read (a prefill chunk's last row)
            fns += [("score + select (default), counts", lambda: ki.indexer_topk_kernel(
                *a, K, backend=backend))]
        else:
            fns = [("score fp32", lambda: ki.indexer_scores_kernel(*a, backend=backend,
                                                                   mma=False))]
            fns += [(f"score mma tpt{tpt}", lambda tpt=tpt: ki.indexer_scores_kernel(
                *a, backend=backend, mma=True, tpt=tpt)) for tpt in MMA_TILES]
            fns += [(f"select tg{tg}/u{u}/s{sl}/r{'auto' if r is None else r}",
                     lambda tg=tg, u=u, sl=sl, r=r: ki.indexer_select_kernel(
                         s, a[3], K, backend=backend, tg=tg, u=u, s=sl, r=r))
                    for tg, u, sl, r in SELECT_VARIANTS]
        for name, fn in fns:
            _profiled(len(cases), fn)
            cases.append(f"N={N} {name}")
        a = s = None  # (rebound, not deleted: the closures above name them)
    for i, c in enumerate(cases):
        print(f"case {i}: {c}")


def parse_ncu(path: str):
    rows = ncu_kernel_times(path)
    cases, cur = {}, None
    for _, name, val in rows:
        if "dsv4mark_" in name:
            tag = name[name.index("dsv4mark_"):].split("_")
            cur = int(tag[1]) if tag[2].startswith("begin") else None
            continue
        if cur is not None:
            tot, n, names = cases.get(cur, (0.0, 0, []))
            cases[cur] = (tot + val, n + 1,
                          names + [name.split("(")[0][:40]])
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    ap.add_argument("--entries", type=_ints, default=None,
                    help="comma list (default GPU: 1024..262144; CPU: 1024,4096,16384,65536)")
    ap.add_argument("--queries", type=_ints, default=[1, 512, 2048])
    ap.add_argument("--keys", default="fp4,bf16")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--max-gflop", type=float, default=None,
                    help="skip combinations above this many GFLOP a call (default GPU: none; "
                         "CPU: 10)")
    ap.add_argument("--budget-s", type=float, default=1.0, help="timing budget a measurement")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    ap.add_argument("--batch-calls", type=int, default=None,
                    help="for T=1 also time this many calls in one evaluation (per-call time "
                         "without MLX's per-evaluation overhead; default GPU: 16, CPU: off)")
    ap.add_argument("--chain-calls", type=int, default=None,
                    help="for T=1 also time this many dependent calls in one evaluation: each "
                         "call's queries made from the one before's picks, as a decode step's "
                         "layers follow each other (default GPU: 16, CPU: off); its floor is "
                         "the links alone")
    ap.add_argument("--paths", default=None,
                    help="comma list of the paths to time (default: all that apply; ops and "
                         "floor always)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every path this many times, the order reversed every other "
                         "round (the host's drift cancels), and report the median of the "
                         "rounds; the budget is shared among them")
    ap.add_argument("--profile", action="store_true",
                    help="(CUDA, under ncu) decode calls bracketed by marker kernels")
    ap.add_argument("--profile-parts", action="store_true",
                    help="(CUDA, under ncu) scoring kernels and top-k launch variants apart")
    ap.add_argument("--defaults-only", action="store_true",
                    help="with --profile-parts: only the launches the dispatch makes")
    ap.add_argument("--parse-ncu", default=None, metavar="CSV",
                    help="sum the GPU time a call from an ncu --csv log of --profile")
    ap.add_argument("--tune", action="store_true",
                    help="first time the two kernels apart over their launch parameters")
    args = ap.parse_args(argv)
    if args.parse_ncu:
        cases = parse_ncu(args.parse_ncu)
        labels = {}
        log = Path(args.parse_ncu).with_suffix(".cases")
        if log.exists():
            for ln in log.read_text().splitlines():
                if ln.startswith("case "):
                    i, rest = ln[5:].split(": ", 1)
                    labels[int(i)] = rest
        print(f"GPU time a call (sum of kernel durations, Nsight Compute), T=1, "
              f"mean of {PROFILE_CALLS} calls")
        print("| case | us a call | kernels a call |")
        print("|---|---|---|")
        for i in sorted(cases):
            tot, n, names = cases[i]
            print(f"| {labels.get(i, i)} | {tot / PROFILE_CALLS:.1f} | {n // PROFILE_CALLS} |")
        for i in sorted(cases):
            print(f"  {labels.get(i, i)}: {', '.join(cases[i][2][: cases[i][1] // PROFILE_CALLS])}")
        return

    gpu = bool(dispatch.available_backends()) if args.device == "auto" else args.device == "gpu"
    mx.set_default_device(mx.gpu if gpu else mx.cpu)
    backend = dispatch.select_backend() if gpu else "ops"
    label = backend if backend != "ops" else "cpu"
    entries = args.entries or ([1024, 4096, 16384, 65536, 262144] if gpu
                               else [1024, 4096, 16384, 65536])
    if args.batch_calls is None:
        args.batch_calls = 16 if gpu else 0
    if args.chain_calls is None:
        args.chain_calls = 16 if gpu else 0
    max_gflop = args.max_gflop if args.max_gflop is not None else (float("inf") if gpu else 10.0)
    mem = device_memory()
    H, D, K = args.heads, args.dim, args.topk
    info = mx.device_info()
    print(f"device: {label} ({info.get('device_name', '?')}), memory {mem / 2**30:.0f} GiB, "
          f"mlx {mx.__version__}; H={H} d={D} topk={K}, batch 1, bf16 queries")

    if args.profile_parts:
        profile_parts(backend, args.heads, args.dim, args.topk, args.entries or [65536, 262144],
                      args.defaults_only)
        return
    if args.profile:
        profile(backend, args.heads, args.dim, args.topk, args.entries or [65536, 262144])
        return
    if args.tune and backend != "ops":
        tune(backend, H, D, K, args.budget_s / 2)

    paths = {"ops": lambda a: ki.indexer_topk_ops(*a, K)}
    floor = {"floor": lambda a: a[3] + 1}
    if backend != "ops":
        paths["kernel"] = lambda a: ki.indexer_topk_kernel(*a, K, backend=backend)
        if backend == "cuda" and args.queries == [1]:  # a decode row: all entries visible
            paths["kernel-all"] = lambda a: ki.indexer_topk_kernel(*a[:3], None, K,
                                                                   backend=backend)
            paths["kernel-frag-all"] = lambda a: _switched(
                lambda: ki.indexer_topk_kernel(*a[:3], None, K, backend=backend))
            apart = lambda fn: _switched(fn, "SCORE_SELECT", 0)  # noqa: E731
            paths["kernel-one-all"] = lambda a: _switched(
                lambda: ki.indexer_topk_kernel(*a[:3], None, K, backend=backend), "SCORE_SELECT")
            # ... with its histograms in a scratch instead of zeroed outputs: a pool of 32 used
            # in turn, so no two calls of one evaluation (<= 16 here) share one
            pool = [mx.zeros((1, ki.SCRATCH_WORDS), mx.uint32) for _ in range(32)]
            mx.eval(pool)
            turn = [0]

            def one_scratch(a):
                turn[0] = (turn[0] + 1) % len(pool)
                return _switched(lambda: ki.indexer_topk_kernel(
                    *a[:3], None, K, backend=backend, scratch=pool[turn[0]]), "SCORE_SELECT")
            paths["kernel-one-scr-all"] = one_scratch
            paths["kernel-row-all"] = lambda a: apart(
                lambda: ki.indexer_topk_kernel(*a[:3], None, K, backend=backend))
            paths["kernel-fuse-all"] = lambda a: apart(lambda: _switched(lambda: _switched(
                lambda: ki.indexer_topk_kernel(*a[:3], None, K, backend=backend), "TOPK_ROW", 0),
                "TOPK_FUSE"))
            paths["kernel-slices-all"] = lambda a: apart(lambda: _switched(
                lambda: ki.indexer_topk_kernel(*a[:3], None, K, backend=backend), "TOPK_ROW", 0))
        if backend == "cuda":  # the register-fragment scorer (opt-in), planned like the default
            paths["kernel-frag"] = lambda a: _switched(
                lambda: ki.indexer_topk_kernel(*a, K, backend=backend))
        paths["kernel-fp32"] = lambda a: ki.indexer_topk_kernel(*a, K, backend=backend,
                                                                mma=False)
        paths["kernel+argp"] = lambda a: ki.indexer_topk_kernel(*a, K, backend=backend,
                                                                select="argpartition")
    if args.paths:
        want = {p.strip() for p in args.paths.split(",")} | {"ops"}
        bad = sorted(want - set(paths))
        if bad:
            raise SystemExit(f"--paths: unknown {', '.join(bad)}; this device has "
                             f"{', '.join(paths)}")
        paths = {n: f for n, f in paths.items() if n in want}
    rows, skipped = [], []
    for fmt in args.keys.split(","):
        for N in entries:
            for T in args.queries:
                gflop = 2 * T * N * H * D / 1e9
                if gflop > max_gflop:
                    skipped.append((fmt, N, T, "all",
                                    f"{gflop:.0f} GFLOP > --max-gflop {max_gflop:g}"))
                    continue
                a = make_inputs(T, N, H, D, fmt)
                results = {}
                # the measurements: (path, calls an evaluation, chained) -> its rounds
                got: dict = {}
                todo = []
                for name, fn in {**paths, **floor}.items():
                    need = (3 * T * H * N * 4 + 2 * N * D * 4 + 3 * T * N * 4) if name == "ops" \
                        else (2 * T * N * 4 + N * D * 2)
                    if need > 0.8 * mem:
                        skipped.append((fmt, N, T, name, f"needs ~{need / 2**30:.0f} GiB "
                                        f"(> 80% of {mem / 2**30:.0f} GiB)"))
                        continue
                    todo.append((name, fn))
                R, C = args.batch_calls, args.chain_calls
                qs = None  # the independent calls' queries (made once for every path)
                if T == 1 and R > 1:
                    qs = [a[0] * (1.0 + 0.01 * i) for i in range(R)]
                    mx.eval(qs)
                failed = set()
                for rnd in range(args.rounds):  # every path once a round, the order reversed
                    for name, fn in (todo if rnd % 2 == 0 else todo[::-1]):   # every other
                        if name in failed:
                            continue
                        modes = [(1, 0, lambda fn=fn: fn(a))]
                        if qs:
                            modes.append((R, 0, lambda fn=fn: [fn((qi, *a[1:])) for qi in qs]))
                        if T == 1 and C > 1:
                            # C calls in a chain (MLX's CUDA graph runs independent calls side
                            # by side: the R calls above overlap, a decode step's layers do not)
                            modes.append((C, 1, lambda fn=fn, name=name:
                                          chained(fn, a, C, name == "floor")))
                        for cpe, ch, call in modes:
                            try:
                                m = timed(call, args.budget_s / args.rounds)
                            except Exception as e:  # out of memory and the like: report, go on
                                skipped.append((fmt, N, T, name,
                                                f"{type(e).__name__}: {str(e)[:80]}"))
                                failed.add(name)
                                break
                            got.setdefault((name, cpe, ch), []).append(m)
                            how = ("" if cpe == 1 else f" a call, {cpe} {'chained ' if ch else ''}"
                                   "calls an eval")
                            print(f"  {fmt:4s} N={N:>7d} T={T:>5d} {name:12s} {m[0] / cpe:10.3f} "
                                  f"ms{how} (x{m[1]}, build {m[4] / cpe:.3f} ms, round {rnd})",
                                  flush=True)
                for (name, cpe, ch), ms in got.items():
                    med = statistics.median(x[0] for x in ms) / cpe
                    results[(name, cpe, ch)] = med
                    rows.append(dict(device=label, keys=fmt, entries=N, queries=T, path=name,
                                     calls_per_eval=cpe, chained=ch, median_ms=round(med, 4),
                                     build_ms=round(statistics.median(x[4] for x in ms) / cpe, 4),
                                     rounds_ms=" ".join(f"{x[0] / cpe:.4f}" for x in ms),
                                     reps=sum(x[1] for x in ms),
                                     peak_mib=round(max(x[2] for x in ms), 1),
                                     extra_mib=round(max(x[3] for x in ms), 1),
                                     hn_fp32_mib=round(H * N * 4 / MiB, 1), speedup_vs_ops=""))
                for r in rows:
                    if (r["keys"], r["entries"], r["queries"]) == (fmt, N, T) and \
                            ("ops", r["calls_per_eval"], r["chained"]) in results and \
                            r["path"] != "floor":
                        r["speedup_vs_ops"] = round(results[("ops", r["calls_per_eval"],
                                                             r["chained"])]
                                                    / r["median_ms"], 2)
                a = None  # (rebound, not deleted: the closures above name it)
                mx.clear_cache()

    path = write_rows_csv(Path(args.out) / f"indexer_{label}.csv", rows)

    names = list(paths) + list(floor)
    ratio_names = [n for n in names[1:] if n not in floor]
    for cpe, ch, title in (
            (1, 0, "one call an evaluation (latency, includes MLX's per-evaluation overhead)"),
            (args.batch_calls, 0, f"T=1, {args.batch_calls} calls an evaluation (time a call, "
                                  f"without that overhead; independent calls, which the GPU "
                                  f"may run side by side)"),
            (args.chain_calls, 1, f"T=1, {args.chain_calls} chained calls an evaluation (each "
                                  f"call's queries from the one before's picks, as decode "
                                  f"layers; floor: the links alone)")):
        sel = [r for r in rows if (r["calls_per_eval"], r["chained"]) == (cpe, ch)]
        if not sel or (cpe <= 1 and (cpe, ch) != (1, 0)):
            continue
        print(f"\n{label}: {title}; median ms")
        hdr = "| keys | entries | queries | " + " | ".join(f"{n} ms" for n in names)
        if ratio_names:
            hdr += " | " + " | ".join(f"{n} vs ops" for n in ratio_names)
        hdr += " | " + " | ".join(f"{n} extra MiB" for n in names) + " |"
        print(hdr)
        print("|" + "---|" * (hdr.count("|") - 1))
        seen = []
        for r in sel:
            key = (r["keys"], r["entries"], r["queries"])
            if key not in seen:
                seen.append(key)
        for key in seen:
            by = {r["path"]: r for r in sel if (r["keys"], r["entries"], r["queries"]) == key}
            cells = [key[0], str(key[1]), str(key[2])]
            cells += [f"{by[n]['median_ms']:.3f}" if n in by else "skip" for n in names]
            if ratio_names:
                cells += [f"{by[n]['speedup_vs_ops']}x" if n in by and by[n]["speedup_vs_ops"] != ""
                          else "-" for n in ratio_names]
            cells += [f"{by[n]['extra_mib']:.1f}" if n in by else "-" for n in names]
            print("| " + " | ".join(cells) + " |")
        for key in seen:  # what the host spends making a call's lazy graph (Python)
            by = {r["path"]: r for r in sel if (r["keys"], r["entries"], r["queries"]) == key}
            print(f"  build ms a call, {key[0]} N={key[1]} T={key[2]}: " + ", ".join(
                f"{n} {by[n]['build_ms']:.3f}" for n in names if n in by))
            if ch and "floor" in by and "ops" in by:  # what a call adds to the chain
                fl = by["floor"]["median_ms"]
                ops = by["ops"]["median_ms"] - fl
                adds = [(n, by[n]["median_ms"] - fl) for n in ["ops"] + ratio_names
                        if n in by and by[n]["median_ms"] > fl]
                print(f"  links subtracted ({fl:.3f} ms a call), {key[0]} N={key[1]}: "
                      + ", ".join(f"{n} {t:.3f} ms ({ops / t:.2f}x)" for n, t in adds))
    if skipped:
        print("\nskipped:")
        for fmt, N, T, name, why in skipped:
            print(f"  {fmt} N={N} T={T} {name}: {why}")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
