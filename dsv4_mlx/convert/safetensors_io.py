"""Minimal, dependency-free (numpy) reader/writer for the safetensors file format.

Why: the ``safetensors`` package's numpy API cannot return the checkpoint's ``F8_E4M3`` /
``F8_E8M0`` tensors (numpy has no such dtypes: ``load_file`` raises ``AttributeError``) nor
``BF16`` (``TypeError: data type 'bfloat16' not understood``). The published DeepSeek-V4 shards
(spec ``dsv4-architecture.md`` §3.1, §3.3, §3.4) use exactly these, so this module reads every
tensor as raw numpy bits:

- ``F8_E4M3``, ``F8_E5M2``, ``F8_E8M0`` -> ``uint8`` (decode with :mod:`dsv4_mlx.convert.formats`);
- ``I8`` -> ``int8`` (packed FP4 routed experts, §3.3);
- ``BF16`` -> ``uint16`` raw bits (see :func:`bf16_to_float32` / :func:`float32_to_bf16`);
- ``F16``/``F32``/``F64``/``I16``/``I32``/``I64``/``U8``/``U16``/``U32``/``U64``/``BOOL`` natively.

File layout: 8-byte little-endian unsigned header length N, then N bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(padded with spaces), then the data buffer; offsets are relative to the buffer start.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

__all__ = [
    "SAFETENSORS_DTYPES",
    "SafeTensorsFile",
    "write_safetensors",
    "bf16_to_float32",
    "float32_to_bf16",
]

#: safetensors dtype string -> numpy dtype used to hold its raw bits (little-endian).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
    "F8_E8M0": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}

#: Dtypes whose numpy container does not carry the value semantics (raw bits only).
_RAW_DTYPES = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "BF16"}

_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


# --------------------------------------------------------------------------------------------
# bfloat16 helpers


def bf16_to_float32(u16) -> np.ndarray:
    """Raw bfloat16 bits (uint16) -> float32 (exact)."""
    u16 = np.asarray(u16)
    if u16.dtype not in (np.uint16, np.int16):
        raise TypeError(f"bf16 bits must be uint16, got {u16.dtype}")
    return (u16.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x) -> np.ndarray:
    """float -> raw bfloat16 bits (uint16) with round-to-nearest-even; NaN stays (quiet) NaN."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan_bits = (bits >> 16) | 0x0040
    out = np.where(np.isnan(x), nan_bits, rounded)
    return out.astype(np.uint16)


# --------------------------------------------------------------------------------------------
# reader


class SafeTensorsFile:
    """Read-only view of one ``.safetensors`` file; tensors are memory-mapped on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise ValueError(f"{self.path}: cannot open safetensors file ({exc})") from exc
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(
                    f"{self.path}: truncated safetensors file ({size} bytes, no 8-byte header length)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise ValueError(f"{self.path}: bad header length {n} (limit {_MAX_HEADER})")
            if 8 + n > size:
                raise ValueError(
                    f"{self.path}: truncated safetensors file: header says {n} bytes but the "
                    f"file has only {size - 8} after the length field"
                )
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.path}: bad safetensors header: {exc}") from exc
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: bad safetensors header: not a JSON object")

        meta = header.pop("__metadata__", None)
        if meta is not None and not (
            isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
        ):
            raise ValueError(f"{self.path}: bad __metadata__ (must map str to str)")
        self.metadata: dict[str, str] | None = meta
        self.header_size = n
        self.data_start = 8 + n
        data_size = size - self.data_start

        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, ent in header.items():
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(ent, dict) or not {"dtype", "shape", "data_offsets"} <= ent.keys():
                raise ValueError(f"{where}: bad header entry {ent!r}")
            dtype = ent["dtype"]
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{where}: unknown dtype {dtype!r}")
            shape = ent["shape"]
            if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
            ):
                raise ValueError(f"{where}: bad shape {shape!r}")
            offs = ent["data_offsets"]
            if (
                not isinstance(offs, list)
                or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]
            ):
                raise ValueError(f"{where}: bad data_offsets {offs!r}")
            begin, end = offs
            nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
            if end - begin != nbytes:
                raise ValueError(
                    f"{where}: data_offsets {offs} span {end - begin} bytes but "
                    f"{dtype}{shape} needs {nbytes}"
                )
            if end > data_size:
                raise ValueError(
                    f"{where}: data_offsets {offs} past the end of the file "
                    f"(data buffer has {data_size} bytes; truncated file?)"
                )
            self._entries[name] = (dtype, tuple(shape), begin, end)

        # tensors must not overlap
        spans = sorted((b, e, k) for k, (_, _, b, e) in self._entries.items() if e > b)
        for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ValueError(f"{self.path}: tensors {k0!r} and {k1!r} overlap")

    def __repr__(self) -> str:
        return f"SafeTensorsFile({str(self.path)!r}, {len(self._entries)} tensors)"

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._entries)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(dtype string, shape)`` of ``name`` without reading any data."""
        dtype, shape, _, _ = self._entry(name)
        return dtype, shape

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name: str) -> np.ndarray:
        """Read-only array of ``name`` (memory-mapped; F8 as uint8, BF16 as uint16 bits)."""
        dtype, shape, begin, end = self._entry(name)
        np_dtype = SAFETENSORS_DTYPES[dtype]
        if end == begin:
            arr = np.empty(shape, np_dtype)
            arr.setflags(write=False)
            return arr
        mm = np.memmap(
            self.path,
            dtype=np_dtype,
            mode="r",
            offset=self.data_start + begin,
            shape=shape if shape else (1,),
        )
        return mm.reshape(shape) if not shape else mm

    def read(self, name: str) -> np.ndarray:
        """A private copy of ``name`` read with plain file reads (freed when dropped; unlike
        :meth:`get`, leaves no mapped pages counted in the process's resident memory)."""
        dtype, shape, begin, end = self._entry(name)
        np_dtype = SAFETENSORS_DTYPES[dtype]
        arr = np.empty(shape, np_dtype)
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                if f.readinto(memoryview(arr).cast("B")) != end - begin:
                    raise ValueError(f"{self.path}: tensor {name!r} is truncated")
        return arr

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)


# --------------------------------------------------------------------------------------------
# writer


def _as_raw(name: str, dtype: str, arr) -> np.ndarray:
    """Array holding the raw bits of ``arr`` in the container dtype of safetensors ``dtype``."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r}: unknown safetensors dtype {dtype!r}")
    target = SAFETENSORS_DTYPES[dtype]
    arr = np.asarray(arr)
    if dtype == "BF16" and np.issubdtype(arr.dtype, np.floating):
        return float32_to_bf16(arr)  # convenience: floats are rounded (RNE) to bf16 bits
    if dtype in _RAW_DTYPES:
        if arr.dtype.kind not in "ui" or arr.dtype.itemsize != target.itemsize:
            raise TypeError(
                f"tensor {name!r}: {dtype} must be given as raw {target.itemsize * 8}-bit "
                f"integer bits, got {arr.dtype}"
            )
        return arr.view(target) if arr.dtype != target else arr
    if arr.dtype.kind != target.kind or arr.dtype.itemsize != target.itemsize:
        raise TypeError(f"tensor {name!r}: array dtype {arr.dtype} does not match {dtype}")
    return arr.astype(target, copy=False)


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, tuple[str, np.ndarray]],
    metadata: dict | None = None,
) -> None:
    """Write ``{name: (dtype string, array)}`` to ``path`` in safetensors format.

    Tensors are laid out largest-itemsize first (then by name) so every tensor is aligned to its
    element size; the JSON header is padded with spaces to a multiple of 8 bytes. ``metadata``
    values must be strings (as the format requires).
    """
    raw: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for name, (dtype, arr) in tensors.items():
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
        raw[name] = np.asarray(_as_raw(name, dtype, arr), order="C")  # keeps 0-d arrays 0-d
        dtypes[name] = dtype
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")

    order = sorted(raw, key=lambda k: (-raw[k].dtype.itemsize, k))
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        nbytes = raw[name].nbytes
        header[name] = {
            "dtype": dtypes[name],
            "shape": list(raw[name].shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            if raw[name].nbytes:
                f.write(raw[name].reshape(-1).view(np.uint8).data)
