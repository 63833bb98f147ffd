"""The `dsv4` command.

Exit codes: 0 success; 1 unexpected failure; 2 bad input (missing or invalid model folder,
config or arguments).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import __version__

EXIT_BAD_INPUT = 2

app = typer.Typer(
    name="dsv4",
    help="DeepSeek-V4 on Apple MLX: inspect, convert and chat with V4-Flash / V4-Pro.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _console(stderr: bool = False) -> Console:
    no_color = bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"
    return Console(stderr=stderr, no_color=no_color, highlight=False)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """One clear sentence on stderr and a non-zero exit, never a traceback."""
    _console(stderr=True).print(f"dsv4: error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool):
    if value:
        typer.echo(f"dsv4-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    """DeepSeek-V4 on Apple MLX."""


def load_config(model_dir: Path) -> dict:
    path = model_dir / "config.json" if model_dir.is_dir() else model_dir
    if not model_dir.exists():
        fail(f"{model_dir} does not exist")
    if not path.is_file():
        fail(f"{model_dir} has no config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{path} is not valid JSON ({e})")
    if not isinstance(cfg, dict):
        fail(f"{path} does not hold a JSON object")
    return cfg


@app.command()
def info(
    model_dir: Path = typer.Argument(..., help="A model folder (or its config.json); weights are not needed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Layer schedule, parameter counts and decode-state size of a model."""
    from ..model import ConfigError, ModelArgs
    from ..model.summary import model_summary

    cfg = load_config(model_dir)
    try:
        args = ModelArgs.from_dict(cfg)
    except (ConfigError, TypeError, ValueError) as e:
        fail(f"{model_dir} is not a usable DeepSeek-V4 config: {e}")
    s = model_summary(args, cfg)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    out = _console()
    out.print(f"[bold]{model_dir}[/bold]  model_type={cfg.get('model_type')}")
    kinds = s["layer_kinds"]
    letters = "".join({"window": "W", "csa": "C", "hca": "H"}[k] for k in kinds)
    out.print(
        f"layers: {s['num_layers']} (+{s['num_mtp_layers']} MTP)   "
        f"window-only {kinds.count('window')} · CSA {kinds.count('csa')} · HCA {kinds.count('hca')}"
    )
    out.print(f"schedule: {letters}  (W window, C CSA rate 4, H HCA rate {s['hca_rates'] or '-'})")
    out.print(
        f"parameters: {s['parameters_total'] / 1e9:.2f}B total, "
        f"{s['parameters_active'] / 1e9:.2f}B active per token, "
        f"{s['parameters_mtp'] / 1e9:.2f}B in MTP"
    )
    t = Table(title=f"decode state ({s['kv_format']}), batch 1")
    t.add_column("context", justify="right")
    t.add_column("bytes", justify="right")
    t.add_column("GiB", justify="right")
    for ctx, b in s["state_bytes_at"].items():
        t.add_row(f"{int(ctx):,}", f"{b:,}", f"{b / 2**30:.2f}")
    out.print(t)
    out.print(f"growth: {s['state_bytes_per_token']:,.0f} bytes per token")


def run():  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
