"""`dsv4 convert` on tiny checkpoints written in exactly the published layout."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

import dsv4_mlx
from dsv4_mlx.cli.main import app
from dsv4_mlx.convert import formats
from dsv4_mlx.convert.convert import ConvertError, convert
from dsv4_mlx.convert.plan import PlanError
from dsv4_mlx.convert.safetensors_io import SafeTensorsFile, write_safetensors
from dsv4_mlx.demo import preset_config, write_source_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    write_source_checkpoint(folder, preset_config("tiny"), seed=3, shards=3)
    return folder


@pytest.fixture(scope="module")
def mixed(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "out"
    convert(str(source), out, show_progress=False, max_shard_bytes=8 * 2**20)
    return out


def _src_tensors(folder):
    idx = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    files = {f: SafeTensorsFile(folder / f) for f in set(idx.values())}
    return lambda name: files[idx[name]].get(name), idx


def _out_tensors(folder):
    out = {}
    for f in folder.glob("model-*.safetensors"):
        out.update(mx.load(str(f)))
    return out


def test_source_fixture_is_published_layout(source):
    get, idx = _src_tensors(source)
    dtypes = {}
    for f in set(idx.values()):
        st = SafeTensorsFile(source / f)
        for k in st.keys():
            dtypes[k] = st.info(k)[0]
    assert dtypes["layers.1.attn.wq_a.weight"] == "F8_E4M3"
    assert dtypes["layers.1.attn.wq_a.scale"] == "F8_E8M0"
    assert dtypes["layers.1.ffn.experts.3.w1.weight"] == "I8"
    assert dtypes["layers.0.ffn.gate.tid2eid"] == "I64"
    assert dtypes["layers.1.attn.compressor.wkv.weight"] == "BF16"
    assert dtypes["hc_head_fn"] == "F32"
    assert len(set(idx.values())) == 3


def test_mixed_is_bit_exact_on_fp8_and_fp4(source, mixed):
    """Every FP8 and FP4 source tensor dequantizes to the same bits from the MLX output."""
    get, idx = _src_tensors(source)
    out = _out_tensors(mixed)
    cfg = json.loads((mixed / "config.json").read_text())
    q = cfg["quantization"]
    n_fp8 = n_fp4 = 0
    E = cfg["n_routed_experts"]
    for name in idx:
        if not name.endswith(".weight") or name + "" not in idx:
            continue
        sname = name[: -len(".weight")] + ".scale"
        if sname not in idx:
            continue
        w, s = get(name), get(sname)
        if w.dtype == np.int8:  # FP4 expert: compare against its slice of the stacked tensor
            path, e = name.rsplit(".experts.", 1)
            e, proj = int(e.split(".")[0]), e.split(".")[1]
            mod = f"{path}.experts.{proj}"
            assert q[mod]["mode"] == "mxfp4"
            got = mx.dequantize(out[mod + ".weight"][e], out[mod + ".scales"][e], group_size=32, bits=4,
                                mode="mxfp4", dtype=mx.float32)
            np.testing.assert_array_equal(np.array(got), formats.dequant_fp4(w, s))
            n_fp4 += 1
        else:
            mod = name[: -len(".weight")]
            assert q[mod]["mode"] == "mxfp8"
            got = mx.dequantize(out[mod + ".weight"], out[mod + ".scales"], group_size=32, bits=8,
                                mode="mxfp8", dtype=mx.float32)
            np.testing.assert_array_equal(np.array(got), formats.dequant_fp8(w, s))
            n_fp8 += 1
    assert n_fp4 == 3 * E * (cfg["num_hidden_layers"] + 1)
    assert n_fp8 > 20


def test_mixed_logits_equal_bf16_recipe(source, tmp_path):
    """With bit-identical weights (embed/head kept bf16) the two loaded models agree."""
    a, b = tmp_path / "mixed", tmp_path / "bf16"
    convert(str(source), a, overrides=[r"^(embed|head)$=bf16"], show_progress=False)
    convert(str(source), b, recipe="bf16", show_progress=False)
    ma, _ = dsv4_mlx.load(a)
    mb, _ = dsv4_mlx.load(b)
    assert "quantization" in json.loads((a / "config.json").read_text())
    for m in (ma, mb):  # compute in fp32; quantized weights are untouched by set_dtype
        m.set_dtype(mx.float32)
    ids = mx.array([[0, 128803, 33310, 128804, 128822] + list(range(200, 240))])
    np.testing.assert_allclose(np.array(ma(ids)), np.array(mb(ids)), atol=1e-4, rtol=0)


def test_default_recipe_loads_and_generates(mixed):
    model, tok = dsv4_mlx.load(mixed)
    cfg = json.loads((mixed / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["quantization"]["head"]["mode"] == "affine"
    assert (mixed / "tokenizer.json").is_file() and (mixed / "README.md").is_file()
    card = (mixed / "README.md").read_text()
    assert "library_name: mlx" in card and "mixed-4-8" in card
    index = json.loads((mixed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for f in set(index["weight_map"].values()):
        assert SafeTensorsFile(mixed / f).metadata == {"format": "mlx"}
    from mlx_lm.generate import generate

    text = generate(model, tok, [0, 128803, 33310, 128804, 128822], max_tokens=5)
    assert isinstance(text, str)


def test_no_mtp(source, tmp_path):
    convert(str(source), tmp_path / "o", keep_mtp=False, show_progress=False)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0
    assert not any(k.startswith("mtp.") for k in _out_tensors(tmp_path / "o"))
    model, _ = dsv4_mlx.load(tmp_path / "o")
    assert not hasattr(model, "mtp")


def _hashes(folder):
    return json.loads((folder / ".dsv4-convert.json").read_text())["shards"]


def test_interrupt_and_resume_give_the_same_output(source, mixed, tmp_path):
    out = tmp_path / "o"

    def stop(i):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(str(source), out, show_progress=False, max_shard_bytes=8 * 2**20, _after_shard=stop)
    assert len(_hashes(out)) == 2 and not (out / "config.json").exists()
    # a half-written shard is never taken as done: corrupt a finished one
    first = sorted(out.glob("model-*.safetensors"))[0]
    first.write_bytes(first.read_bytes()[:-10])
    s = convert(str(source), out, show_progress=False, max_shard_bytes=8 * 2**20)
    assert s.skipped == 1 and s.written == len(s.plan.shards) - 1
    assert _hashes(out) == _hashes(mixed)
    assert not list(out.glob("*.partial"))


def test_killed_process_resumes(source, mixed, tmp_path):
    """SIGKILL in the middle of writing a shard; the rerun completes with identical hashes."""
    out = tmp_path / "o"
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "import dsv4_mlx.convert.writer as w\n"
        "orig = w.ShardWriter.write\n"
        "count = [0]\n"
        "def write(self, name, arr):\n"
        "    count[0] += 1\n"
        "    if count[0] == 60: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(self, name, arr)\n"
        "w.ShardWriter.write = write\n"
        "from dsv4_mlx.convert.convert import convert\n"
        f"convert({str(source)!r}, Path({str(out)!r}), show_progress=False, max_shard_bytes=8 * 2**20)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -9
    assert list(out.glob("*.partial"))  # killed mid-shard
    convert(str(source), out, show_progress=False, max_shard_bytes=8 * 2**20)
    assert _hashes(out) == _hashes(mixed)
    assert not list(out.glob("*.partial"))


def test_existing_folder_is_not_overwritten(source, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConvertError, match="already exists"):
        convert(str(source), out, show_progress=False)
    convert(str(source), out, force=True, show_progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    s = convert(str(source), out, show_progress=False)  # complete: nothing to do
    assert s.written == 0


def _copy(source, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(source, dst)
    return dst


def _rewrite(folder, fname, edit):
    st = SafeTensorsFile(folder / fname)
    tensors = {k: (st.info(k)[0], np.array(st.get(k))) for k in st.keys()}
    edit(tensors)
    write_safetensors(folder / fname, tensors)


@pytest.mark.parametrize("fault, message", [
    ("model_type", "not a DeepSeek-V4 checkpoint"),
    ("missing", "is missing"),
    ("truncated", "truncated"),
    ("dtype", "which no DeepSeek-V4 checkpoint uses"),
    ("scale_shape", "needs"),
    ("no_scale", "has no '.scale'"),
])
def test_bad_sources_fail_clearly(source, tmp_path, fault, message):
    src = _copy(source, tmp_path)
    shard = "model-00002-of-00003.safetensors"
    if fault == "model_type":
        cfg = json.loads((src / "config.json").read_text())
        cfg["model_type"] = "llama"
        (src / "config.json").write_text(json.dumps(cfg))
    elif fault == "missing":
        (src / shard).unlink()
    elif fault == "truncated":
        data = (src / shard).read_bytes()
        (src / shard).write_bytes(data[: len(data) // 2])
    elif fault == "dtype":
        _rewrite(src, shard, lambda t: t.update({next(iter(t)): ("F16", np.zeros(3, np.float16))}))
    elif fault == "scale_shape":
        def edit(t):
            k = next(k for k in t if k.endswith(".scale") and t[k][0] == "F8_E8M0" and ".experts." not in k)
            t[k] = ("F8_E8M0", np.concatenate([t[k][1], t[k][1]]))
        _rewrite(src, shard, edit)
    elif fault == "no_scale":
        def edit(t):
            k = next(k for k in t if k.endswith(".scale"))
            del t[k]
        _rewrite(src, shard, edit)
    if fault in ("no_scale",):  # the index still names the removed tensor
        idx = json.loads((src / "model.safetensors.index.json").read_text())
        st = SafeTensorsFile(src / shard)
        idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != shard or k in st}
        (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises((PlanError, ConvertError), match=message):
        convert(str(src), tmp_path / "out", show_progress=False)
    r = runner.invoke(app, ["convert", str(src), str(tmp_path / "out2")])
    assert r.exit_code == 2 and "Traceback" not in r.output and "error:" in r.output
    assert not (tmp_path / "out" / "config.json").exists()


def test_cli_dry_run_on_published_configs():
    data = Path(__file__).parent / "data" / "configs"
    r = runner.invoke(app, ["convert", str(data / "v4-flash"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "mxfp4" in r.stdout and "4.37 bits per weight" in r.stdout
    r = runner.invoke(app, ["convert", str(data / "v4-pro"), "--dry-run", "--recipe", "q4-q8"])
    assert r.exit_code == 0 and "affine4" in r.stdout


def test_cli_convert_and_demo_model(tmp_path):
    r = runner.invoke(app, ["demo-model", str(tmp_path / "src"), "--source", "--layers", "3", "--experts", "4"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "src" / "config.json").read_text())["num_hidden_layers"] == 3
    r = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "mlx"), "--quiet"])
    assert r.exit_code == 0, r.output
    model, _ = dsv4_mlx.load(tmp_path / "mlx")
    assert len(model.layers) == 3
    r = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "x"), "--override", "bad"])
    assert r.exit_code == 2 and "PATTERN=FORMAT" in r.output
    r = runner.invoke(app, ["demo-model", str(tmp_path / "mlx")])
    assert r.exit_code == 2 and "already exists" in r.output


def test_hub_repo_id_from_a_complete_cache_needs_no_network(source, tmp_path, monkeypatch):
    """A repo id whose snapshot is complete in HF_HUB_CACHE converts offline; the card names it."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-v4"
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    convert("acme/tiny-v4", tmp_path / "out", show_progress=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: acme/tiny-v4" in card
    with pytest.raises(PlanError, match="not in the Hugging Face cache"):
        convert("acme/missing", tmp_path / "out2", show_progress=False)


def test_base_checkpoint_fp8_experts_and_f32_scales(tmp_path):
    """Base variants: FP8 experts (re-quantized to mxfp4 by mixed-4-8, exact under bf16) and
    scales stored as F32 powers of two."""
    cfg = preset_config("tiny", layers=3, experts=4)
    cfg["expert_dtype"] = "fp8"
    src = tmp_path / "src"
    write_source_checkpoint(src, cfg, seed=5, shards=2)
    for f in src.glob("model-*.safetensors"):  # every F8_E8M0 scale -> F32 2^(b-127)
        _rewrite(src, f.name, lambda t: t.update({k: ("F32", np.ldexp(np.float32(1), v.astype(np.int32) - 127).astype(np.float32))
                                                   for k, (dt, v) in list(t.items()) if dt == "F8_E8M0"}))
    get, idx = _src_tensors(src)
    assert get("layers.1.ffn.experts.0.w1.weight").dtype == np.uint8  # FP8 experts
    assert get("layers.1.ffn.experts.0.w1.scale").dtype == np.float32
    convert(str(src), tmp_path / "bf16", recipe="bf16", show_progress=False)
    out = _out_tensors(tmp_path / "bf16")
    w = np.array(out["layers.1.ffn.experts.w1.weight"][0].astype(mx.float32))
    np.testing.assert_array_equal(w, formats.dequant_fp8(get("layers.1.ffn.experts.0.w1.weight"),
                                                          get("layers.1.ffn.experts.0.w1.scale")))
    s = convert(str(src), tmp_path / "mixed", show_progress=False)
    fmt = {it.path: (it.source, it.fmt, it.exact) for it in s.plan.items}
    assert fmt["layers.1.ffn.experts.w1"] == ("fp8", "mxfp4", False)  # re-quantized, said so
    assert fmt["layers.1.attn.wq_a"] == ("fp8", "mxfp8", True)
    model, _ = dsv4_mlx.load(tmp_path / "mixed")
    assert np.isfinite(np.array(model(mx.array([[0, 5, 6, 7]])))).all()


def test_dspark_drafter_is_skipped_with_a_warning(source, tmp_path):
    """V4-Flash-0731: same backbone, its mtp.* stages are a DSpark drafter: skipped, warned."""
    src = _copy(source, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(dspark_block_size=5, dspark_target_layer_ids=[1, 2, 3])
    (src / "config.json").write_text(json.dumps(cfg))
    s = convert(str(src), tmp_path / "out", show_progress=False)
    assert any("DSpark" in w for w in s.plan.warnings)
    assert not any(it.path.startswith("mtp.") for it in s.plan.items)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    dsv4_mlx.load(tmp_path / "out")
