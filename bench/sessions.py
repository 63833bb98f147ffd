"""Benchmark on-disk sessions: save and load throughput and bytes per token at 32K and 128K.

The state comes from a V4-Flash-dimension model with random weights (`preset_config("flash",
layers=4, experts=4)`: window-only, window-only, CSA, HCA, in bf16, built in memory): the model
really runs on `--real-tokens` tokens (default 512; prefilling 128K tokens on a CPU takes too
long), which fills the window rings, compressor pending/overlap rows and the first compressed
entries and indexer keys with real values; the rest of the state up to 32K / 128K tokens is
SYNTHESISED by repeating those real entries (right shapes and dtypes, in the storage format:
fp8 = FP8 KV + FP4 indexer keys, bf16 = as computed). Two layouts are measured:

* `flash-4L`: the 4 layers of that model;
* `flash-43L`: the published V4-Flash schedule (2 window-only, 21 CSA, 20 HCA layers), each layer
  a copy of the 4-layer model's layer of the same kind - the sizes of the real model.

For each: a full save (one segment from scratch: the first save of a long context), a load with
every segment's SHA-256 checked (the page cache is warm: the file was just written), and one
chat turn appended (512 more tokens, synthesised): the O(new tokens) cost of a save per turn.

    python bench/sessions.py [--tokens 32768,131072] [--real-tokens 512] [--workdir DIR]

Prints a table and writes bench/out/sessions.csv.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4_mlx.cache import LayerCache  # noqa: E402
from dsv4_mlx.demo import preset_config  # noqa: E402
from dsv4_mlx.model import Model, ModelArgs  # noqa: E402
from dsv4_mlx.random_weights import load_random  # noqa: E402
from dsv4_mlx.sessions import Fingerprints, SessionStore  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_rows_csv  # noqa: E402

FLASH_KINDS = ["window"] * 2 + ["csa" if i % 2 == 0 else "hca" for i in range(41)]  # 2 + 21 + 20
TURN = 512


def kind_of(c: LayerCache) -> str:
    return "window" if c.ratio == 0 else ("csa" if c.ratio == 4 else "hca")


def run_model(model, n: int, kv_format: str, chunk: int = 256):
    model.kv_format = kv_format
    cache = model.make_cache()
    ids = [(7919 * i) % 120000 + 100 for i in range(n)]
    logits = None
    for p in range(0, n, chunk):
        logits = model(mx.array([ids[p : p + chunk]]), cache=cache)[0, -1]
        mx.eval([c.state for c in cache] + [logits])
    return cache, logits.astype(mx.float32)


def _tile(a: mx.array, n: int) -> mx.array:
    """[B, N, ...] -> [B, n, ...] repeating the N real rows."""
    N = a.shape[1]
    if n <= N:
        return a[:, :n]
    reps = -(-n // N)
    return mx.concatenate([a] * reps, axis=1)[:, :n]


def synthesise(real: LayerCache, tokens: int) -> LayerCache:
    """A cache of `real`'s layout holding `tokens` positions: real ring and pending/overlap rows,
    compressed entries repeated from the real ones (pending rows cut/extended to tokens % m)."""
    c = LayerCache(*real.layout(), kv_format=real.kv_format)
    c.offset = tokens
    c.ring = {k: mx.array(v) for k, v in real.ring.items()}
    for key in ("comp", "index"):
        src, dst = getattr(real, key), getattr(c, key)
        if src is None:
            continue
        n = tokens // src.ratio
        dst._parts = {k: _tile(v[:, : src.num_entries], n) for k, v in src._parts.items()}
        dst.num_entries = n
        r = tokens % src.ratio
        dst.pending_kv = _tile(mx.zeros((1, 1, src.width), mx.float32), r) if r else src.pending_kv[:, :0]
        dst.pending_gate = mx.zeros_like(dst.pending_kv)
        if src.overlap:
            dst.overlap_kv, dst.overlap_gate = src.overlap_kv, src.overlap_gate
    mx.eval(c.state)
    return c


def grow(c: LayerCache, n: int) -> LayerCache:
    """`c` with `n` more positions (entries repeated): what a chat turn adds."""
    return synthesise(c, c.offset + n)


def file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("seg-*.safetensors"))


def measure(store: SessionStore, name: str, caches, logits, fp: Fingerprints, tokens: int):
    ids = [(7919 * i) % 120000 + 100 for i in range(tokens)]  # 6-digit ids: a realistic manifest
    t = time.perf_counter()
    store.save(name, caches, ids, logits, fp)
    save_s = time.perf_counter() - t
    size = file_bytes(store.path(name))
    t = time.perf_counter()
    loaded = store.load(name, fp)
    mx.eval([c.state for c in loaded.caches])
    load_s = time.perf_counter() - t
    assert loaded.caches[-1].offset == tokens
    more = [grow(c, TURN) for c in caches]
    t = time.perf_counter()
    m = store.save(name, more, ids + [101] * TURN, logits, fp)
    turn_s = time.perf_counter() - t
    turn_bytes = m["segments"][-1]["bytes"]
    shutil.rmtree(store.path(name))
    return dict(bytes=size, save_s=save_s, load_s=load_s, turn_bytes=turn_bytes, turn_s=turn_s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32768,131072")
    ap.add_argument("--real-tokens", type=int, default=512)
    ap.add_argument("--formats", default="fp8,bf16")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "sessions.csv"))
    a = ap.parse_args()

    cfg = preset_config("flash", layers=4, experts=4)
    t = time.perf_counter()
    model = load_random(Model(ModelArgs.from_dict(cfg)), seed=0, dtype=mx.bfloat16)
    print(f"model: Flash dimensions, 4 layers (W W CSA HCA), 4 experts, random bf16 weights "
          f"({time.perf_counter() - t:.0f}s to build)", flush=True)
    fp = Fingerprints("bench-model", "bench-tokenizer", "bench-encoding")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="dsv4-bench-sessions-"))
    store = SessionStore(work)
    rows = []
    for kv in a.formats.split(","):
        t = time.perf_counter()
        real, logits = run_model(model, a.real_tokens, kv)
        print(f"[{kv}] ran the model on {a.real_tokens} real tokens in {time.perf_counter() - t:.0f}s; "
              "the rest of the state is synthesised from them", flush=True)
        fpk = Fingerprints(fp.model, fp.tokenizer, fp.encoding, f"{kv}-v1")
        by_kind = {kind_of(c): c for c in real}
        for T in [int(x) for x in a.tokens.split(",")]:
            for layout, kinds in (("flash-4L", [kind_of(c) for c in real]), ("flash-43L", FLASH_KINDS)):
                caches = [synthesise(by_kind[k], T) for k in kinds]
                state = sum(c.nbytes for c in caches)
                r = measure(store, f"{layout}-{kv}-{T}", caches, logits, fpk, T)
                row = dict(layout=layout, kv_format=kv, tokens=T, state_bytes=state, file_bytes=r["bytes"],
                           bytes_per_token=r["bytes"] / T, save_s=r["save_s"],
                           save_MBps=r["bytes"] / r["save_s"] / 1e6, load_s=r["load_s"],
                           load_MBps=r["bytes"] / r["load_s"] / 1e6, turn_tokens=TURN,
                           turn_bytes=r["turn_bytes"], turn_save_s=r["turn_s"],
                           real_tokens=a.real_tokens, synthesised=T - a.real_tokens)
                rows.append(row)
                print(f"  {layout:<9} {kv:<4} {T:>7,} tokens: {r['bytes'] / 2**20:8.1f} MiB "
                      f"({row['bytes_per_token']:,.0f} B/token), save {row['save_MBps']:,.0f} MB/s, "
                      f"load {row['load_MBps']:,.0f} MB/s, turn +{TURN}: {r['turn_bytes'] / 2**20:.2f} MiB "
                      f"in {r['turn_s'] * 1e3:.0f} ms", flush=True)
                del caches
    shutil.rmtree(work, ignore_errors=True)

    hdr = ["layout", "kv", "tokens", "MiB on disk", "B/token", "save s", "save MB/s", "load s",
           "load MB/s", f"turn +{TURN} MiB", "turn save ms"]
    table = [[r["layout"], r["kv_format"], f"{r['tokens']:,}", f"{r['file_bytes'] / 2**20:,.1f}",
              f"{r['bytes_per_token']:,.0f}", f"{r['save_s']:.2f}", f"{r['save_MBps']:,.0f}",
              f"{r['load_s']:.2f}", f"{r['load_MBps']:,.0f}", f"{r['turn_bytes'] / 2**20:.2f}",
              f"{r['turn_save_s'] * 1e3:.0f}"] for r in rows]
    widths = [max(len(h), *(len(x[i]) for x in table)) for i, h in enumerate(hdr)]
    print()
    print(f"sessions benchmark ({platform.machine()}, {platform.system()}, mlx {mx.__version__}, "
          f"device {mx.default_device()}; load = read + SHA-256 check, warm page cache; state beyond "
          f"{a.real_tokens} real tokens synthesised)")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(hdr, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for x in table:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(x, widths)) + " |")
    out = write_rows_csv(a.out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
