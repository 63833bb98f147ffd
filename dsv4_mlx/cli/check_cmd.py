"""`dsv4 check [MODEL]`: the GPU kernels against the plain-ops path on this machine
(see dsv4_mlx/kernels/selfcheck.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .main import _console, app, fail


@app.command()
def check(
    model_dir: Optional[Path] = typer.Argument(None, help="A converted model folder (default: the demo model)."),
    layers: int = typer.Option(4, help="Check the model's first N layers (0: all)."),
    decode: int = typer.Option(4, help="Decode steps after the prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check that this machine's GPU kernels compute what the plain-ops path computes."""
    from rich.table import Table

    from .. import load
    from .generate_cmd import resolve_model
    from ..kernels.selfcheck import check as run_check

    err = _console(stderr=True)
    model_dir = resolve_model(model_dir, err)[0]
    if layers < 0 or decode < 0:
        fail("--layers and --decode must be >= 0")
    model, _ = load(model_dir)
    if err.is_terminal:  # a spinner naming the run in progress
        with err.status("checking the GPU kernels") as status:
            rep = run_check(model, layers=layers or None, decode=decode,
                            progress=lambda what: status.update(f"checking: {what}"))
    else:  # (a log) one line a run, as it starts
        rep = run_check(model, layers=layers or None, decode=decode,
                        progress=lambda what: err.print(f"checking: {what}", soft_wrap=True,
                                                       markup=False))
    if as_json:
        typer.echo(json.dumps(rep, indent=1))
    else:
        out = _console()
        if "note" in rep:
            out.print(rep["note"])
        else:
            verdict = "[green]agree[/green]" if rep["ok"] else "[red]DISAGREE[/red]"
            diff = (f"largest logit difference {rep['rel_diff']:.2e} of the logit range"
                    if rep["rel_diff"] is not None else f"the kernel run failed: {rep.get('error')}")
            out.print(f"{rep['backend']} kernels vs the plain-ops path ({rep['dtype']}, "
                      f"{rep['prompt_tokens']:,}-token prompt + {decode} decode steps): {verdict}, "
                      f"{diff} (tolerance {rep['tolerance']:.0e})", markup=True, soft_wrap=True)
        for k, why in rep.get("fallbacks", {}).items():
            out.print(f"[yellow]fell back to the ops path[/yellow] {k}: {why}", markup=True)
        if rep["families"]:
            t = Table(title="each kernel family alone")
            for c in ("family", "status", "difference", "to keep it on the ops path"):
                t.add_column(c)
            for f in rep["families"]:
                d = "-" if f["rel_diff"] is None else f"{f['rel_diff']:.2e}"
                t.add_row(f["family"], f["status"] + (f" ({f['detail']})" if f["detail"] else ""),
                          d, f"{f['env_var']}=ops" if f["status"] != "ok" else "")
            out.print(t)
            out.print("Please report this (dsv4 check --json) with your machine and MLX version.")
    if not rep["ok"]:
        raise typer.Exit(1)
