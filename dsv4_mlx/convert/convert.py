"""`dsv4 convert`: published FP8/FP4 checkpoint -> MLX folder, streaming and resumable.

Order of work: resolve the source (folder or Hub), read every shard header, build the plan
(formats, sizes, output shards), preflight disk and memory, then write the output shards one
by one. Each shard is written under a temporary name and renamed when complete, and its
SHA-256 is recorded in `.dsv4-convert.json`. A rerun skips shards whose file still has the
recorded hash. The index, config, tokenizer files and model card are written last.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import __version__
from . import formats
from .plan import Item, Plan, PlanError, build_plan, listing_from_inventory
from .recipes import QUANT, rules_for
from .safetensors_io import bf16_to_float32, float32_to_bf16
from .source import Source, resolve
from .writer import ShardWriter, atomic_write_text, sha256_file

PROGRESS = ".dsv4-convert.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


class ConvertError(RuntimeError):
    """A conversion that cannot go on (one clear sentence)."""


# -- one logical weight -> its output arrays ----------------------------------------------------

def _dequant(src: Source, name: str, scale: Optional[str], source: str, block: int) -> np.ndarray:
    w = src.get(name)
    if source == "fp8":
        return formats.dequant_fp8(w, src.get(scale), block)
    if source == "fp4":
        return formats.dequant_fp4(w, src.get(scale))
    if source == "bf16":
        return bf16_to_float32(w)
    return np.asarray(w, dtype=np.float32)


QUANT_BLOCK = 1 << 24  # elements quantized at once: bounds the memory of large tensors


def _mx_quantize(bf16_bits: np.ndarray, fmt: str, group_size: int):
    """MLX quantization of a bf16 matrix (given as raw uint16 bits), in row blocks."""
    import mlx.core as mx

    q = QUANT[fmt]
    rows = max(1, QUANT_BLOCK // bf16_bits.shape[-1])
    parts = []
    for r in range(0, bf16_bits.shape[0], rows):
        w = mx.array(bf16_bits[r : r + rows]).view(mx.bfloat16)
        out = mx.quantize(w, group_size, q["bits"], mode=q["mode"])
        parts.append([np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a) for a in out])
        del w, out
    return [np.concatenate(p) if len(parts) > 1 else p[0] for p in zip(*parts)]


def convert_item(it: Item, src: Source, block: int) -> List[np.ndarray]:
    """The output arrays of `it`, in the order of `it.outputs`."""
    stacked = len(it.members) > 1
    if it.fmt == "keep" and it.source in ("bf16", "f32", "i64"):
        arrs = [np.asarray(src.get(m)) for m in it.members]
        if it.source == "i64":
            for a in arrs:
                if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
                    raise ConvertError(f"{it.members[0]} holds values that do not fit int32")
            arrs = [a.astype(np.int32) for a in arrs]
        return [np.stack(arrs) if stacked else arrs[0]]
    outs = [np.empty(shape, dtype=_np_dtype(dt)) for _, dt, shape in it.outputs]
    for e, (m, s) in enumerate(zip(it.members, it.scales)):
        if (it.source, it.fmt) == ("fp4", "mxfp4"):
            parts = formats.fp4_repack(src.get(m), src.get(s))  # the same bytes, in numpy
        elif (it.source, it.fmt) == ("fp8", "mxfp8"):
            parts = formats.fp8_repack(src.get(m), src.get(s), block)
        else:
            # bf16 bits: as stored for BF16 sources, exact for FP8/FP4 ones (e4m3/e2m1 x 2^k)
            bits = src.get(m) if it.source == "bf16" else float32_to_bf16(_dequant(src, m, s, it.source, block))
            if it.fmt in QUANT:
                parts = _mx_quantize(bits, it.fmt, it.group_size)
            else:  # bf16 (or keep of an FP8/FP4 tensor, which means bf16)
                parts = [bits]
        for o, p in zip(outs, parts):
            if stacked:
                o[e] = p
            else:
                o[...] = p
    return outs


def _np_dtype(dt: str):
    return {"U32": np.uint32, "U8": np.uint8, "BF16": np.uint16, "F32": np.float32, "I32": np.int32}[dt]


# -- reporting -------------------------------------------------------------------------------

@dataclass
class Summary:
    out: Path
    plan: Plan
    written: int
    skipped: int
    seconds: float


def plan_table(plan: Plan, title: str):
    from rich.table import Table

    by_fmt: Dict[str, List[Item]] = {}
    for it in plan.items:
        by_fmt.setdefault(it.fmt, []).append(it)
    t = Table(title=title)
    for c in ("format", "tensors", "parameters", "output", "bits/weight", "exact"):
        t.add_column(c, justify="right" if c not in ("format", "exact") else "left")
    for fmt, items in sorted(by_fmt.items(), key=lambda kv: -sum(i.out_bytes for i in kv[1])):
        p = sum(i.params for i in items)
        b = sum(i.out_bytes for i in items)
        ex = {i.exact for i in items}
        t.add_row(fmt, f"{len(items):,}", f"{p / 1e9:.3f}B", _gib(b), f"{8 * b / max(p, 1):.2f}",
                  "yes" if ex == {True} else ("no" if ex == {False} else "partly"))
    t.add_row("total", f"{len(plan.items):,}", f"{plan.params / 1e9:.3f}B", _gib(plan.out_bytes),
              f"{plan.bits_per_weight():.2f}", "")
    return t


def _gib(b: int) -> str:
    return f"{b / 2**30:,.2f} GiB"


# -- the driver ------------------------------------------------------------------------------

def dry_run_plan(config: Dict, recipe: str, overrides: Sequence[str] = (), keep_mtp: bool = True) -> Plan:
    """The plan of a published config without any weights (spec §3.2 inventory)."""
    return build_plan(listing_from_inventory(config), config, rules_for(recipe, overrides), keep_mtp)


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _peak_memory(plan: Plan, src: Source) -> int:
    """Bytes held at once: the largest item's outputs plus one dequantized member in fp32."""
    worst = 0
    for it in plan.items:
        member = 1
        for d in it.shape[-2:]:
            member *= d
        extra = member * 4 * (2 if it.fmt in QUANT and (it.source, it.fmt) not in (("fp4", "mxfp4"), ("fp8", "mxfp8")) else 1)
        worst = max(worst, it.out_bytes + extra)
    return worst + 512 * 2**20


def convert(
    source: str,
    out: Path,
    recipe: str = "mixed-4-8",
    overrides: Sequence[str] = (),
    keep_mtp: bool = True,
    force: bool = False,
    max_shard_bytes: Optional[int] = None,
    console=None,
    show_progress: bool = True,
    _after_shard: Optional[Callable[[int], None]] = None,
) -> Summary:
    from rich.console import Console

    console = console or Console(stderr=True)
    t0 = time.time()
    rules = rules_for(recipe, overrides)
    folder = resolve(source)
    src = Source(folder)
    kw = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    plan = build_plan(src.listing(), src.config, rules, keep_mtp, **kw)
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    block = int((src.config.get("quantization_config") or {}).get("weight_block_size", [128, 128])[0])

    out = Path(out).expanduser()
    names = plan.shard_names()
    fingerprint = plan.fingerprint()
    progress_path = out / PROGRESS
    record = {"version": 1, "fingerprint": fingerprint, "recipe": recipe, "shards": {}, "complete": False}
    if out.exists() and any(out.iterdir()):
        old = None
        if progress_path.is_file():
            try:
                old = json.loads(progress_path.read_text())
            except json.JSONDecodeError:
                old = None
        if force:
            _clear_outputs(out)
        elif old is None or old.get("fingerprint") != fingerprint:
            raise ConvertError(
                f"{out} already exists and is not an unfinished conversion of this source and "
                "recipe; choose another folder or pass --force to start over"
            )
        elif old.get("complete"):
            console.print(f"{out} is already a complete conversion ({recipe}); nothing to do")
            return Summary(out, plan, 0, len(names), time.time() - t0)
        else:
            record = old
    out.mkdir(parents=True, exist_ok=True)

    # which shards are done (the file still has the recorded hash)
    done = set()
    for n in names:
        sha = record["shards"].get(n)
        if sha and (out / n).is_file() and sha256_file(out / n) == sha:
            done.add(n)
        else:
            record["shards"].pop(n, None)
    remaining = sum(sum(plan.items[i].out_bytes for i in idx) for n, idx in zip(names, plan.shards) if n not in done)

    free = shutil.disk_usage(out).free
    need = remaining + 64 * 2**20
    if free < need:
        raise ConvertError(f"{out} has {_gib(free)} free but the conversion needs {_gib(need)} more")
    ram, peak = _total_ram(), _peak_memory(plan, src)
    if ram and peak > 0.9 * ram:
        raise ConvertError(f"converting needs about {_gib(peak)} of memory at once, more than this machine's {_gib(ram)}")

    atomic_write_text(progress_path, json.dumps(record, indent=1))
    import mlx.core as mx

    mx.set_cache_limit(0)  # re-quantization temporaries must not pile up in MLX's buffer cache
    written = 0
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn, DownloadColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as prog, \
         Progress(TextColumn("output"), BarColumn(), DownloadColumn(binary_units=True),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                  disable=not show_progress) as bytes_prog:
        t_shards = prog.add_task("shards ", total=len(names), completed=len(done))
        t_tensors = prog.add_task("tensors", total=len(plan.items))
        t_bytes = bytes_prog.add_task("bytes", total=remaining)
        for s, (name, idx) in enumerate(zip(names, plan.shards)):
            if name in done:
                prog.advance(t_tensors, len(idx))
                continue
            specs = [o for i in idx for o in plan.items[i].outputs]
            writer = ShardWriter(out / name, specs, {"format": "mlx"})
            try:
                for i in idx:
                    it = plan.items[i]
                    for (oname, _, _), arr in zip(it.outputs, convert_item(it, src, block)):
                        writer.write(oname, arr)
                    prog.advance(t_tensors)
                    bytes_prog.advance(t_bytes, it.out_bytes)
                sha = writer.close()
            except OSError as e:
                writer.abort()
                if getattr(e, "errno", None) == 28:
                    raise ConvertError(f"the disk holding {out} is full; free space and run the same command again to resume") from None
                raise
            except BaseException:
                writer.abort()
                raise
            record["shards"][name] = sha
            atomic_write_text(progress_path, json.dumps(record, indent=1))
            written += 1
            prog.advance(t_shards)
            if _after_shard:
                _after_shard(s)

    _write_metadata(out, plan, names, src, recipe, keep_mtp, source)
    record["complete"] = True
    atomic_write_text(progress_path, json.dumps(record, indent=1))
    return Summary(out, plan, written, len(done), time.time() - t0)


def _clear_outputs(out: Path) -> None:
    """Remove what a conversion writes (and nothing else) before starting over."""
    for p in out.iterdir():
        if (p.name.startswith("model-") and ".safetensors" in p.name) or p.name in (
            PROGRESS, "model.safetensors.index.json", "config.json", "README.md", *TOKENIZER_FILES
        ) or p.name.endswith(".partial"):
            p.unlink()


def _write_metadata(out: Path, plan: Plan, names: List[str], src: Source, recipe: str, keep_mtp: bool,
                    source: str = ""):
    weight_map = {o[0]: n for n, idx in zip(names, plan.shards) for i in idx for o in plan.items[i].outputs}
    index = {"metadata": {"total_size": plan.out_bytes, "format": "mlx"}, "weight_map": weight_map}
    atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=1))
    cfg = dict(src.config)
    cfg.pop("quantization_config", None)
    cfg["quantization"] = plan.quantization_config()
    if not keep_mtp or any(k.startswith("dspark_") for k in cfg) or not any(i.path.startswith("mtp.") for i in plan.items):
        cfg["num_nextn_predict_layers"] = 0
    cfg["dsv4_mlx"] = {"version": __version__, "recipe": recipe,
                       "bits_per_weight": round(plan.bits_per_weight(), 3)}
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        p = src.folder / f
        if p.is_file():
            shutil.copyfile(p, out / f)
    if not (out / "tokenizer.json").is_file():
        from ..encoding import tokenizer_files_dir

        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_files_dir() / f, out / f)
    atomic_write_text(out / "README.md", _model_card(plan, src, recipe, source))


def _model_card(plan: Plan, src: Source, recipe: str, source: str = "") -> str:
    from huggingface_hub import ModelCard, ModelCardData

    # a Hub source is named by its repo id (its local folder is a snapshot hash)
    hub_id = source if source and not Path(source).expanduser().exists() and source.count("/") == 1 else None
    base = hub_id or src.config.get("_name_or_path") or src.folder.name
    data = ModelCardData(library_name="mlx", base_model=base if "/" in str(base) else None,
                         tags=["mlx", "deepseek_v4", "dsv4-mlx"], license="mit")
    body = (
        f"# {hub_id or src.folder.name} ({recipe}, MLX)\n\n"
        f"Converted with dsv4-mlx {__version__} from the published checkpoint.\n\n"
        f"- recipe: `{recipe}`\n- bits per weight: {plan.bits_per_weight():.2f}\n"
        f"- size: {plan.out_bytes / 2**30:.2f} GiB in {len(plan.shards)} shards\n\n"
        "Load with `dsv4_mlx.load(path)` or chat with `dsv4 chat PATH`.\n"
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def upload(out: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, repo_type="model")
    api.upload_large_folder(repo_id=repo_id, folder_path=str(out), repo_type="model",
                            ignore_patterns=[PROGRESS, "*.partial"])


__all__ = ["convert", "dry_run_plan", "plan_table", "upload", "ConvertError", "PlanError"]
