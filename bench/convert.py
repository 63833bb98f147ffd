"""Benchmark `dsv4 convert`: throughput and peak resident memory on a multi-shard fixture.

The fixture is a random-weight checkpoint in the published FP8/FP4 layout with the real
V4-Flash dimensions and fewer layers and experts. The conversion runs in a child process so
its peak RSS is measured alone (`getrusage(RUSAGE_CHILDREN)`).

    python bench/convert.py [--layers 3] [--experts 32] [--shards 6] [--recipe mixed-4-8]

Prints a table and writes bench/out/convert.csv.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_rows_csv  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--recipes", default="mixed-4-8,q4-q8,bf16")
    ap.add_argument("--max-shard-size", default="1G")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()

    from dsv4_mlx.demo import preset_config, write_source_checkpoint

    work = Path(a.workdir or tempfile.mkdtemp(prefix="dsv4-bench-"))
    src = work / "src"
    if not (src / "config.json").is_file():
        cfg = preset_config(a.preset, a.layers, a.experts)
        t = time.time()
        write_source_checkpoint(src, cfg, seed=0, shards=a.shards)
        print(f"fixture written in {time.time() - t:.1f}s: {src}")
    shard_sizes = [p.stat().st_size for p in src.glob("model-*.safetensors")]
    src_bytes = sum(shard_sizes)
    rows = []
    for recipe in a.recipes.split(","):
        out = work / f"out-{recipe}"
        shutil.rmtree(out, ignore_errors=True)
        # each conversion in its own process, reporting its own peak RSS
        code = (
            "import resource, sys\n"
            "from pathlib import Path\n"
            "from dsv4_mlx.cli.main import _size\n"
            "from dsv4_mlx.convert.convert import convert\n"
            f"convert({str(src)!r}, Path({str(out)!r}), recipe={recipe!r}, show_progress=False,"
            f" max_shard_bytes=_size({a.max_shard_size!r}))\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        )
        t = time.time()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        dt = time.time() - t
        if r.returncode:
            print(r.stderr)
            raise SystemExit(r.returncode)
        rss = int(r.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss is in KiB on Linux
        out_bytes = sum(p.stat().st_size for p in out.glob("model-*.safetensors"))
        rows.append(dict(
            recipe=recipe, source_gib=src_bytes / 2**30, largest_source_shard_gib=max(shard_sizes) / 2**30,
            output_gib=out_bytes / 2**30, output_shards=len(list(out.glob("model-*.safetensors"))),
            seconds=dt, source_mb_s=src_bytes / dt / 1e6, output_mb_s=out_bytes / dt / 1e6,
            peak_rss_gib=rss / 2**30,
        ))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"dsv4 convert: {a.preset} dims, {a.layers} layers, {a.experts} experts, {a.shards} source shards")
    for c in ("recipe", "source GiB", "largest src shard GiB", "output GiB", "shards", "s", "src MB/s", "out MB/s", "peak RSS GiB"):
        t.add_column(c, justify="right")
    for r_ in rows:
        t.add_row(r_["recipe"], f"{r_['source_gib']:.2f}", f"{r_['largest_source_shard_gib']:.2f}",
                  f"{r_['output_gib']:.2f}", str(r_["output_shards"]), f"{r_['seconds']:.1f}",
                  f"{r_['source_mb_s']:.0f}", f"{r_['output_mb_s']:.0f}", f"{r_['peak_rss_gib']:.2f}")
    Console().print(t)
    write_rows_csv(Path(__file__).parent / "out" / "convert.csv", rows)
    print(json.dumps({"workdir": str(work)}))


if __name__ == "__main__":
    main()
