"""`dsv4 bench MODEL`: speed and memory at context frontiers (see dsv4_mlx/bench.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .main import _console, app, fail


@app.command()
def bench(
    model_dir: Optional[Path] = typer.Argument(None, help="A converted model folder (default: the demo model)."),
    max_context: int = typer.Option(8192, help="Largest frontier (frontiers are 2K, 4K, 8K, ...)."),
    decode_tokens: int = typer.Option(32, help="Greedy decode probe length at each frontier."),
    prefill_chunk: int = typer.Option(2048, help="Prefill chunk size."),
    kv_format: str = typer.Option("fp8", "--kv-format", help="fp8 (default) or bf16."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write the table as CSV."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write a plot (needs matplotlib)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Prefill and decode speed, state size and peak memory at context frontiers."""
    from rich.table import Table

    from .. import load
    from ..bench import run_bench, write_csv, write_png
    from .generate_cmd import resolve_model

    err = _console(stderr=True)
    model_dir = resolve_model(model_dir, err)[0]
    if kv_format not in ("fp8", "bf16"):
        fail(f"--kv-format must be fp8 or bf16, not {kv_format!r}")
    model, tok = load(model_dir)
    model.kv_format = kv_format
    try:
        report = run_bench(model, tok, max_context, decode_tokens=decode_tokens, prefill_chunk=prefill_chunk,
                           progress=lambda s: err.print(f"[dim]{s}[/dim]"))
    except ValueError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        compiled = ", compiled decode" if report.get("compiled_decode") else ""
        t = Table(title=f"dsv4 bench: {model_dir.name} ({report['device']}, {report['layers']} "
                        f"layers, {kv_format}{compiled})")
        for c in ("context", "prefill tok/s", "decode tok/s", "build+eval ms",
                  "pipelined tok/s (median ms)",
                  "first pass s", "state MiB", "peak MiB", "BW used", "prims/layer"):
            t.add_column(c, justify="right")
        for r in report["frontiers"]:
            t.add_row(f"{r['context']:,}", f"{r['prefill_tok_s']:,.1f}", f"{r['decode_tok_s']:,.2f}",
                      f"{r['decode_build_ms']:.1f} + {r['decode_eval_ms']:.1f}",
                      f"{r['decode_pipelined_tok_s']:,.2f} ({r['decode_pipelined_ms_median']:.2f})",
                      f"{r['decode_first_pass_s']:,.2f}",
                      f"{r['state_bytes'] / 2**20:,.1f}",
                      f"{r['peak_memory_bytes'] / 2**20:,.0f}",
                      f"{100 * r['bandwidth_fraction']:.1f}/{100 * r['bandwidth_fraction_pipelined']:.1f}%",
                      f"{r['primitives_per_layer']:,.1f}")
        out = _console()
        out.print(t)
        p = report["primitives"]
        out.print(f"weights read per decode token: {report['weight_bytes_per_token'] / 2**20:,.1f} MiB; "
                  f"copy bandwidth {report['bandwidth_gb_s']:,.1f} GB/s. Decode step by step (median "
                  f"ms building the step's graph + evaluating it) and pipelined (mlx-lm's "
                  f"generate_step, as in chat: tokens per second over the probe, and the "
                  f"median ms of a token), both after an untimed first pass over the same "
                  f"tokens (its seconds: first use of each shape, kernel compilation included); "
                  f"BW used: step by step / pipelined")
        out.print(f"primitives per decode step at {p['context']:,}: {p['total']:,} ({p['per_layer']:,.1f} per layer, "
                  f"{p['per_block']:,.1f} per block without the embedding and head); "
                  f"most frequent: " + ", ".join(f"{k} {v}" for k, v in list(p["by_op"].items())[:6]))
    if csv:
        write_csv(report, csv)
    if png and not write_png(report, png):
        err.print("note: matplotlib is not installed; no plot written (pip install matplotlib)")
