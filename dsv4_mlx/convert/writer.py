"""Streaming, atomic safetensors output.

The plan knows every output tensor's dtype and shape, so a shard's header is written first and
tensors are streamed in one at a time: memory holds one tensor, whatever the shard size. The
file is written under a temporary name, hashed while written, fsync'ed and renamed into place;
a half-written shard never carries the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .plan import _ITEMSIZE, _nbytes

_NP = {"U32": "<u4", "U8": "u1", "BF16": "<u2", "F32": "<f4", "I32": "<i4", "I64": "<i8",
       "F8_E4M3": "u1", "F8_E8M0": "u1", "I8": "i1"}


class ShardWriter:
    def __init__(self, path: Path, specs: List[Tuple[str, str, Tuple[int, ...]]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.specs = {name: (dt, tuple(shape)) for name, dt, shape in specs}
        header, offset = {}, 0
        for name, dt, shape in specs:
            n = _nbytes(dt, shape)
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = dict(metadata or {})
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.order = [name for name, _, _ in specs]
        self.next = 0
        self.sha = hashlib.sha256()
        self.f = open(self.tmp, "wb")
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, b) -> None:
        self.sha.update(b)
        self.f.write(b)

    def write(self, name: str, arr: np.ndarray) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise RuntimeError(f"tensor {name} written out of order")
        dt, shape = self.specs[name]
        arr = np.ascontiguousarray(arr)
        if tuple(arr.shape) != shape or arr.dtype != np.dtype(_NP[dt]):
            raise RuntimeError(f"{name}: got {arr.dtype}{arr.shape}, planned {dt}{shape}")
        self._write(memoryview(arr).cast("B"))
        self.next += 1

    def close(self) -> str:
        """Finish: fsync, rename into place, return the SHA-256 of the file."""
        if self.next != len(self.order):
            raise RuntimeError(f"{self.path.name}: {len(self.order) - self.next} tensors not written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.sha.hexdigest()

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, tmp_suffix: str = ".partial") -> None:
    """Write `text` to a temporary name, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(path.name + tmp_suffix)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


assert set(_NP) <= set(_ITEMSIZE)
