"""On-disk sessions: versioned KV snapshots that resume in seconds (format: docs/SESSIONS.md).

A session is a folder::

    manifest.json            written last, atomically; names every valid segment
    seg-000001.safetensors   append-only segments

Each segment holds, per layer, the compressed entries and indexer keys added since the
previous segment, plus the small state at its boundary (window ring, compressor pending and
overlap rows) and the next-token logits there, so every segment boundary is a valid resume
point and a save after a chat turn writes O(new tokens), not O(context).

Writes: segment to a temporary name, fsync, rename; then the manifest the same way. A process
killed at any moment leaves the previous manifest, which names only complete segments.
Loading checks the format version and the model, tokenizer and encoding fingerprints before
touching the model, and every segment's SHA-256 before using it; a damaged segment cuts the
session back to the last intact boundary, and the caller is told.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .. import __version__
from ..cache import LayerCache
from ..convert.writer import atomic_write_text, fsync_dir, sha256_file

FORMAT = "dsv4-session"
FORMAT_VERSION = 1
STATE_VERSION = "v1"  # state_format = f"{kv_format}-{STATE_VERSION}" (model/kv_formats.py)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class SessionError(Exception):
    """A session problem, said in one sentence. `exit_code` is the CLI's."""

    exit_code = 4


class SessionNotFound(SessionError):
    exit_code = 4


class IncompatibleSession(SessionError):
    """Another model, tokenizer, encoding or format version: refused, nothing modified."""

    exit_code = 5


class CorruptSession(SessionError):
    exit_code = 6


# -- fingerprints -------------------------------------------------------------------------------

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sampled_sha(path: Path, samples: int = 16, size: int = 1 << 20) -> str:
    """Hash of a file's size and `samples` evenly spaced 1 MiB windows (cheap on 5 GB shards)."""
    h = hashlib.sha256()
    n = path.stat().st_size
    h.update(str(n).encode())
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(max(0, (n - size) * i // max(samples - 1, 1)))
            h.update(f.read(size))
    return h.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """Config (architecture, quantization) and the weights' content: what decides the state.

    Uses the shard SHA-256s that `dsv4 convert` records; for other folders, a sampled hash of
    every shard.
    """
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("dsv4_mlx", None)
    recorded = {}
    progress = model_dir / ".dsv4-convert.json"
    if progress.is_file():
        try:
            recorded = json.loads(progress.read_text()).get("shards", {})
        except json.JSONDecodeError:
            recorded = {}
    shards = {}
    for p in sorted(model_dir.glob("*.safetensors")):
        shards[p.name] = recorded.get(p.name) or _sampled_sha(p)
    return _sha(json.dumps([cfg, shards], sort_keys=True).encode())[:32]


def tokenizer_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        p = Path(model_dir) / f
        h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()[:32]


def encoding_fingerprint() -> str:
    from .. import encoding

    return _sha(json.dumps([encoding.BOS, encoding.EOS, encoding.USER, encoding.ASSISTANT,
                            encoding.THINK_START, encoding.THINK_END, encoding.THINK_MAX_PREFIX,
                            encoding.TOOLS_TEMPLATE]).encode())[:32]


@dataclass
class Fingerprints:
    model: str
    tokenizer: str
    encoding: str
    state_format: str = f"fp8-{STATE_VERSION}"

    @classmethod
    def of(cls, model_dir: Path, kv_format: str = "fp8") -> "Fingerprints":
        return cls(model_fingerprint(model_dir), tokenizer_fingerprint(model_dir), encoding_fingerprint(),
                   f"{kv_format}-{STATE_VERSION}")

    @property
    def kv_format(self) -> str:
        return self.state_format.rsplit("-", 1)[0]

    def as_dict(self) -> Dict[str, str]:
        return dict(model=self.model, tokenizer=self.tokenizer, encoding=self.encoding,
                    state_format=self.state_format)


# -- loaded sessions ---------------------------------------------------------------------------

@dataclass
class Loaded:
    caches: List[LayerCache]
    tokens: List[int]  # the tokens the caches hold
    next_logits: mx.array
    messages: List[Dict]
    settings: Dict
    segments_used: int
    segments_total: int
    warning: Optional[str] = None
    manifest: Dict = field(default_factory=dict)


_fsync_dir = fsync_dir
_file_sha = sha256_file


def _atomic_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1), tmp_suffix=".tmp")


def default_root() -> Path:
    env = os.environ.get("DSV4_SESSIONS")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsv4-mlx" / "sessions"


class SessionStore:
    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root else default_root()

    # -- names -------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
            raise SessionError(
                f"{name!r} is not a session name (letters, digits, '.', '_', '-'; no paths)")
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.path(name) / "manifest.json").is_file()

    def manifest(self, name: str) -> Dict:
        p = self.path(name) / "manifest.json"
        if not p.is_file():
            raise SessionNotFound(f"no session named {name!r} in {self.root}")
        try:
            m = json.loads(p.read_text())
        except json.JSONDecodeError:
            raise CorruptSession(f"the manifest of session {name!r} is unreadable") from None
        if m.get("format") != FORMAT:
            raise IncompatibleSession(f"{p} is not a dsv4 session")
        if m.get("format_version") != FORMAT_VERSION:
            raise IncompatibleSession(
                f"session {name!r} has format version {m.get('format_version')}, this dsv4 reads "
                f"version {FORMAT_VERSION}")
        return m

    def list(self) -> List[Dict]:
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            if (d / "manifest.json").is_file():
                try:
                    m = self.manifest(d.name)
                except SessionError:
                    continue
                out.append(dict(name=d.name, tokens=len(m["tokens"]), turns=len(m.get("messages", [])),
                                segments=len(m["segments"]), bytes=sum(s["bytes"] for s in m["segments"]),
                                updated=m.get("updated"), last_used=m.get("last_used")))
        return out

    # -- save --------------------------------------------------------------------------------
    def save(self, name: str, caches: Sequence[LayerCache], tokens: Sequence[int], next_logits: mx.array,
             fingerprints: Fingerprints, messages: Sequence[Dict] = (), settings: Optional[Dict] = None) -> Dict:
        """Append one segment with what the caches hold beyond the stored session.

        If the stored tokens are not a prefix of `tokens` (the conversation changed), the
        session is cut back to its longest boundary that is a prefix of `tokens` (from scratch
        when there is none) and the rest is written as one new segment; the segments dropped
        go only after the new manifest is in place.
        """
        tokens = [int(t) for t in tokens]
        T = len(tokens)
        if any(c.offset != T for c in caches):
            raise SessionError("the caches do not hold exactly the given tokens")
        if any(c.kv_format != fingerprints.kv_format for c in caches):
            raise SessionError(f"the caches are not in the {fingerprints.kv_format} state format")
        folder = self.path(name)
        old = None
        if (folder / "manifest.json").is_file():
            old = self.manifest(name)
            self._check(old, fingerprints, name)
        segments: List[Dict] = []
        prev_T = 0
        if old and old["segments"]:
            # keep the stored segments up to the longest boundary that is a prefix of `tokens`
            # (all of them when the conversation only grew)
            for k, s in enumerate(old["segments"]):
                Tk = s["tokens"]
                if Tk > T or old["tokens"][:Tk] != tokens[:Tk]:
                    break
                segments, prev_T = list(old["segments"][: k + 1]), Tk
        if segments and prev_T == T:
            manifest = dict(old, tokens=tokens, segments=segments, messages=list(messages),
                            settings=settings or old.get("settings", {}),
                            updated=time.time(), last_used=time.time())
            _atomic_json(folder / "manifest.json", manifest)
            self._sweep(folder, manifest)
            return manifest
        folder.mkdir(parents=True, exist_ok=True)
        arrays: Dict[str, mx.array] = {"next_logits": next_logits.reshape(-1).astype(mx.float32)}
        for i, c in enumerate(caches):
            for k, v in c.segment(prev_T).items():
                arrays[f"L{i}.{k}"] = v
        # a new file name: never one that the current manifest names (crash safety)
        seq = 1 + max([int(s["file"][4:10]) for s in (old or {}).get("segments", [])] + [0])
        fname = f"seg-{seq:06d}.safetensors"
        tmp = folder / f"seg-{seq:06d}.tmp.safetensors"
        try:
            mx.save_safetensors(str(tmp), arrays, metadata={"tokens": str(T), "format": FORMAT})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, folder / fname)
            _fsync_dir(folder)
            segments.append(dict(file=fname, tokens=T, sha256=_file_sha(folder / fname),
                                 bytes=(folder / fname).stat().st_size))
            now = time.time()
            manifest = dict(
                format=FORMAT, format_version=FORMAT_VERSION, dsv4_version=__version__,
                fingerprints=fingerprints.as_dict(), layers=[list(c.layout()) for c in caches],
                tokens=tokens, messages=list(messages), settings=settings or {}, segments=segments,
                created=old["created"] if old else now, updated=now, last_used=now,
            )
            _atomic_json(folder / "manifest.json", manifest)
        except (OSError, RuntimeError) as e:
            tmp.unlink(missing_ok=True)
            (folder / "manifest.json.tmp").unlink(missing_ok=True)
            if old is None or not (folder / "manifest.json").is_file():
                (folder / fname).unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno == 28 or "No space" in str(e):
                raise SessionError(f"the disk holding {self.root} is full; session {name!r} was not "
                                   "saved (the previous save is intact)") from None
            raise SessionError(f"could not save session {name!r} ({e}); the previous save is intact") from None
        self._sweep(folder, manifest)
        return manifest

    def _sweep(self, folder: Path, manifest: Dict) -> None:
        """Remove segment files the manifest no longer names (and leftovers of killed saves)."""
        keep = {s["file"] for s in manifest["segments"]} | {"manifest.json"}
        for p in folder.iterdir():
            if p.name not in keep and (p.name.startswith("seg-") or p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)

    # -- load --------------------------------------------------------------------------------
    def _check(self, m: Dict, fp: Fingerprints, name: str) -> None:
        have = m.get("fingerprints", {})
        for key, what in (("state_format", "state format"), ("model", "model"),
                          ("tokenizer", "tokenizer"), ("encoding", "prompt encoding")):
            if have.get(key) != fp.as_dict()[key]:
                raise IncompatibleSession(
                    f"session {name!r} was saved with another {what}; refusing to load it")

    def load(self, name: str, fingerprints: Fingerprints, upto_tokens: Optional[int] = None,
             touch: bool = True) -> Loaded:
        """Rebuild the caches at the last intact boundary (or the last one <= `upto_tokens`).

        `touch=False` leaves the folder byte for byte as it was (no `last_used` update)."""
        m = self.manifest(name)
        self._check(m, fingerprints, name)
        folder = self.path(name)
        segs, warning = [], None
        for s in m["segments"]:
            if upto_tokens is not None and s["tokens"] > upto_tokens:
                break
            p = folder / s["file"]
            if not p.is_file() or p.stat().st_size != s["bytes"] or _file_sha(p) != s["sha256"]:
                warning = (f"segment {s['file']} of session {name!r} is damaged; resuming at the last "
                           f"intact point ({segs[-1]['tokens'] if segs else 0} of {m['segments'][-1]['tokens']} tokens)")
                break
            segs.append(s)
        if not segs:
            raise CorruptSession(f"session {name!r} has no intact segment to resume from")
        data = [mx.load(str(folder / s["file"])) for s in segs]
        T = segs[-1]["tokens"]
        caches = []
        for i, layout in enumerate(m["layers"]):
            per = [{k.split(".", 1)[1]: v for k, v in d.items() if k.startswith(f"L{i}.")} for d in data]
            caches.append(LayerCache.from_segments(tuple(layout), fingerprints.kv_format, per, T))
        msgs = m.get("messages", []) if T == len(m["tokens"]) else []
        if touch:
            m["last_used"] = time.time()
            try:
                _atomic_json(folder / "manifest.json", m)
            except OSError:
                pass
        return Loaded(caches, m["tokens"][:T], data[-1]["next_logits"], msgs, m.get("settings", {}),
                      len(segs), len(m["segments"]), warning, m)

    # -- prefix reuse ------------------------------------------------------------------------
    def find_prefix(self, tokens: Sequence[int], fingerprints: Fingerprints) -> Optional[Tuple[str, int]]:
        """The session and boundary holding the longest stored prefix of `tokens`."""
        tokens = [int(t) for t in tokens]
        best: Optional[Tuple[str, int]] = None
        for info in self.list():
            try:
                m = self.manifest(info["name"])
                self._check(m, fingerprints, info["name"])
            except SessionError:
                continue
            for s in m["segments"]:
                T = s["tokens"]
                if T <= len(tokens) and m["tokens"][:T] == tokens[:T] and (best is None or T > best[1]):
                    best = (info["name"], T)
        return best

    # -- management --------------------------------------------------------------------------
    def fork(self, src: str, dst: str) -> None:
        """Copy-on-write: the new session shares the segment files (hard links)."""
        m = self.manifest(src)
        d = self.path(dst)
        if d.exists():
            raise SessionError(f"session {dst!r} already exists")
        tmp = self.root / f".{dst}.forking"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for s in m["segments"]:
            try:
                os.link(self.path(src) / s["file"], tmp / s["file"])
            except OSError:
                shutil.copyfile(self.path(src) / s["file"], tmp / s["file"])
        _atomic_json(tmp / "manifest.json", dict(m, created=time.time()))
        os.replace(tmp, d)

    def remove(self, name: str) -> None:
        self.manifest(name)  # raises when missing
        shutil.rmtree(self.path(name))

    def truncate(self, name: str, segments: int) -> Dict:
        """Keep only the first `segments` segments (after damage was found beyond them)."""
        m = self.manifest(name)
        if segments >= len(m["segments"]):
            return m
        if segments < 1:
            raise CorruptSession(f"session {name!r} has no intact segment to keep")
        keep = m["segments"][:segments]
        m = dict(m, segments=keep, tokens=m["tokens"][: keep[-1]["tokens"]], updated=time.time())
        _atomic_json(self.path(name) / "manifest.json", m)
        self._sweep(self.path(name), m)
        return m

    def update_meta(self, name: str, messages: Optional[Sequence[Dict]] = None,
                    settings: Optional[Dict] = None) -> Dict:
        """Replace the transcript and/or settings, leaving the segments as they are."""
        m = self.manifest(name)
        if messages is not None:
            m["messages"] = list(messages)
        if settings is not None:
            m["settings"] = dict(settings)
        m["updated"] = m["last_used"] = time.time()
        _atomic_json(self.path(name) / "manifest.json", m)
        return m

    def verify(self, name: str) -> Tuple[int, Optional[str]]:
        """(intact segments, the first problem or None): sizes and SHA-256s, nothing modified."""
        m = self.manifest(name)
        for i, s in enumerate(m["segments"]):
            p = self.path(name) / s["file"]
            if not p.is_file():
                return i, f"segment {s['file']} is missing"
            if p.stat().st_size != s["bytes"]:
                return i, f"segment {s['file']} has {p.stat().st_size:,} bytes instead of {s['bytes']:,}"
            if _file_sha(p) != s["sha256"]:
                return i, f"segment {s['file']} does not match its SHA-256"
        return len(m["segments"]), None

    def import_archive(self, file: Path, name: Optional[str] = None) -> str:
        """Unpack an archive written by `export` as session `name` (default: its own name)."""
        file = Path(file)
        try:
            tar = tarfile.open(file, "r")
        except (OSError, tarfile.TarError) as e:
            raise SessionError(f"{file} is not a session archive ({e})") from None
        with tar:
            members = tar.getmembers()
            tops = {mem.name.split("/", 1)[0] for mem in members}
            if len(tops) != 1:
                raise SessionError(f"{file} is not a session archive (one folder expected)")
            src = tops.pop()
            name = name or src
            dest = self.path(name)
            if dest.exists():
                raise SessionError(f"session {name!r} already exists")
            files = {}
            for mem in members:
                rel = mem.name[len(src) + 1:]
                if not mem.isfile() or not (rel == "manifest.json" or re.match(r"^seg-\d{6}\.safetensors$", rel)):
                    raise SessionError(f"{file} holds {mem.name!r}, which a session archive never holds")
                files[rel] = mem
            if "manifest.json" not in files:
                raise SessionError(f"{file} has no manifest.json")
            tmp = self.root / f".{name}.importing"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                for rel, mem in files.items():
                    with tar.extractfile(mem) as fin, open(tmp / rel, "wb") as fout:
                        shutil.copyfileobj(fin, fout)
                m = json.loads((tmp / "manifest.json").read_text())
                if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
                    raise IncompatibleSession(f"{file} holds a session of another format or version")
                for s in m["segments"]:
                    p = tmp / s["file"]
                    if not p.is_file() or p.stat().st_size != s["bytes"] or _file_sha(p) != s["sha256"]:
                        raise CorruptSession(f"segment {s['file']} in {file} is damaged")
                _fsync_dir(tmp)
                os.replace(tmp, dest)
            except (OSError, ValueError) as e:
                raise SessionError(f"could not import {file} ({e})") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return name

    def export(self, name: str, file: Path) -> Path:
        """One portable archive (tar) holding the manifest and the segments."""
        m = self.manifest(name)
        file = Path(file)
        tmp = file.with_name(file.name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for s in m["segments"]:
                tar.add(self.path(name) / s["file"], arcname=f"{name}/{s['file']}")
            tar.add(self.path(name) / "manifest.json", arcname=f"{name}/manifest.json")
        os.replace(tmp, file)
        return file

    def evict(self, budget_bytes: int, prefix: str = "auto-") -> List[str]:
        """Delete least-recently-used automatic snapshots until they fit the budget."""
        autos = [s for s in self.list() if s["name"].startswith(prefix)]
        autos.sort(key=lambda s: s.get("last_used") or 0)
        total = sum(s["bytes"] for s in autos)
        gone = []
        while autos and total > budget_bytes:
            s = autos.pop(0)
            self.remove(s["name"])
            total -= s["bytes"]
            gone.append(s["name"])
        return gone
