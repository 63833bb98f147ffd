"""On-disk sessions: resume parity in a new process, crash safety, corruption, foreign models,
prefix reuse, bytes per turn."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import dsv4_mlx
from dsv4_mlx.convert.convert import convert
from dsv4_mlx.demo import preset_config, write_source_checkpoint
from dsv4_mlx.sessions import (CorruptSession, Fingerprints, IncompatibleSession, SessionError,
                               SessionStore)


def _model_dir(root: Path, seed: int) -> Path:
    src, out = root / f"src{seed}", root / f"mlx{seed}"
    write_source_checkpoint(src, preset_config("tiny"), seed=seed, shards=2)
    convert(str(src), out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    d = _model_dir(root, 0)
    model, tok = dsv4_mlx.load(d)
    # fp32 compute: comparisons across different chunkings are then exact to ~1e-6
    # (in bf16 another chunking legitimately changes the rounding)
    model.set_dtype(mx.float32)
    return d, model, Fingerprints.of(d), root


def _prefill(model, tokens, cache, chunk=37):
    logits = None
    for p in range(0, len(tokens), chunk):
        logits = model(mx.array([tokens[p : p + chunk]]), cache=cache)
    return logits[0, -1]


def _greedy(model, cache, logits, n):
    out = []
    for _ in range(n):
        t = int(mx.argmax(logits).item())
        out.append(t)
        logits = model(mx.array([[t]]), cache=cache)[0, -1]
    return out, logits


PROMPT = [0, 128803] + list(range(300, 500)) + [128804, 128822]


def test_resume_in_a_new_process_is_identical(tiny, tmp_path):
    d, model, fp, _ = tiny
    store = SessionStore(tmp_path / "sessions")
    cache = model.make_cache()
    logits = _prefill(model, PROMPT, cache)
    store.save("s", cache, PROMPT, logits, fp, messages=[{"role": "user", "content": "x"}])
    expect, _ = _greedy(model, cache, logits, 8)
    code = f"""
import json, sys, mlx.core as mx
import dsv4_mlx
from dsv4_mlx.sessions import SessionStore, Fingerprints
d = {str(d)!r}
model, _ = dsv4_mlx.load(d)
model.set_dtype(mx.float32)
calls = []
orig = type(model).__call__
def counted(self, inputs, cache=None, **kw):
    calls.append(inputs.shape[1])
    return orig(self, inputs, cache=cache, **kw)
type(model).__call__ = counted
s = SessionStore({str(tmp_path / "sessions")!r}).load("s", Fingerprints.of(d))
logits, out = s.next_logits, []
for _ in range(8):
    t = int(mx.argmax(logits).item()); out.append(t)
    logits = model(mx.array([[t]]), cache=s.caches)[0, -1]
print(json.dumps(dict(out=out, calls=calls, logits=s.next_logits.tolist()[:50], messages=s.messages)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["out"] == expect
    assert res["calls"] == [1] * 8  # zero prefill: only the 8 decode steps ran
    np.testing.assert_array_equal(np.array(res["logits"], np.float32), np.array(logits)[:50])
    assert res["messages"] == [{"role": "user", "content": "x"}]


def test_turns_append_segments_and_bytes_do_not_grow(tiny, tmp_path):
    d, model, fp, _ = tiny
    store = SessionStore(tmp_path)
    cache = model.make_cache()
    tokens = list(PROMPT)
    logits = _prefill(model, tokens, cache)
    store.save("s", cache, tokens, logits, fp)
    sizes = []
    for turn in range(4):
        new = [128803] + list(range(600 + 64 * turn, 600 + 64 * turn + 63)) + [128804]  # 65 tokens
        logits = _prefill(model, new, cache)
        tokens += new
        m = store.save("s", cache, tokens, logits, fp)
        sizes.append(m["segments"][-1]["bytes"])
    assert len(m["segments"]) == 5
    # each turn writes the same amount whatever the context (pending rows vary by a few rows)
    assert max(sizes) - min(sizes) < 0.05 * max(sizes)
    # resuming at every boundary matches a fresh prefill of that many tokens
    for s in m["segments"]:
        loaded = store.load("s", fp, upto_tokens=s["tokens"])
        c = model.make_cache()
        ref = _prefill(model, tokens[: s["tokens"]], c, chunk=50)
        np.testing.assert_allclose(np.array(loaded.next_logits), np.array(ref), atol=1e-4, rtol=0)


def test_flipped_byte_is_detected_and_session_cut_back(tiny, tmp_path):
    d, model, fp, _ = tiny
    store = SessionStore(tmp_path)
    cache = model.make_cache()
    logits = _prefill(model, PROMPT[:100], cache)
    store.save("s", cache, PROMPT[:100], logits, fp)
    logits = _prefill(model, PROMPT[100:], cache)
    m = store.save("s", cache, PROMPT, logits, fp)
    seg = tmp_path / "s" / m["segments"][1]["file"]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x40
    seg.write_bytes(bytes(data))
    loaded = store.load("s", fp)
    assert loaded.warning and "damaged" in loaded.warning
    assert len(loaded.tokens) == 100 and loaded.segments_used == 1
    first = tmp_path / "s" / m["segments"][0]["file"]
    first.write_bytes(first.read_bytes()[:-7])
    with pytest.raises(CorruptSession):
        store.load("s", fp)


def test_foreign_model_is_refused_and_nothing_modified(tiny, tmp_path):
    d, model, fp, root = tiny
    other = _model_dir(root, 1)
    store = SessionStore(tmp_path)
    cache = model.make_cache()
    logits = _prefill(model, PROMPT[:40], cache)
    store.save("s", cache, PROMPT[:40], logits, fp)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    with pytest.raises(IncompatibleSession, match="another model"):
        store.load("s", Fingerprints.of(other))
    bad_tok = Fingerprints(fp.model, "0" * 32, fp.encoding)
    with pytest.raises(IncompatibleSession, match="tokenizer"):
        store.load("s", bad_tok)
    with pytest.raises(IncompatibleSession):
        store.save("s", cache, PROMPT[:40], logits, Fingerprints.of(other))
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IncompatibleSession, match="format version"):
        store.load("s", fp)
    (tmp_path / "s" / "manifest.json").write_bytes(before["manifest.json"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before


def test_prefix_reuse_prefills_only_the_suffix(tiny, tmp_path):
    d, model, fp, _ = tiny
    store = SessionStore(tmp_path)
    cache = model.make_cache()
    logits = _prefill(model, PROMPT[:120], cache)
    store.save("a", cache, PROMPT[:120], logits, fp)
    logits = _prefill(model, PROMPT[120:180], cache)
    store.save("a", cache, PROMPT[:180], logits, fp)
    new = PROMPT[:150] + [7, 8, 9]
    name, T = store.find_prefix(new, fp)
    assert (name, T) == ("a", 120)
    loaded = store.load(name, fp, upto_tokens=T)
    suffix = new[T:]
    assert len(suffix) == 33  # only these are prefilled
    got = _prefill(model, suffix, loaded.caches)
    ref = _prefill(model, new, model.make_cache(), chunk=64)
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-4, rtol=0)
    assert store.find_prefix([5, 6, 7], fp) is None


def test_names_cannot_escape(tmp_path):
    store = SessionStore(tmp_path / "s")
    for bad in ("../x", "a/b", "/etc", "..", ".hidden", "", "a" * 200):
        with pytest.raises(SessionError):
            store.path(bad)


def test_fork_rm_export_evict(tiny, tmp_path):
    d, model, fp, _ = tiny
    store = SessionStore(tmp_path)
    cache = model.make_cache()
    logits = _prefill(model, PROMPT[:64], cache)
    store.save("auto-1", cache, PROMPT[:64], logits, fp)
    store.fork("auto-1", "auto-2")
    assert os.stat(tmp_path / "auto-1" / "seg-000001.safetensors").st_nlink == 2
    logits = _prefill(model, PROMPT[64:100], cache)
    store.save("auto-2", cache, PROMPT[:100], logits, fp)  # the fork grows, the original does not
    assert len(store.manifest("auto-1")["segments"]) == 1
    assert len(store.manifest("auto-2")["segments"]) == 2
    arch = store.export("auto-2", tmp_path / "x.tar")
    import tarfile

    assert sorted(tarfile.open(arch).getnames())[-1] == "auto-2/seg-000002.safetensors"
    store.load("auto-1", fp)  # touch: auto-1 becomes the most recently used
    gone = store.evict(budget_bytes=store.manifest("auto-1")["segments"][0]["bytes"] + 1)
    assert gone == ["auto-2"] and store.exists("auto-1")
    store.remove("auto-1")
    assert store.list() == []


def test_disk_full_keeps_previous_save(tiny, tmp_path, monkeypatch):
    d, model, fp, _ = tiny
    store = SessionStore(tmp_path)
    cache = model.make_cache()
    logits = _prefill(model, PROMPT[:50], cache)
    store.save("s", cache, PROMPT[:50], logits, fp)
    logits = _prefill(model, PROMPT[50:90], cache)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full)
    with pytest.raises(SessionError, match="full"):
        store.save("s", cache, PROMPT[:90], logits, fp)
    monkeypatch.undo()
    assert len(store.load("s", fp).tokens) == 50
    assert [p.name for p in sorted((tmp_path / "s").iterdir())] == ["manifest.json", "seg-000001.safetensors"]


CRASH = """
import os, random, signal, sys, threading, time
import mlx.core as mx
import dsv4_mlx
from dsv4_mlx.sessions import SessionStore, Fingerprints
import dsv4_mlx.sessions.store as st
d, root, trial = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, _ = dsv4_mlx.load(d)
model.set_dtype(mx.float32)
fp = Fingerprints.of(d)
store = SessionStore(root)
m = store.manifest("s")
cache = store.load("s", fp).caches
tokens = m["tokens"] + list(range(700, 760))
logits = model(mx.array([tokens[len(m["tokens"]):]]), cache=cache)[0, -1]
mx.eval(logits)
stage = trial % 5
if stage < 4:   # kill at a given step of the save
    hooks = {0: "save_safetensors", 1: "fsync", 2: "replace", 3: "_atomic_json"}
    target = hooks[stage]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if target == "save_safetensors":
        orig = mx.save_safetensors
        def half(path, arrays, metadata=None):
            orig(path, arrays, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            die()
        mx.save_safetensors = half
    elif target == "fsync":
        st.os.fsync = die
    elif target == "replace":
        calls = [0]
        orig_replace = os.replace
        def rep(a, b):
            calls[0] += 1
            if calls[0] == 2:   # the manifest's rename
                die()
            return orig_replace(a, b)
        st.os.replace = rep
    else:
        st._atomic_json = die
else:           # kill at a random moment
    threading.Timer(random.Random(trial).uniform(0.0, 0.02), lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
store.save("s", cache, tokens, logits, fp)
time.sleep(1)
"""


def test_killed_saves_never_leave_a_broken_session(tiny, tmp_path):
    d, model, fp, _ = tiny
    root = tmp_path / "sessions"
    store = SessionStore(root)
    cache = model.make_cache()
    logits = _prefill(model, PROMPT[:80], cache)
    store.save("s", cache, PROMPT[:80], logits, fp)
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    outcomes = set()
    for trial in range(10):
        r = subprocess.run([sys.executable, str(script), str(d), str(root), str(trial)], capture_output=True)
        assert r.returncode in (-9, 0), r.stderr.decode()[-2000:]
        loaded = store.load("s", fp)
        assert loaded.warning is None
        T = len(loaded.tokens)
        outcomes.add(T)
        ref = _prefill(model, store.manifest("s")["tokens"][:T], model.make_cache(), chunk=64)
        np.testing.assert_allclose(np.array(loaded.next_logits), np.array(ref), atol=1e-4, rtol=0)
        if T > 80:  # the save got through: start the next trial from the old state again
            store.save("s", _reset(model, PROMPT[:80]), PROMPT[:80], _last(model, PROMPT[:80]), fp)
    assert 80 in outcomes


def _reset(model, tokens):
    c = model.make_cache()
    _prefill(model, tokens, c)
    return c


def _last(model, tokens):
    return _prefill(model, tokens, model.make_cache())
