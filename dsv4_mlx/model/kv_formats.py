"""Storage formats of the decode state (spec §4.13 items 2 and 3, §5.3).

* `bf16`: window KV, compressed KV and indexer keys in the model's compute dtype, as computed
  (what transformers does; used for exact parity).
* `fp8` (default): the current official numerics, stored compactly.
  - Window and compressed KV: the c - r non-RoPE dims as FP8 e4m3 with one power-of-two scale
    per 64 values, ``s = 2^ceil(log2(max(amax, 1e-4) / 448))``; the r RoPE dims in the compute
    dtype. 448 + 7 + 128 = 583 bytes per 512-d entry instead of 1024.
  - Indexer keys: Walsh-Hadamard rotation (Sylvester H, scaled by d^-1/2), then FP4 e2m1 with one
    power-of-two scale per 32 values, ``s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6))``,
    round-to-nearest-even; stored in MLX's `mxfp4` layout (uint32 words holding 8 codes, low
    nibble = even element; uint8 E8M0 scales). Indexer queries get the same rotation and FP4
    round trip (not stored).

A codec's `roundtrip(x)` is exactly `decode(encode(x))`: the model attends over round-tripped
values for the current chunk too (as the reference does), so storing the encoded form loses
nothing further.
"""

from __future__ import annotations

import math
from typing import Dict

import mlx.core as mx

KV_FORMATS = ("fp8", "bf16")
DEFAULT_KV_FORMAT = "fp8"

_E2M1_LUT = mx.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _ceil_log2(v: mx.array) -> mx.array:
    """ceil(log2(v)) for positive normal fp32 v, from the bits (exponent + (mantissa != 0))."""
    bits = v.astype(mx.float32).view(mx.uint32)
    exp = ((bits >> 23) & 0xFF).astype(mx.int32) - 127
    return exp + ((bits & 0x7FFFFF) != 0).astype(mx.int32)


def _pow2(k: mx.array) -> mx.array:
    """2^k as fp32 (k within the normal range), built from the bits: exact."""
    return ((k + 127).astype(mx.uint32) << 23).view(mx.float32)


def _block(n: int, preferred: int) -> int:
    """The block size for n values: `preferred` when it divides n, else the largest power of two
    dividing both (small test models only; the real dims take the preferred size)."""
    return preferred if n % preferred == 0 else math.gcd(n, preferred)


# -- FP8 e4m3 with per-block power-of-two scales --------------------------------------------------

def fp8_encode(x: mx.array, block: int):
    *lead, n = x.shape
    xb = x.astype(mx.float32).reshape(*lead, n // block, block)
    amax = mx.abs(xb).max(axis=-1, keepdims=True)
    k = _ceil_log2(mx.maximum(amax, 1e-4) * (1.0 / 448.0))
    y = mx.clip(xb * _pow2(-k), -448.0, 448.0)  # multiplying by 2^-k is exact
    return mx.to_fp8(y).reshape(*lead, n), (k + 127).astype(mx.uint8).squeeze(-1)


def fp8_decode(codes: mx.array, scales: mx.array, block: int, dtype) -> mx.array:
    *lead, n = codes.shape
    v = mx.from_fp8(codes, dtype=mx.float32).reshape(*lead, n // block, block)
    s = _pow2(scales.astype(mx.int32) - 127)[..., None]
    return (v * s).reshape(*lead, n).astype(dtype)


# -- FP4 e2m1 with per-block power-of-two scales ---------------------------------------------------

def fp4_encode(x: mx.array, block: int):
    """-> (packed uint32 [..., n/8], scales uint8 [..., n/block]); mxfp4 layout when block = 32."""
    *lead, n = x.shape
    xb = x.astype(mx.float32).reshape(*lead, n // block, block)
    amax = mx.abs(xb).max(axis=-1, keepdims=True)
    k = _ceil_log2(mx.maximum(amax, 6.0 * 2.0**-126) * (1.0 / 6.0))
    y = mx.clip(xb * _pow2(-k), -6.0, 6.0)
    a = mx.abs(y)
    # round to nearest even on the e2m1 grid [0, .5, 1, 1.5, 2, 3, 4, 6]
    mag = ((a > 0.25).astype(mx.uint32) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5)
           + (a >= 3.5) + (a > 5.0))
    codes = (mag + 8 * (y < 0)).astype(mx.uint32).reshape(*lead, n // 8, 8)
    shifts = mx.arange(0, 32, 4, dtype=mx.uint32)
    packed = (codes << shifts).sum(axis=-1).astype(mx.uint32)
    return packed, (k + 127).astype(mx.uint8).squeeze(-1)


def fp4_decode(packed: mx.array, scales: mx.array, block: int, dtype) -> mx.array:
    *lead, w = packed.shape
    n = w * 8
    shifts = mx.arange(0, 32, 4, dtype=mx.uint32)
    codes = ((packed[..., None] >> shifts) & 0xF).reshape(*lead, n // block, block)
    v = _E2M1_LUT[codes] * _pow2(scales.astype(mx.int32) - 127)[..., None]
    return v.reshape(*lead, n).astype(dtype)


def hadamard(x: mx.array) -> mx.array:
    """Sylvester-ordered Walsh-Hadamard rotation scaled by d^-1/2 (orthonormal)."""
    d = x.shape[-1]
    if x.size == 0:
        return x
    return mx.hadamard_transform(x.astype(mx.float32), scale=1.0 / math.sqrt(d)).astype(x.dtype)


# -- compiled forms ---------------------------------------------------------------------------------
# Each codec step is a chain of elementwise ops around one reduction; `mx.compile` fuses the
# chains (the fp8 round trip of one token: 60 primitives -> 23). One compiled function per
# (step, constants), shared by every layer; MLX retraces it per input shape.

_COMPILED: Dict[tuple, object] = {}


def _compiled(fn, *consts):
    key = (fn.__name__, consts)
    f = _COMPILED.get(key)
    if f is None:
        f = _COMPILED[key] = mx.compile(lambda *a: fn(*a, *consts))
    return f


def _fp8_kv_encode(x, nope, block):
    codes, scales = fp8_encode(x[..., :nope], block)
    return codes, scales, x[..., nope:]


def _fp8_kv_decode(codes, scales, rope, block):
    return mx.concatenate([fp8_decode(codes, scales, block, rope.dtype), rope], axis=-1)


def _fp8_kv_roundtrip(x, nope, block):
    return _fp8_kv_decode(*_fp8_kv_encode(x, nope, block), block)


def _fp4_index_encode(x, block):
    return fp4_encode(hadamard(x), block)


def _fp4_index_decode(packed, scales, block):
    return fp4_decode(packed, scales, block, mx.float32)


def _fp4_index_roundtrip(x, block):
    return fp4_decode(*_fp4_index_encode(x, block), block, x.dtype)


# -- codecs ---------------------------------------------------------------------------------------

class PlainCodec:
    """Values as computed, in the compute dtype."""

    name = "bf16"
    part_names = ("kv",)

    def __init__(self, dims: int):
        self.dims = dims

    def encode(self, x: mx.array) -> Dict[str, mx.array]:
        return {"kv": x}

    def decode(self, parts: Dict[str, mx.array]) -> mx.array:
        return parts["kv"]

    def roundtrip(self, x: mx.array) -> mx.array:
        return x

    def bytes_per_entry(self, itemsize: int) -> float:
        return self.dims * itemsize


class FP8KVCodec:
    """Window / compressed KV: FP8 non-RoPE dims (per-64 scales), RoPE dims unrounded."""

    name = "fp8"
    part_names = ("nope", "rope", "scale")

    def __init__(self, dims: int, rope_dims: int):
        self.dims, self.rope = dims, rope_dims
        self.nope = dims - rope_dims
        self.block = _block(self.nope, 64)

    def encode(self, x):
        codes, scales, rope = _compiled(_fp8_kv_encode, self.nope, self.block)(x)
        return {"nope": codes, "scale": scales, "rope": rope}

    def decode(self, parts):
        return _compiled(_fp8_kv_decode, self.block)(parts["nope"], parts["scale"], parts["rope"])

    def roundtrip(self, x):
        return _compiled(_fp8_kv_roundtrip, self.nope, self.block)(x)

    def bytes_per_entry(self, itemsize: int) -> float:
        return self.nope + self.nope // self.block + self.rope * itemsize


class FP4IndexCodec:
    """Indexer keys: Hadamard rotation, then FP4 e2m1 with per-32 scales (mxfp4 layout)."""

    name = "fp8"
    part_names = ("packed", "scale")

    def __init__(self, dims: int):
        self.dims = dims
        self.block = _block(dims, 32)

    def encode(self, x):
        packed, scales = _compiled(_fp4_index_encode, self.block)(x)
        return {"packed": packed, "scale": scales}

    def decode(self, parts):
        # e2m1 x 2^k is exact in fp32 (and in bf16); the indexer scores in fp32 anyway
        return _compiled(_fp4_index_decode, self.block)(parts["packed"], parts["scale"])

    def roundtrip(self, x):
        """Rotate and round (also what indexer queries get)."""
        return _compiled(_fp4_index_roundtrip, self.block)(x)

    def bytes_per_entry(self, itemsize: int) -> float:
        return self.dims / 2 + self.dims // self.block

    @property
    def mxfp4(self) -> bool:
        return self.block == 32


def kv_codec(fmt: str, dims: int, rope_dims: int):
    if fmt == "bf16":
        return PlainCodec(dims)
    if fmt == "fp8":
        return FP8KVCodec(dims, rope_dims)
    raise ValueError(f"unknown KV format {fmt!r} (one of {', '.join(KV_FORMATS)})")


def index_codec(fmt: str, dims: int):
    if fmt == "bf16":
        return PlainCodec(dims)
    if fmt == "fp8":
        return FP4IndexCodec(dims)
    raise ValueError(f"unknown KV format {fmt!r} (one of {', '.join(KV_FORMATS)})")
