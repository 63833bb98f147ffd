"""Helpers the benchmark scripts share: Nsight Compute CSV parsing, marker kernels that
bracket the profiled calls, and CSV output."""

from __future__ import annotations

import csv
from pathlib import Path

import mlx.core as mx

_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}


def ncu_kernel_times(path) -> list[tuple[int, str, float]]:
    """(launch id, kernel name, GPU time in µs) of every kernel in an
    ``ncu --metrics gpu__time_duration.sum --csv --log-file F`` log, in launch order."""
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]
    rows = []
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            us = float(r["Metric Value"].replace(",", "")) * _US.get(r["Metric Unit"], 1e-3)
            rows.append((int(r["ID"]), r["Kernel Name"], us))
    rows.sort()
    return rows


def cuda_marker(name: str) -> None:
    """Launch (and wait for) a one-thread kernel named ``dsv4mark_<name>``: a landmark in
    an Nsight Compute log between the kernels of interest."""
    kern = mx.fast.cuda_kernel(name=f"dsv4mark_{name}", input_names=["x"], output_names=["y"],
                               source="y[0] = x[0];")
    mx.eval(kern(inputs=[mx.zeros((1,), mx.float32)], output_shapes=[(1,)],
                 output_dtypes=[mx.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1),
                 stream=mx.gpu)[0])


def cuda_profiler(on: bool) -> None:
    """cuProfilerStart/Stop (driver API), so that `ncu --profile-from-start off` profiles
    only the calls of interest (not the set-up's kernels); harmless without ncu."""
    import ctypes
    import sys

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        rc = (lib.cuProfilerStart if on else lib.cuProfilerStop)()
    except OSError as e:
        rc = str(e)
    if rc:
        print(f"cuProfiler{'Start' if on else 'Stop'}: {rc}", file=sys.stderr)


def write_rows_csv(path, rows: list[dict]) -> Path:
    """Rows (dicts with the same keys) as a CSV file with a header; the folder is made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        w.writeheader()
        w.writerows(rows)
    return path
