"""Summarise Nsight Compute's source page (``ncu -i REP --page source --csv --print-source
sass``, as `bench/gpu_session.sh ixsource` writes it): per kernel, where the warps' stall
samples fall, by SASS instruction and by opcode.

    python bench/ncu_source.py FILE.csv [--top 25]

The page holds one table a profiled kernel (each starting with its own header row); the
columns that matter are the instruction's address and text, its warp-stall samples (all,
and not issued) and its executed-instruction count, found by name so that an Nsight
version's extra columns do not matter.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter


def _col(header, *needles):
    for i, h in enumerate(header):
        if all(n.lower() in h.lower() for n in needles):
            return i
    return None


def _num(s: str) -> float:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return 0.0


def tables(text: str):
    """[(header, rows)] of the CSV tables in ``text`` (a new table at each header row)."""
    out, header, rows = [], None, []
    for rec in csv.reader(io.StringIO(text)):
        if not rec:
            continue
        if _col(rec, "source") is not None and _col(rec, "address") is not None:
            if header is not None:
                out.append((header, rows))
            header, rows = rec, []
        elif header is not None and len(rec) == len(header):
            rows.append(rec)
    if header is not None:
        out.append((header, rows))
    return out


def summarise(header, rows, top: int) -> str:
    src, addr = _col(header, "source"), _col(header, "address")
    allc = _col(header, "stall sampling", "all")
    notc = _col(header, "stall sampling", "not")
    exe = _col(header, "instructions executed")
    if allc is None:
        return "  (no warp-stall sampling column: " + ", ".join(header[:12]) + ")"
    tot = sum(_num(r[allc]) for r in rows) or 1.0
    lines = [f"  {len(rows)} instructions, {tot:.0f} stall samples"]
    by_op = Counter()
    for r in rows:
        op = r[src].strip().split(" ")[0]
        if op.startswith("@"):
            op = r[src].strip().split(" ")[1]
        by_op[op.split(".")[0]] += _num(r[allc])
    lines.append("  by opcode: " + ", ".join(f"{op} {100 * n / tot:.1f}%"
                                             for op, n in by_op.most_common(10)))
    lines.append(f"  {'address':>8}  {'all%':>5}  {'notiss%':>7}  {'executed':>9}  source")
    for r in sorted(rows, key=lambda r: -_num(r[allc]))[:top]:
        lines.append(f"  {r[addr]:>8}  {100 * _num(r[allc]) / tot:5.1f}  "
                     f"{100 * _num(r[notc]) / tot if notc is not None else 0:7.1f}  "
                     f"{r[exe] if exe is not None else '':>9}  {r[src].strip()[:70]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    with open(args.csv, errors="replace") as f:
        text = f.read()
    found = tables(text)
    if not found:
        print(f"{args.csv}: no source table found")
        return 1
    for i, (header, rows) in enumerate(found):
        print(f"table {i}:")
        print(summarise(header, rows, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
