"""On-disk sessions through the CLI (`chat --session`, `doc`, `ask`, `sessions ...`, prefix reuse in
`generate`) on the built-in demo model (random weights, real architecture and tokenizer), built
once per module under a temporary DSV4_HOME; each test has its own sessions folder.

In-process (typer's CliRunner) where that is enough; a new process where the point is a new
process (resuming a chat) or a killed one (doc ingestion killed with SIGKILL after a checkpoint).
"""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from dsv4_mlx.cli.main import app

runner = CliRunner()
DSV4 = str(Path(sys.executable).with_name("dsv4"))
STATS = re.compile(r"^first token .*$", re.M)
PROMPT = re.compile(r"prompt ([\d,]+) tok at [\d.,]+ tok/s(?: \(\+([\d,]+) cached\))?")
REUSE = re.compile(r"prompt ([\d,]+) tokens: ([\d,]+) reused(?: from session '([^']+)')?, ([\d,]+) prefilled")
WORDS = "alpha beta gamma delta river mountain report quarterly revenue growth model token cache".split()


def num(s):
    return int(s.replace(",", "")) if s else 0


@pytest.fixture(scope="module")
def home(demo_home):
    return demo_home[1]


@pytest.fixture
def sroot(tmp_path):
    d = tmp_path / "sessions"
    d.mkdir()
    return d


def invoke(args, root, **kw):
    env = {"NO_COLOR": "1", "TERM": "xterm", "FORCE_COLOR": None, "DSV4_SESSIONS": str(root),
           "DSV4_COMPUTE_DTYPE": None, "DSV4_TEST_DOC_HOOK": None, **kw.pop("env", {})}
    return runner.invoke(app, args, env=env, **kw)


def spawn(args, root, input="", **env):
    e = dict(os.environ, NO_COLOR="1", DSV4_SESSIONS=str(root), **env)
    return subprocess.run([DSV4, *args], input=input, capture_output=True, text=True, env=e, timeout=240)


def files_of(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def documents(tmp_path, n1=150, n2=80):
    rng = np.random.default_rng(1)
    a, b = tmp_path / "report.txt", tmp_path / "notes.md"
    a.write_text(" ".join(rng.choice(WORDS, n1)) + "\n")
    b.write_text("# Notes\n\n" + " ".join(rng.choice(WORDS, n2)) + ".\n")
    return a, b


def one_error_line(r, code, *needles):
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("dsv4: error: ") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[-1], lines[-1]


# ---------------------------------------------------------------------------


def test_chat_session_resumes_in_a_new_process_exactly(home, sroot):
    turns = "Hello there\nWhat next?\n"
    r = invoke(["chat", "--session", "a", "--temp", "0", "-n", "6"], sroot, input=turns + "/quit\n")
    assert r.exit_code == 0, r.output
    assert "new session 'a'" in r.stdout and r.stdout.count("first token") == 2
    m = json.loads((sroot / "a" / "manifest.json").read_text())
    assert [x["role"] for x in m["messages"]] == ["user", "assistant"] * 2
    assert len(m["segments"]) == 2  # one segment per turn
    assert m["settings"]["temperature"] == 0 and m["settings"]["max_tokens"] == 6
    stored = len(m["tokens"])

    # a new process: settings, transcript and decode state restored, zero prefill for them
    b = spawn(["chat", "--session", "a"], sroot, input="And then?\n/stats\n/quit\n")
    assert b.returncode == 0, b.stderr
    assert re.search(rf"resumed session 'a': {stored:,} tokens restored .*\(no prefill\), 2 turns", b.stdout)
    assert "temp 0 " in b.stdout and "max_tokens 6" in b.stdout

    # the same three turns in one process, no session involved
    c = invoke(["chat", "--temp", "0", "-n", "6", "--no-reuse-prefix"], sroot,
               input=turns + "And then?\n/quit\n")
    assert c.exit_code == 0, c.output
    b_parts, c_parts = STATS.split(b.stdout), STATS.split(c.stdout)
    assert len(c_parts) == 4 and c_parts[2].strip()
    assert b_parts[0].endswith(c_parts[2])  # the resumed reply = the uninterrupted third reply
    (b_prompt, b_cached), = PROMPT.findall(b.stdout)[:1]
    c_prompt, c_cached = PROMPT.findall(c.stdout)[2]
    assert (b_prompt, b_cached) == (c_prompt, c_cached)  # prefilled: only the new message
    assert num(b_cached) == stored and 0 < num(b_prompt) < 20
    assert f"prefilled {num(b_prompt) - 1:,} tokens" in b.stdout  # the restored context: none
    m = json.loads((sroot / "a" / "manifest.json").read_text())
    assert len(m["messages"]) == 6 and len(m["segments"]) == 3


def test_doc_killed_then_rerun_equals_uninterrupted(home, sroot, tmp_path):
    a, b = documents(tmp_path)
    args = ["doc", str(a), str(b), "--checkpoint-every", "64", "--no-reuse-prefix"]
    killed = spawn(args + ["--session", "d"], sroot, DSV4_TEST_DOC_HOOK="kill:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    m = json.loads((sroot / "d" / "manifest.json").read_text())
    assert [s["tokens"] for s in m["segments"]] == [64, 128]
    r = invoke(args + ["--session", "d"], sroot)
    assert r.exit_code == 0, r.output
    total = len(json.loads((sroot / "d" / "manifest.json").read_text())["tokens"])
    assert f"continuing at 128 of {total:,} tokens" in r.stderr
    assert f"128 reused, {total - 128:,} prefilled" in r.stderr and "dsv4 ask --session d" in r.stderr
    ref = invoke(args + ["--session", "ref"], sroot)
    assert ref.exit_code == 0 and "0 reused" in ref.stderr, ref.output
    md = json.loads((sroot / "d" / "manifest.json").read_text())
    mr = json.loads((sroot / "ref" / "manifest.json").read_text())
    assert md["tokens"] == mr["tokens"] and md["messages"] == mr["messages"]
    assert [s["tokens"] for s in md["segments"]] == [s["tokens"] for s in mr["segments"]] == [64, 128, 192, total]
    for sd, sr in zip(md["segments"], mr["segments"]):  # every checkpoint, next_logits included
        x, y = mx.load(str(sroot / "d" / sd["file"])), mx.load(str(sroot / "ref" / sr["file"]))
        assert sorted(x) == sorted(y) and "next_logits" in x
        for k in x:
            assert mx.array_equal(x[k], y[k]).item(), k
    # the framing: one user message, a header line per file
    content = md["messages"][0]["content"]
    assert content.startswith("==> report.txt <==\n") and "\n\n==> notes.md <==\n# Notes" in content
    # complete: nothing to do; Ctrl+C keeps the last checkpoint and says how to continue
    again = invoke(args + ["--session", "d"], sroot)
    assert again.exit_code == 0 and "nothing to do" in again.stderr
    stop = invoke(args + ["--session", "e"], sroot, env={"DSV4_TEST_DOC_HOOK": "int:1"})
    one_error_line(stop, 130, "keeps the last checkpoint (64 of", "run the same command again")
    assert [s["tokens"] for s in json.loads((sroot / "e" / "manifest.json").read_text())["segments"]] == [64]


@pytest.mark.parametrize("kv", ["fp8", "bf16"])
def test_ask_equals_generate_and_leaves_the_session_unchanged(home, sroot, tmp_path, kv):
    # float32 compute: a prompt split into other chunks gives the same result (to ~1e-6)
    env = {"DSV4_COMPUTE_DTYPE": "float32"}
    a, b = documents(tmp_path)
    q = "What does the report say about revenue?"
    r = invoke(["doc", str(a), str(b), "--session", "d", "--system", "Be brief.", "--kv-format", kv],
               sroot, env=env)
    assert r.exit_code == 0, r.output
    before = files_of(sroot / "d")
    asked = invoke(["ask", "--session", "d", q, "--temp", "0", "-n", "8"], sroot, env=env)
    assert asked.exit_code == 0, asked.output
    gen = invoke(["generate", "--doc", str(a), "--doc", str(b), "--system", "Be brief.", "-p", q,
                  "--temp", "0", "-n", "8", "--no-reuse-prefix", "--kv-format", kv], sroot, env=env)
    assert gen.exit_code == 0, gen.output
    assert asked.stdout == gen.stdout and asked.stdout.strip()
    stored = len(json.loads(before["manifest.json"])["tokens"])
    n, reused, src, prefilled = REUSE.search(asked.stderr).groups()
    assert (num(reused), src) == (stored, "d") and num(prefilled) == num(n) - stored < 20
    assert files_of(sroot / "d") == before  # byte for byte, manifest included
    # --save-as: the answer kept as a new session; the original still untouched
    saved = invoke(["ask", "--session", "d", q, "--temp", "0", "-n", "8", "--save-as", "d2"], sroot, env=env)
    assert saved.exit_code == 0 and saved.stdout == gen.stdout, saved.output
    assert files_of(sroot / "d") == before
    m2 = json.loads((sroot / "d2" / "manifest.json").read_text())
    assert [x["role"] for x in m2["messages"]] == ["system", "user", "user", "assistant"]
    assert m2["fingerprints"]["state_format"] == f"{kv}-v1"
    taken = invoke(["ask", "--session", "d", q, "--save-as", "d2"], sroot, env=env)
    one_error_line(taken, 4, "already exists")
    if kv == "fp8":
        # generate with prefix reuse on starts from the doc session
        reuse = invoke(["generate", "--doc", str(a), "--doc", str(b), "--system", "Be brief.", "-p", q,
                        "--temp", "0", "-n", "8"], sroot, env=env)
        assert reuse.stdout == gen.stdout and num(REUSE.search(reuse.stderr).group(2)) >= stored


def test_generate_prefix_reuse_and_automatic_snapshots(home, sroot):
    text = " ".join(np.random.default_rng(2).choice(WORDS, 120))
    base = ["generate", "--temp", "0", "-n", "2", "--auto-snapshot-min", "50"]
    first = invoke(base + ["-p", text], sroot)
    assert first.exit_code == 0, first.output
    n1, r1, _, p1 = REUSE.search(first.stderr).groups()
    assert num(r1) == 0 and num(p1) == num(n1)
    name = re.search(r"saved the prompt's state as session (auto-[0-9a-f]{16})", first.stderr).group(1)
    m = json.loads((sroot / name / "manifest.json").read_text())
    ends = [s["tokens"] for s in m["segments"]]  # the end of the user's text, the whole prompt
    assert len(ends) == 2 and ends[1] == num(n1) - 1
    # a prompt that adds to the text: only the suffix is prefilled
    longer = invoke(base + ["-p", text + "\n\nWhat is this about?"], sroot)
    n2, r2, src, p2 = REUSE.search(longer.stderr).groups()
    assert src == name and num(r2) == ends[0] and num(p2) == num(n2) - ends[0] < 20
    # the same prompt again (other mode): everything but the last token comes from disk
    again = invoke(base + ["-p", text, "--think"], sroot)
    n3, r3, src, p3 = REUSE.search(again.stderr).groups()
    assert src == name and num(r3) == num(n3) - 1 and num(p3) == 1
    # off: no reuse; budget: least recently used automatic snapshots evicted
    off = invoke(base + ["-p", text, "--no-reuse-prefix"], sroot)
    assert off.exit_code == 0 and not REUSE.search(off.stderr)
    tight = invoke(base + ["-p", text + " more", "--sessions-budget", "1"], sroot)
    assert tight.exit_code == 0 and "evicted" in tight.stderr, tight.output
    assert not [p for p in sroot.iterdir() if p.name.startswith("auto-")]


def test_bad_sessions_and_faults(home, sroot, tmp_path, monkeypatch):
    r = invoke(["chat", "--session", "a", "--temp", "0", "-n", "3"], sroot, input="Hi\nMore\n/quit\n")
    assert r.exit_code == 0, r.output
    before = files_of(sroot / "a")
    # another model (same weights, another config): refused before anything is loaded
    other = tmp_path / "other"
    other.mkdir()
    for p in home.iterdir():
        (other / p.name).symlink_to(p)
    (other / "config.json").unlink()
    cfg = json.loads((home / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    for args in (["chat", str(other), "--session", "a"], ["ask", str(other), "--session", "a", "q"],
                 ["doc", str(other), str(tmp_path / "other" / "config.json"), "--session", "a"]):
        one_error_line(invoke(args, sroot, input="hello\n"), 5, "another model")
    one_error_line(invoke(["ask", "--session", "a", "q", "--kv-format", "bf16"], sroot), 5, "state format")
    assert files_of(sroot / "a") == before
    # names cannot escape the sessions folder; missing sessions
    for args in (["chat", "--session", "../x"], ["ask", "--session", "../x", "q"],
                 ["doc", str(other / "config.json"), "--session", "a/b"], ["sessions", "rm", ".."],
                 ["sessions", "show", "/etc"], ["sessions", "export", "../a", str(tmp_path / "x.tar")]):
        one_error_line(invoke(args, sroot, input=""), 4, "is not a session name")
    for args in (["ask", "--session", "nope", "q"], ["sessions", "show", "nope"], ["sessions", "rm", "nope"]):
        one_error_line(invoke(args, sroot), 4, "no session named 'nope'")
    assert sorted(p.name for p in sroot.iterdir()) == ["a"]
    # a flipped byte in the last segment: warned, resumed at the last intact boundary
    m = json.loads(before["manifest.json"])
    seg = sroot / "a" / m["segments"][1]["file"]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x40
    seg.write_bytes(bytes(data))
    r = invoke(["chat", "--session", "a"], sroot, input="/quit\n")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    first = m["segments"][0]["tokens"]
    assert f"is damaged; resuming at the last intact point ({first} of" in r.stdout
    assert f"resumed session 'a': {first:,} tokens restored" in r.stdout and "prefilled with your next" in r.stdout
    damaged = files_of(sroot / "a")
    r = invoke(["ask", "--session", "a", "q", "-n", "2"], sroot)
    assert r.exit_code == 0 and "damaged" in r.stderr and r.stdout.strip(), r.output
    assert files_of(sroot / "a") == damaged  # reading never modifies
    r = invoke(["chat", "--session", "a", "--temp", "0", "-n", "3"], sroot, input="Again\n/quit\n")
    assert r.exit_code == 0, r.output  # the next save cuts the damage off and appends
    ok = invoke(["sessions", "show", "a", "--verify"], sroot)
    assert ok.exit_code == 0 and "segments: all intact" in ok.stdout
    # nothing intact at all: exit 6; another format version: exit 5
    seg1 = sroot / "a" / json.loads((sroot / "a" / "manifest.json").read_text())["segments"][0]["file"]
    seg1.write_bytes(seg1.read_bytes()[:-9])
    one_error_line(invoke(["ask", "--session", "a", "q"], sroot), 6, "no intact segment")
    mf = sroot / "a" / "manifest.json"
    mf.write_text(json.dumps(dict(json.loads(mf.read_text()), format_version=99)))
    one_error_line(invoke(["chat", "--session", "a"], sroot, input=""), 5, "format version")
    # disk full during a checkpoint: one sentence, exit 4, no partial files
    doc = tmp_path / "doc.txt"
    doc.write_text("some words " * 40)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full)
    one_error_line(invoke(["doc", str(doc), "--session", "f"], sroot), 4, "disk", "full")
    monkeypatch.undo()
    assert not (sroot / "f").exists() or not any((sroot / "f").iterdir())


def test_sessions_list_show_rm_export_import(home, sroot, tmp_path):
    r = invoke(["chat", "--session", "s1", "--temp", "0", "-n", "3", "--system", "Be brief."], sroot,
               input="Hi\nAnd?\n/fork s2\n/quit\n")
    assert r.exit_code == 0 and "forked to session 's2'" in r.stdout, r.output
    late = invoke(["chat", "--temp", "0", "-n", "3", "--no-reuse-prefix"], sroot, input="Hello\n/save late\n/quit\n")
    assert late.exit_code == 0 and "saved session 'late'" in late.stdout, late.output
    rows = json.loads(invoke(["sessions", "list", "--json"], sroot).stdout)
    assert {x["name"] for x in rows} == {"s1", "s2", "late"}
    s1 = next(x for x in rows if x["name"] == "s1")
    assert s1["turns"] == 2 and s1["segments"] == 2 and s1["kind"] == "chat" and s1["bytes"] > 0
    table = invoke(["sessions", "list"], sroot)
    assert table.exit_code == 0 and "s1" in table.stdout and "chat" in table.stdout
    show = invoke(["sessions", "show", "s1", "--last", "5"], sroot)
    assert show.exit_code == 0
    for needle in ("tokens", "turns 2", "segments 2", "bytes", "fingerprints: model", "state format fp8-v1",
                   "[system] Be brief.", "[user] And?", "[assistant]"):
        assert needle in show.stdout, needle
    js = json.loads(invoke(["sessions", "show", "s1", "--json", "--verify"], sroot).stdout)
    assert js["tokens"] == s1["tokens"] and js["problem"] is None and js["fingerprints"]["model"]
    # fork shares the segment files (hard links)
    seg = sroot / "s1" / js["segment_list"][0]["file"]
    assert seg.stat().st_nlink == 2
    arch = tmp_path / "s1.tar"
    r = invoke(["sessions", "export", "s1", str(arch)], sroot)
    assert r.exit_code == 0 and arch.is_file(), r.output
    assert sorted(tarfile.open(arch).getnames()) == sorted(
        ["s1/manifest.json"] + [f"s1/{s['file']}" for s in js["segment_list"]])
    r = invoke(["sessions", "rm", "s1"], sroot)
    assert r.exit_code == 0 and not (sroot / "s1").exists() and seg.name in os.listdir(sroot / "s2")
    r = invoke(["sessions", "import", str(arch), "--name", "s3"], sroot)
    assert r.exit_code == 0, r.output
    back = invoke(["chat", "--session", "s3"], sroot, input="/quit\n")
    assert back.exit_code == 0 and "resumed session 's3'" in back.stdout and "2 turns" in back.stdout
    one_error_line(invoke(["sessions", "import", str(arch), "--name", "s3"], sroot), 4, "already exists")
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        t.add(arch, arcname="x/../../escape")
    one_error_line(invoke(["sessions", "import", str(evil)], sroot), 4)
    assert not (tmp_path / "escape").exists()
