"""`dsv4 check` (kernels/selfcheck.py): the GPU kernels against the ops path on a model.

No GPU here: on the CPU the check says there is nothing to check; with kernels forced on and
replaced by wrong ones (zeros) or failing ones, it must report a disagreement and name the
families, and `dsv4 check` must exit non-zero."""

from __future__ import annotations

import contextlib
import json
import os

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from dsv4_mlx import load
from dsv4_mlx.cli.main import app
from dsv4_mlx.kernels import dispatch, embed, gemv, indexer, mhc, selfcheck, swiglu


def test_cpu_has_nothing_to_check(demo_home, clean_dispatch):
    r = CliRunner().invoke(app, ["check"])
    assert r.exit_code == 0, r.output
    assert "nothing to check" in r.output


def _zeros(backend, ks):
    def kern(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **kw):
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
    return kern


def _fail(backend, ks):
    def kern(*a, **k):
        raise RuntimeError("kernel exploded (test)")
    return kern


@pytest.fixture
def forced(clean_dispatch):
    """Kernels 'on' for every family not set to ops (as on a GPU), built by `build`."""
    mp = clean_dispatch
    mp.setattr(dispatch, "select_backend",
               lambda env_var=dispatch.ENV_VAR, default="auto":
               "ops" if (os.environ.get(env_var) or default) == "ops" else "cuda")
    mp.setattr(dispatch, "kernel_usable", lambda key, probe, what: True)
    mp.setattr(mx, "stream", lambda *a, **k: contextlib.nullcontext())
    # every family but the ones a test checks stays on the ops path in both runs
    for var in selfcheck.FAMILIES.values():
        mp.setenv(var, "ops")

    def build(maker, on):
        mp.setattr(dispatch, "build_kernel", maker)
        mp.setattr(indexer, "_kernel", maker)
        for var in on.values():
            mp.delenv(var)
        return on
    return build


@pytest.mark.parametrize("maker,status", [(_zeros, "mismatch"), (_fail, "error")])
def test_wrong_kernels_are_named(demo_home, forced, maker, status):
    on = forced(maker, {"mHC": mhc.ENV_VAR, "SwiGLU": swiglu.ENV_VAR})
    model, _ = load(demo_home[1])
    said = []
    rep = selfcheck.check(model, decode=2, families=on, progress=said.append)
    assert not rep["ok"] and rep["backend"] == "cuda"
    assert [w.split(" (")[0] for w in said] == ["the plain-ops path", "the cuda kernels",
                                               "the mHC kernels alone",
                                               "the SwiGLU kernels alone"]
    assert [(f["family"], f["status"]) for f in rep["families"]] == [("mHC", status),
                                                                     ("SwiGLU", status)]
    assert len(model.layers) == model.args.num_hidden_layers  # restored


def test_check_command_exits_non_zero_on_a_wrong_kernel(demo_home, forced):
    forced(_zeros, {"one-token projections": gemv.ENV_VAR, "embedding": embed.ENV_VAR})
    r = CliRunner().invoke(app, ["check", "--json", "--decode", "1"])
    assert r.exit_code == 1, r.output
    assert "checking: the plain-ops path" in r.stderr  # (progress on stderr, not in the JSON)
    rep = json.loads(r.stdout)
    assert not rep["ok"] and rep["rel_diff"] > rep["tolerance"]


def test_prompt_passes_the_top_k():
    """The prompt gives every CSA layer more compressed entries than the indexer's top-k."""
    from dsv4_mlx.demo import preset_config
    from dsv4_mlx.model import ModelArgs

    for preset in ("tiny", "flash"):
        a = ModelArgs.from_dict(preset_config(preset))
        ratio = min(r for r in a.compress_ratios if r)
        assert selfcheck.prompt_length(a) // ratio > a.index_topk


def test_same_path_twice_agrees_exactly(demo_home, forced):
    """Both runs on the ops path: the comparison itself adds nothing (fixed decode tokens)."""
    forced(_zeros, {})
    model, _ = load(demo_home[1])
    rep = selfcheck.check(model, decode=3, families={})
    assert rep["ok"] and rep["rel_diff"] == 0.0 and rep["families"] == []


def test_fewer_layers_than_the_model(demo_home, forced):
    """Checking the first layers only: the caches of the layers left out are not run."""
    forced(_zeros, {})
    model, _ = load(demo_home[1])
    L = len(model.layers)
    rep = selfcheck.check(model, layers=2, decode=2, families={})
    assert rep["ok"] and rep["rel_diff"] == 0.0 and len(model.layers) == L

