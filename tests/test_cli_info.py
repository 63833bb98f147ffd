"""`dsv4 --version` and `dsv4 info` on the published configs (no weights needed)."""

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from dsv4_mlx import __version__
from dsv4_mlx.cli.main import app
from dsv4_mlx.model import ModelArgs
from dsv4_mlx.model.summary import state_bytes

DATA = Path(__file__).parent / "data" / "configs"
runner = CliRunner()


def _info(folder, fmt="bf16"):
    r = runner.invoke(app, ["info", str(folder), "--json", "--kv-format", fmt])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.stdout


def test_info_flash(tmp_path):
    # a folder holding only config.json
    shutil.copy(DATA / "v4-flash" / "config.json", tmp_path / "config.json")
    d = _info(tmp_path)
    assert d["num_layers"] == 43
    assert d["compress_ratios"][:4] == [0, 0, 4, 128] and len(d["compress_ratios"]) == 44
    assert d["layer_kinds"].count("csa") == 21 and d["layer_kinds"].count("hca") == 20
    assert abs(d["parameters_total"] / 1e9 - 284.33) < 0.01
    assert abs(d["parameters_active"] / 1e9 - 13.3) < 0.05
    assert d["state_bytes_per_token"] == 6880  # spec §5.3, bf16
    at = {int(k): v for k, v in d["state_bytes_at"].items()}
    assert {131072, 1048576} <= set(at)
    # 1M tokens: 6.72 GiB of compressed entries plus the window rings and compressor states
    growth = 6880 * 2**20
    assert growth < at[1048576] < growth + 20 * 2**20
    assert round(at[1048576] / 2**30, 2) == 6.72


def test_info_pro():
    d = _info(DATA / "v4-pro")
    assert d["num_layers"] == 61 and "window" not in d["layer_kinds"]
    assert d["state_bytes_per_token"] == 9848
    # spec §5.3: 9848 B/token -> 9.62 GiB at 1M, plus ~26 MiB of rings and compressor states
    growth = 9848 * 2**20
    assert round(growth / 2**30, 2) == 9.62
    assert growth < d["state_bytes_at"]["1048576"] < growth + 32 * 2**20
    assert abs(d["parameters_total"] / 1e9 - 1573.0) < 0.05
    assert abs(d["parameters_active"] / 1e9 - 48.9) < 0.1


def test_info_human_readable():
    r = runner.invoke(app, ["info", str(DATA / "v4-flash")])
    assert r.exit_code == 0
    assert "43 (+1 MTP)" in r.stdout and "3,508.8 bytes per token" in r.stdout  # fp8 default


def test_info_default_fp8_format():
    """Spec §5.3: FP8 KV + FP4 indexer keys, about 3509 B/token (Flash), 4.91 GiB at 1M (Pro)."""
    d = _info(DATA / "v4-flash", "fp8")
    assert d["kv_format"] == "fp8" and round(d["state_bytes_per_token"]) == 3509
    p = _info(DATA / "v4-pro", "fp8")
    assert round(p["state_bytes_per_token"] * 2**20 / 2**30, 2) == 4.91
    r = runner.invoke(app, ["info", str(DATA / "v4-flash"), "--json"])
    assert json.loads(r.stdout)["kv_format"] == "fp8"


def test_state_bytes_consistent_with_summary():
    args = ModelArgs.from_dict(json.loads((DATA / "v4-flash" / "config.json").read_text()))
    assert state_bytes(args, 131072, "bf16") == _info(DATA / "v4-flash")["state_bytes_at"]["131072"]


def test_info_errors(tmp_path):
    r = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and "no config.json" in r.output
    (tmp_path / "config.json").write_text("{not json")
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and "not valid JSON" in r.output
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "num_hidden_layers": 3}))
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and "compress_ratios" in r.output
    assert "Traceback" not in r.output
