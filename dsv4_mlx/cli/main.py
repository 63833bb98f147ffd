"""The `dsv4` command.

Exit codes: 0 success; 1 unexpected failure; 2 bad input (missing or invalid model folder,
config or arguments).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

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
    kv_format: str = typer.Option("fp8", "--kv-format", help="Decode-state storage: fp8 (default) or bf16."),
):
    """Layer schedule, parameter counts and decode-state size of a model."""
    from ..model import ConfigError, ModelArgs
    from ..model.summary import model_summary

    cfg = load_config(model_dir)
    try:
        args = ModelArgs.from_dict(cfg)
    except (ConfigError, TypeError, ValueError) as e:
        fail(f"{model_dir} is not a usable DeepSeek-V4 config: {e}")
    if kv_format not in ("fp8", "bf16"):
        fail(f"--kv-format must be fp8 or bf16, not {kv_format!r}")
    s = model_summary(args, cfg, kv_format)
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
    out.print(f"growth: {s['state_bytes_per_token']:,.1f} bytes per token")


def _size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().rstrip("ib").rstrip("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        fail(f"{text!r} is not a size (e.g. 5G, 512M)")


@app.command()
def convert(
    source: str = typer.Argument(..., help="Hub repo id (deepseek-ai/DeepSeek-V4-Flash) or a local folder."),
    out: Optional[Path] = typer.Argument(None, help="Output folder (not needed with --dry-run)."),
    recipe: str = typer.Option("mixed-4-8", help="mixed-4-8 (default), q4-q8 or bf16."),
    override: List[str] = typer.Option([], "--override", help="PATTERN=FORMAT on module paths, e.g. '^head$=bf16'. Repeatable."),
    no_mtp: bool = typer.Option(False, "--no-mtp", help="Drop the MTP block."),
    force: bool = typer.Option(False, "--force", help="Start over in an existing output folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing. Works on a config.json alone."),
    max_shard_size: str = typer.Option("5G", help="Largest output shard."),
    upload_repo: Optional[str] = typer.Option(None, help="Upload the result to this Hub repo."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Convert a published FP8/FP4 checkpoint to an MLX folder (streaming, resumable)."""
    from ..convert.convert import ConvertError, convert as run_convert, dry_run_plan, plan_table, upload
    from ..convert.plan import PlanError

    err = _console(stderr=True)
    try:
        if dry_run:
            folder = Path(source).expanduser()
            if folder.is_dir() and not any(folder.glob("*.safetensors")):
                cfg = load_config(folder)
                if cfg.get("model_type") != "deepseek_v4":
                    fail(f"{source} is not a DeepSeek-V4 checkpoint (model_type {cfg.get('model_type')!r})")
                plan = dry_run_plan(cfg, recipe, override, keep_mtp=not no_mtp)
            else:
                from ..convert.convert import build_plan, rules_for
                from ..convert.source import Source, resolve

                src = Source(resolve(source))
                plan = build_plan(src.listing(), src.config, rules_for(recipe, override), not no_mtp,
                                  _size(max_shard_size))
            _console().print(plan_table(plan, f"{source} -> {recipe} (dry run)"))
            _console().print(f"{len(plan.items):,} output weights, {plan.out_bytes / 2**30:,.2f} GiB, "
                             f"{plan.bits_per_weight():.2f} bits per weight")
            return
        if out is None:
            fail("an output folder is needed (or --dry-run)")
        s = run_convert(source, out, recipe, override, keep_mtp=not no_mtp, force=force,
                        max_shard_bytes=_size(max_shard_size), console=err,
                        show_progress=not quiet and err.is_terminal or not quiet)
        err.print(plan_table(s.plan, f"{source} -> {out} ({recipe})"))
        err.print(f"wrote {s.written} shards ({s.skipped} already done) in {s.seconds:.1f}s: {out}")
        if upload_repo:
            upload(out, upload_repo)
            err.print(f"uploaded to {upload_repo}")
    except (PlanError, ConvertError, ValueError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume", code=130)


@app.command("demo-model")
def demo_model(
    out: Path = typer.Argument(..., help="Output folder."),
    preset: str = typer.Option("tiny", help="tiny, flash or pro (real dimensions, fewer layers/experts)."),
    layers: Optional[int] = typer.Option(None, help="Number of layers."),
    experts: Optional[int] = typer.Option(None, help="Number of routed experts."),
    seed: int = typer.Option(0, help="Random seed."),
    source: bool = typer.Option(False, "--source", help="Write the published FP8/FP4 layout instead of MLX."),
    recipe: str = typer.Option("mixed-4-8", help="Recipe of the MLX output."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder."),
):
    """Write a random-weight model in the real architecture (for tests, benchmarks, the demo)."""
    import shutil
    import tempfile

    from ..convert.convert import ConvertError, convert as run_convert
    from ..demo import preset_config, write_source_checkpoint

    if out.exists() and any(out.iterdir()) and not force:
        fail(f"{out} already exists; pass --force to replace it")
    try:
        cfg = preset_config(preset, layers, experts)
    except ValueError as e:
        fail(str(e))
    err = _console(stderr=True)
    if source:
        if out.exists():
            shutil.rmtree(out)
        write_source_checkpoint(out, cfg, seed)
        err.print(f"wrote a random-weight {preset} checkpoint in the published FP8/FP4 layout: {out}")
        return
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        write_source_checkpoint(Path(tmp) / "src", cfg, seed)
        try:
            run_convert(str(Path(tmp) / "src"), out, recipe, force=True, console=err, show_progress=False)
        except ConvertError as e:
            fail(str(e))
    err.print(f"wrote a random-weight {preset} model ({recipe}): {out}")


def run():  # pragma: no cover - console entry point
    app()


# -- generate, demo and chat: their modules register on `app` when imported ---------------------
from . import chat as _chat, generate_cmd as _generate_cmd, sessions_cmd as _sessions_cmd  # noqa: E402,F401

from . import bench_cmd as _bench_cmd  # noqa: E402,F401
from . import check_cmd as _check_cmd  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
