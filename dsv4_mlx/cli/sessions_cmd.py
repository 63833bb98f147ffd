"""`dsv4 sessions list|show|rm|export|import`, `dsv4 doc` and `dsv4 ask`: the on-disk sessions
(format: docs/SESSIONS.md; store: dsv4_mlx/sessions/store.py; glue: dsv4_mlx/sessions/runtime.py).

Sessions live under `$DSV4_SESSIONS` (default `~/.cache/dsv4-mlx/sessions`). A name is letters,
digits, '.', '_' and '-' (at most 100; no paths).

`dsv4 doc [MODEL] FILE... --session NAME` puts documents into a session's context, as ONE user
message whose content is, for each file in the order given::

    ==> NAME <==
    TEXT

NAME is the file's name (without its folder) and TEXT its contents (UTF-8, undecodable bytes
replaced) without trailing newlines; files are separated by one blank line (the `head`
convention). With `--system TEXT` a system message comes first. The session then holds the
tokens that every next prompt of this conversation starts with (up to the end of the documents,
before the assistant's turn): `dsv4 ask` and `dsv4 chat --session NAME` continue from there
without any prefill; a question joins the documents' user turn after a blank line (the prompt
encoding merges consecutive user messages with "\\n\\n"), so `generate --doc FILE -p Q` sees the
same conversation as `doc FILE --session S` + `ask --session S Q`.

Ingestion shows the prefill progress bar and saves a checkpoint (a segment of the session)
every `--checkpoint-every` tokens (default 16,384). Rerunning the same command continues an
interrupted ingestion from its last checkpoint (the stored tokens are a prefix of the
documents' tokens: only the rest is prefilled); a complete one is not recomputed. Ctrl+C keeps
the last checkpoint and says how to continue. With prefix reuse on (`--reuse-prefix`, default
when the sessions folder exists), documents that start like any stored session start from it.

`dsv4 ask [MODEL] --session NAME QUESTION` answers from the snapshot without changing it
(copy-on-write: the state is loaded and the reply generated in memory; the session's files stay
byte for byte as they were). `--save-as NEW` saves the conversation with its answer as a new
session (sharing NAME's segment files through hard links). Without MODEL, both commands use the
model the session was made with (else the demo model). The think mode, system prompt and sampler
settings default to the session's; options given override them.

Exit codes: 0 success; 1 unexpected failure; 2 bad input (model folder, files, options); 3 not
enough memory; 4 session error (no such session, bad name, name taken, disk full); 5 the session
was made with another model, tokenizer, prompt encoding, state format or format version; 6 the
session has no intact segment; 130 interrupted (doc: the last checkpoint is kept).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .generate_cmd import (
    EXIT_INTERRUPTED,
    PrefillProgress,
    StopFlag,
    check_kv_format,
    color_enabled,
    emit_reply,
    fmt_bytes,
    make_console,
    open_session,
    reuse_enabled,
    sampling_from,
    session_fail,
    session_model as _model_for,
)
from .main import app, fail

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 unexpected failure; 2 bad input; 3 not enough memory; 4 session error "
    "(not found, bad name, name taken, disk full); 5 incompatible session (another model, tokenizer, "
    "encoding, state format or version); 6 corrupt session; 130 interrupted."
)

sessions_app = typer.Typer(
    name="sessions", no_args_is_help=True, pretty_exceptions_enable=False,
    help="Stored sessions ($DSV4_SESSIONS, default ~/.cache/dsv4-mlx/sessions): list, show, rm, export, import.",
)
app.add_typer(sessions_app, name="sessions")


def _store():
    from ..sessions import SessionStore

    return SessionStore()


def _when(t) -> str:
    if not t:
        return "-"
    return datetime.datetime.fromtimestamp(float(t)).isoformat(sep=" ", timespec="seconds")


def _turns(messages) -> int:
    return sum(1 for m in messages if m.get("role") == "user")


def _row(name: str, m: dict) -> dict:
    st = m.get("settings") or {}
    msgs = m.get("messages", [])
    return dict(name=name, kind=st.get("kind", ""), tokens=len(m["tokens"]), turns=_turns(msgs),
                messages=len(msgs), segments=len(m["segments"]),
                bytes=sum(s["bytes"] for s in m["segments"]),
                state_format=m["fingerprints"].get("state_format"), model=st.get("model"),
                created=m.get("created"), updated=m.get("updated"), last_used=m.get("last_used"))


# ---------------------------------------------------------------------------
# dsv4 sessions ...
# ---------------------------------------------------------------------------


@sessions_app.command("list", epilog=EXIT_CODES_HELP)
def list_sessions(as_json: bool = typer.Option(False, "--json", help="Print one JSON array.")):
    """The stored sessions, most recently updated first."""
    from ..sessions import SessionError

    store = _store()
    rows, bad = [], []
    if store.root.is_dir():
        for d in sorted(store.root.iterdir()):
            if (d / "manifest.json").is_file():
                try:
                    rows.append(_row(d.name, store.manifest(d.name)))
                except (SessionError, KeyError, TypeError) as e:
                    bad.append((d.name, str(e)))
    rows.sort(key=lambda r: r["updated"] or 0, reverse=True)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    out = make_console(False, color_enabled())
    if not rows:
        out.print(f"no sessions in {store.root}", markup=False)
    else:
        from rich import box

        t = Table(title=f"sessions in {store.root}", box=box.SIMPLE, pad_edge=False)
        for col, just in (("name", "left"), ("kind", "left"), ("tokens", "right"), ("turns", "right"),
                          ("segs", "right"), ("size", "right"), ("updated", "left")):
            t.add_column(col, justify=just, no_wrap=True)
        for r in rows:
            t.add_row(r["name"], r["kind"], f"{r['tokens']:,}", str(r["turns"]), str(r["segments"]),
                      fmt_bytes(r["bytes"]), _when(r["updated"])[:16])
        out.print(t)
    for name, why in bad:
        out.print(f"warning: {name}: {why}", markup=False)


@sessions_app.command("show", epilog=EXIT_CODES_HELP)
def show(
    name: str = typer.Argument(..., help="Session name."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    verify: bool = typer.Option(False, "--verify", help="Also check every segment's size and SHA-256."),
    last: int = typer.Option(4, "--last", help="How many of the last messages to show."),
):
    """Tokens, turns, segments, bytes, fingerprints, settings and the last messages of a session."""
    from ..sessions import SessionError

    store = _store()
    try:
        m = store.manifest(name)
        check = store.verify(name) if verify else None
    except SessionError as e:
        session_fail(e)
    info = _row(name, m)
    info.update(path=str(store.path(name)), fingerprints=m["fingerprints"], settings=m.get("settings") or {},
                format_version=m.get("format_version"), dsv4_version=m.get("dsv4_version"),
                segment_list=[dict(file=s["file"], tokens=s["tokens"], bytes=s["bytes"]) for s in m["segments"]])
    if check is not None:
        info["intact_segments"], info["problem"] = check
    if as_json:
        info["messages_list"] = m.get("messages", [])
        typer.echo(json.dumps(info, indent=1))
        return
    out = make_console(False, color_enabled())
    say = lambda text: out.print(text, markup=False, soft_wrap=True)  # noqa: E731
    say(f"session {name} ({info['kind'] or 'session'}) in {info['path']}")
    say(f"tokens {info['tokens']:,} · turns {info['turns']} · messages {info['messages']} · "
        f"segments {info['segments']} · {info['bytes']:,} bytes ({fmt_bytes(info['bytes'])})")
    bounds = [s["tokens"] for s in m["segments"]]
    if bounds:
        shown = ", ".join(f"{b:,}" for b in bounds[-8:])
        say(f"resume points (tokens): {'…, ' if len(bounds) > 8 else ''}{shown}")
    fp = m["fingerprints"]
    say(f"model {info['model'] or '-'}")
    say(f"fingerprints: model {fp.get('model')} · tokenizer {fp.get('tokenizer')} · encoding "
        f"{fp.get('encoding')} · state format {fp.get('state_format')} · format v{info['format_version']}")
    st = info["settings"]
    keys = [k for k in ("mode", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "max_tokens")
            if k in st]
    if keys:
        say("settings: " + " · ".join(f"{k} {st[k]}" for k in keys))
    say(f"created {_when(m.get('created'))} · updated {_when(m.get('updated'))} · "
        f"last used {_when(m.get('last_used'))}")
    if check is not None:
        say("segments: all intact" if check[1] is None
            else f"segments: {check[1]}; usable up to segment {check[0]} of {len(bounds)}")
    msgs = m.get("messages", [])
    if msgs and last > 0:
        say(f"last {min(last, len(msgs))} of {len(msgs)} messages:")
        for msg in msgs[-last:]:
            text = (msg.get("content") or "").replace("\n", " ⏎ ")
            if len(text) > 300:
                text = text[:300] + "…"
            say(f"  [{msg.get('role')}] {text}")


@sessions_app.command("rm", epilog=EXIT_CODES_HELP)
def rm(names: List[str] = typer.Argument(..., help="Session name(s).")):
    """Remove sessions (their segment files too; forks keep their own links)."""
    from ..sessions import SessionError

    store = _store()
    err = make_console(True, color_enabled())
    for name in names:
        try:
            size = sum(s["bytes"] for s in store.manifest(name)["segments"])
            store.remove(name)
        except SessionError as e:
            session_fail(e)
        except OSError as e:
            fail(f"could not remove session {name!r} ({e.strerror or e})", 4)
        err.print(f"removed session {name} ({fmt_bytes(size)})", markup=False)


@sessions_app.command("export", epilog=EXIT_CODES_HELP)
def export(name: str = typer.Argument(..., help="Session name."),
           file: Path = typer.Argument(..., help="The archive to write (tar).")):
    """Write a session as one portable archive (`dsv4 sessions import` reads it back)."""
    from ..sessions import SessionError

    store = _store()
    try:
        n, problem = store.verify(name)
        if problem:
            fail(f"session {name!r} is damaged ({problem}); not exported", 6)
        store.export(name, file)
    except SessionError as e:
        session_fail(e)
    except OSError as e:
        Path(str(file) + ".tmp").unlink(missing_ok=True)
        fail(f"could not write {file} ({e.strerror or e})", 4)
    make_console(True, color_enabled()).print(
        f"wrote {file} ({fmt_bytes(Path(file).stat().st_size)}): session {name}; "
        f"`dsv4 sessions import {file}` restores it", markup=False)


@sessions_app.command("import", epilog=EXIT_CODES_HELP)
def import_(file: Path = typer.Argument(..., help="An archive written by `dsv4 sessions export`."),
            name: Optional[str] = typer.Option(None, "--name", help="Import under this name (default: the archived one).")):
    """Read a session archive back (every segment's SHA-256 checked)."""
    from ..sessions import SessionError

    if not Path(file).is_file():
        fail(f"{file} does not exist")
    store = _store()
    try:
        got = store.import_archive(file, name)
    except SessionError as e:
        session_fail(e)
    make_console(True, color_enabled()).print(f"imported session {got} into {store.root}", markup=False)


# ---------------------------------------------------------------------------
# shared by doc and ask
# ---------------------------------------------------------------------------


def _open_named(name: str, must_exist: bool):
    """(store, manifest or None) for session `name`; exits 4 on a bad name or a missing session."""
    from ..sessions import SessionError, SessionNotFound

    store = _store()
    try:
        store.path(name)
        if store.exists(name):
            return store, store.manifest(name)
        if must_exist:
            raise SessionNotFound(f"no session named {name!r} in {store.root}")
    except SessionError as e:
        session_fail(e)
    return store, None


def _kv_of(kv_format: Optional[str], manifest) -> str:
    kv = check_kv_format(kv_format)
    if kv is None and manifest is not None:
        kv = manifest["fingerprints"]["state_format"].rsplit("-", 1)[0]
    return kv or "fp8"


def _given(**kw) -> List[str]:
    return [k for k, v in kw.items() if v is not None]


def _warner(err):
    def warn(text):
        err.print(f"warning: {text}", markup=False, style="yellow")
    return warn


# ---------------------------------------------------------------------------
# dsv4 doc
# ---------------------------------------------------------------------------


def _test_hook(count: int):
    """DSV4_TEST_DOC_HOOK=kill:N|int:N: after the N-th checkpoint, die (SIGKILL) or act as if
    Ctrl+C was pressed twice. For the tests of interrupted ingestion."""
    hook = os.environ.get("DSV4_TEST_DOC_HOOK")
    if not hook:
        return
    what, _, n = hook.partition(":")
    if count != int(n or 1):
        return
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "int":
        raise KeyboardInterrupt


@app.command("doc", epilog=EXIT_CODES_HELP)
def doc(
    paths: List[Path] = typer.Argument(..., help="[MODEL] FILE...: a model folder first (optional: default the session's model, else the demo model), then the documents.", show_default=False, metavar="[MODEL] FILE"),
    session: str = typer.Option(..., "--session", help="The session to fill (created, or continued when an ingestion was interrupted)."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt (first message)."),
    checkpoint_every: int = typer.Option(16384, "--checkpoint-every", help="Save a checkpoint every this many tokens."),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="Think High mode for the questions that follow (stored)."),
    think_max: bool = typer.Option(False, "--think-max", help="Think Max mode (its preamble comes first in the context)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", help="Default reply length of later questions (stored)."),
    temp: Optional[float] = typer.Option(None, "--temp", help="Sampling temperature of later questions (stored)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling of later questions (stored)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of later questions (stored)."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="Repetition penalty of later questions (stored)."),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Context limit in tokens."),
    prefill_step: int = typer.Option(2048, "--prefill-step", help="Tokens per prefill chunk."),
    kv_format: Optional[str] = typer.Option(None, "--kv-format", help="Decode-state storage: fp8 (default) or bf16."),
    reuse_prefix: Optional[bool] = typer.Option(None, "--reuse-prefix/--no-reuse-prefix", help="Start from the longest prefix any stored session holds (default: on when the sessions folder exists)."),
    force: bool = typer.Option(False, "--force", help="Replace the conversation of an existing session."),
    no_color: bool = typer.Option(False, "--no-color", help="No colors or escape codes."),
    no_memory_check: bool = typer.Option(False, "--no-memory-check", help="Run even if the memory preflight says it will not fit."),
):
    """Ingest documents into a session's context (checkpointed; rerun to continue)."""
    from ..generate import DEFAULT_MAX_TOKENS, DEMO_MAX_TOKENS, Conversation, StoredState
    from ..sessions import SessionError
    from ..sessions.runtime import (SessionRuntime, conversation_messages, document_message, make_settings,
                                    read_documents, stable_prefix)

    color = color_enabled(no_color)
    err = make_console(True, color)
    warn = _warner(err)
    if checkpoint_every < 1:
        fail(f"--checkpoint-every must be positive (got {checkpoint_every})")
    if max_tokens is not None and max_tokens < 1:
        fail(f"--max-tokens must be positive (got {max_tokens})")
    model = None
    files = list(paths)
    if files and files[0].is_dir():
        model, files = files[0], files[1:]
    if not files:
        fail("no documents: pass FILE... after the model folder")
    for f in files:
        if not f.is_file():
            fail(f"{f} is not a file" if f.exists() else f"{f} does not exist")
    try:
        docs = read_documents(files)
    except OSError as e:
        fail(f"cannot read {e.filename} ({e.strerror or e})")
    store, manifest = _open_named(session, must_exist=False)
    model = _model_for(model, manifest)
    kv = _kv_of(kv_format, manifest)
    try:
        s = open_session(model, max_context, prefill_step, err)
        sampling = sampling_from(s.folder, temp, top_p, seed, repetition_penalty)
        conv = Conversation(system=system, thinking=bool(think) or think_max, max_effort=think_max)
        conv.messages.append({"role": "user", "content": document_message(docs)})
        messages = conversation_messages(conv)
        target = stable_prefix(s.tokenizer, conv)
        if len(target) >= s.max_context:
            fail(f"the documents make {len(target):,} tokens but the context is {s.max_context:,} "
                 "(--max-context)")
        if max_tokens is None:
            max_tokens = DEMO_MAX_TOKENS if s.demo else DEFAULT_MAX_TOKENS
        settings = make_settings("doc", s.folder, conv, sampling, max_tokens, files=[n for n, _ in docs],
                                 checkpoint_every=checkpoint_every)
        fp = s.fingerprints(kv)
        if manifest is not None:
            store._check(manifest, fp, session)
            if manifest.get("messages") != messages and not force:
                fail(f"session {session!r} already holds another conversation; pick another name, "
                     "remove it (dsv4 sessions rm), or pass --force to replace it", 4)
        rt = SessionRuntime(store, fp, own=session, search_all=reuse_enabled(reuse_prefix, store), warn=warn)
        found = rt.best(target)
        state = rt.state_of(rt.load(found[0], upto=found[1]), found[0]) if found else None
    except SessionError as e:
        session_fail(e)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    total = len(target)
    if state is not None and found[0] == session and len(state.tokens) == total:
        m = store.manifest(session)
        if m.get("messages") != messages or m.get("settings") != settings:
            store.update_meta(session, messages, settings)
        err.print(f"session {session} already holds these documents ({total:,} tokens); nothing to do. "
                  f"Ask with: dsv4 ask --session {session} \"QUESTION\"", markup=False)
        return
    s.preflight(state_copies=1, skip=no_memory_check)
    s.load(kv)
    gen = s.generator(keep_checkpoint=False, track_logits=True)
    if state is not None:
        gen.install(state)
        if found[0] != session and not store.exists(session):
            try:
                rt.fork_from(found[0], session)  # copy-on-write: the checkpoints append to it
            except SessionError as e:
                session_fail(e)
    start = len(gen.tokens)
    if start:
        src = "" if found[0] == session else f" from session '{found[0]}'"
        err.print(f"continuing at {start:,} of {total:,} tokens{src}: prefilling the other "
                  f"{total - start:,}", markup=False)
    saved = {"tokens": start if found and found[0] == session else 0, "count": 0}

    def checkpoint(g):
        rt.save(session, StoredState(list(g.cache), list(g.tokens), g.next_logits), messages, settings)
        saved["tokens"] = len(g.tokens)
        saved["count"] += 1
        _test_hook(saved["count"])

    gen.boundary_every = checkpoint_every
    gen.on_boundary = checkpoint
    progress = PrefillProgress(err, color, s.prefill_step)
    flag = StopFlag()
    t0 = time.perf_counter()

    def interrupted():
        progress.close()
        kept = saved["tokens"]
        where = (f"session {session} keeps the last checkpoint ({kept:,} of {total:,} tokens)" if kept
                 else "no checkpoint was reached, nothing was kept")
        fail(f"interrupted: {where}; run the same command again to continue", EXIT_INTERRUPTED)

    try:
        with flag:
            gen.prefill(target, progress=progress, should_stop=flag, checkpoint=False)
        if len(gen.tokens) < total:
            interrupted()
        if saved["tokens"] != total:
            checkpoint(gen)
    except KeyboardInterrupt:
        interrupted()
    except SessionError as e:
        progress.close()
        session_fail(e)
    finally:
        progress.close()
    dt = time.perf_counter() - t0
    m = store.manifest(session)
    size = sum(x["bytes"] for x in m["segments"])
    done = total - start
    err.print(f"session {session}: {total:,} tokens of {len(docs)} document(s) ({start:,} reused, {done:,} "
              f"prefilled in {dt:.1f}s, {done / max(dt, 1e-9):,.0f} tok/s); {len(m['segments'])} segments, "
              f"{fmt_bytes(size)}", markup=False)
    err.print(f"ask with: dsv4 ask --session {session} \"QUESTION\"  ·  or chat: dsv4 chat --session {session}",
              markup=False, style="dim")


# ---------------------------------------------------------------------------
# dsv4 ask
# ---------------------------------------------------------------------------


@app.command("ask", epilog=EXIT_CODES_HELP)
def ask(
    args: List[str] = typer.Argument(..., help="[MODEL] QUESTION ('-' reads the question from stdin).", show_default=False, metavar="[MODEL] QUESTION"),
    session: str = typer.Option(..., "--session", help="The session to answer from (left unchanged)."),
    save_as: Optional[str] = typer.Option(None, "--save-as", help="Save the conversation with this answer as a new session."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="Replace the session's system prompt (less of the stored state is then reusable)."),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="Think High (default: the session's mode)."),
    think_max: bool = typer.Option(False, "--think-max", help="Think Max."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", help="Most tokens to generate (default: the session's, else 8192; 100 for the demo model)."),
    temp: Optional[float] = typer.Option(None, "--temp", help="Sampling temperature, 0 = greedy (default: the session's)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling (default: the session's)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: the session's)."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="Repetition penalty (default: the session's)."),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Context limit in tokens."),
    prefill_step: int = typer.Option(2048, "--prefill-step", help="Tokens per prefill chunk."),
    kv_format: Optional[str] = typer.Option(None, "--kv-format", help="Decode-state storage (default: the session's)."),
    reuse_prefix: Optional[bool] = typer.Option(None, "--reuse-prefix/--no-reuse-prefix", help="Also look for a longer prefix in the other sessions (default: on when the sessions folder exists)."),
    stats: bool = typer.Option(True, "--stats/--no-stats", help="Print speed and memory on stderr."),
    no_color: bool = typer.Option(False, "--no-color", help="No colors or escape codes."),
    no_memory_check: bool = typer.Option(False, "--no-memory-check", help="Run even if the memory preflight says it will not fit."),
):
    """Answer a question from a session without changing it: the answer on stdout."""
    from ..generate import DEFAULT_MAX_TOKENS, DEMO_MAX_TOKENS, Conversation, encode_prompt
    from ..sessions import SessionError
    from ..sessions.runtime import (SessionRuntime, apply_mode, apply_sampler, conversation_messages,
                                    make_settings, split_messages, stable_prefix)

    color = color_enabled(no_color)
    err = make_console(True, color)
    if len(args) == 1:
        model, question = None, args[0]
    elif len(args) == 2:
        model, question = Path(args[0]), args[1]
    else:
        fail("pass [MODEL] QUESTION (quote the question)")
    if question == "-":
        question = sys.stdin.read()
    if not question.strip():
        fail("the question is empty")
    if max_tokens is not None and max_tokens < 1:
        fail(f"--max-tokens must be positive (got {max_tokens})")
    store, manifest = _open_named(session, must_exist=True)
    if save_as is not None:
        _open_named(save_as, must_exist=False)
        if store.exists(save_as):
            fail(f"session {save_as!r} already exists; pick another name for --save-as", 4)
    model = _model_for(model, manifest)
    kv = _kv_of(kv_format, manifest)
    warn = _warner(err)
    try:
        s = open_session(model, max_context, prefill_step, err)
        sampling = sampling_from(s.folder, temp, top_p, seed, repetition_penalty)
        fp = s.fingerprints(kv)
        store._check(manifest, fp, session)  # before anything is loaded
        stored = manifest.get("settings") or {}
        conv = Conversation()
        conv.system, conv.messages = split_messages(manifest.get("messages", []))
        if system is not None:
            conv.system = system or None
        apply_mode(conv, stored.get("mode"))
        if think is not None or think_max:
            conv.thinking, conv.max_effort = bool(think) or think_max, think_max
        apply_sampler(sampling, stored, _given(temperature=temp, top_p=top_p, seed=seed,
                                               repetition_penalty=repetition_penalty))
        if max_tokens is None:
            st_max = stored.get("max_tokens")
            max_tokens = st_max if isinstance(st_max, int) and st_max > 0 else (
                DEMO_MAX_TOKENS if s.demo else DEFAULT_MAX_TOKENS)
        ids = encode_prompt(s.tokenizer, conv.encode(question))
        if len(ids) >= s.max_context:
            fail(f"the conversation and the question make {len(ids):,} tokens but the context is "
                 f"{s.max_context:,} (--max-context)")
        rt = SessionRuntime(store, fp, own=session, search_all=reuse_enabled(reuse_prefix, store),
                            touch=False, warn=warn)
        found = rt.best(ids[:-1])
        state = rt.state_of(rt.load(found[0], upto=found[1]), found[0]) if found else None
    except SessionError as e:
        session_fail(e)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    s.preflight(state_copies=2 if save_as else 1, skip=no_memory_check)
    s.load(kv)
    gen = s.generator(keep_checkpoint=save_as is not None, track_logits=save_as is not None)
    if state is not None:
        gen.install(state)
    src = f" from session '{found[0]}'" if found else ""

    def after(g):
        st = g.last_stats
        err.print(f"prompt {len(ids):,} tokens: {st.reused_tokens:,} reused{src}, "
                  f"{len(ids) - st.reused_tokens:,} prefilled", markup=False, style="dim")

    if s.demo:
        from .generate_cmd import DEMO_NOTICE

        err.print(f"note: {DEMO_NOTICE}.", markup=False, style="yellow")
    r = emit_reply(gen, ids, s, sampling, max_tokens, err, color, conv.thinking, stats, after_prefill=after)
    if save_as is None:
        return
    conv.add_turn(question, r)
    rt.touch = True
    try:
        rt.fork_from(session, save_as)
        rt.save_turn(save_as, gen, stable_prefix(s.tokenizer, conv), conversation_messages(conv),
                     make_settings("chat", s.folder, conv, sampling, max_tokens))
    except SessionError as e:
        session_fail(e)
    m = store.manifest(save_as)
    err.print(f"saved the conversation as session {save_as} ({len(m['tokens']):,} tokens, "
              f"{len(m['segments'])} segments)", markup=False)
