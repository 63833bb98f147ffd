"""Exact codecs for the low-precision formats of the published DeepSeek-V4 checkpoints.

Spec references (``dsv4-architecture.md``):

- §3.3 formats and exact dequantization: UE8M0 scales (``F8_E8M0``), FP8 e4m3fn weights with
  128x128 block scales, FP4 e2m1 routed-expert weights packed two per byte in ``I8`` (low nibble
  = even column) with 1x32 scales; scales may also come as F32 exact powers of two (§3.1);
- §3.3 "MLX loading hint": repack to MLX ``mxfp4`` / ``mxfp8`` quantized layouts;
- §4.13 e2m1 round-to-nearest-even thresholds.

Everything except the two ``*_to_mx*`` repack functions is pure numpy. All decoders are exact:
every e4m3/e2m1 value times a power-of-two scale is representable in float32 for the scale
range that occurs in the checkpoints.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "E4M3_LUT",
    "E2M1_LUT",
    "E4M3_MAX",
    "E2M1_MAX",
    "e8m0_to_float",
    "float_to_e8m0",
    "e4m3_to_float",
    "float_to_e4m3",
    "e2m1_to_float",
    "float_to_e2m1",
    "fp4_unpack",
    "fp4_pack",
    "scales_to_float",
    "scales_to_e8m0",
    "dequant_fp8",
    "dequant_fp4",
    "quantize_fp8_block",
    "quantize_fp4",
    "fp4_repack",
    "fp4_to_mxfp4",
    "fp8_repack",
    "fp8_to_mxfp8",
]

E4M3_MAX = 448.0
E2M1_MAX = 6.0


# --------------------------------------------------------------------------------------------
# UE8M0 scales (§3.3): one byte b = 2^(b - 127); 255 is NaN.


def e8m0_to_float(b) -> np.ndarray:
    """Decode UE8M0 bytes to float32: ``2^(b - 127)``; byte 255 decodes to NaN.

    Byte 0 gives 2^-127, a float32 subnormal (exact).
    """
    b = np.asarray(b)
    if b.dtype != np.uint8:
        raise TypeError(f"e8m0_to_float expects uint8 bytes, got {b.dtype}")
    e = np.where(b == 255, 0, b.astype(np.int64) - 127)
    out = np.array(np.ldexp(1.0, e), dtype=np.float32)
    out[b == 255] = np.nan
    return out


def float_to_e8m0(x) -> np.ndarray:
    """Encode exact powers of two in [2^-127, 2^127] as UE8M0 bytes; anything else is an error."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"float_to_e8m0 expects a float array, got {x.dtype}")
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(x64) & (x64 > 0)
    mant, exp = np.frexp(np.where(ok, x64, 1.0))
    ok &= mant == 0.5
    e = exp.astype(np.int64) - 1  # x = 2^e
    ok &= (e >= -127) & (e <= 127)
    if not np.all(ok):
        bad = x.reshape(-1)[~ok.reshape(-1)][:4]
        raise ValueError(
            f"UE8M0 needs exact powers of two in [2^-127, 2^127]; got e.g. {bad.tolist()}"
        )
    return (e + 127).astype(np.uint8)


def scales_to_float(scale) -> np.ndarray:
    """Scale tensor -> float32: uint8 is decoded as UE8M0; floats must be exact powers of two."""
    scale = np.asarray(scale)
    if scale.dtype == np.uint8:
        return e8m0_to_float(scale)
    if np.issubdtype(scale.dtype, np.floating):
        float_to_e8m0(scale)  # validates: raises ValueError unless exact powers of two
        return scale.astype(np.float32)
    raise TypeError(f"scales must be uint8 (UE8M0 bytes) or float powers of two, got {scale.dtype}")


def scales_to_e8m0(scale) -> np.ndarray:
    """Scale tensor -> UE8M0 bytes (uint8 passes through; floats must be exact powers of two)."""
    scale = np.asarray(scale)
    if scale.dtype == np.uint8:
        return scale
    if np.issubdtype(scale.dtype, np.floating):
        return float_to_e8m0(scale)
    raise TypeError(f"scales must be uint8 (UE8M0 bytes) or float powers of two, got {scale.dtype}")


# --------------------------------------------------------------------------------------------
# FP8 e4m3fn (OCP): sign, 4 exponent bits (bias 7), 3 mantissa bits, max 448, no inf,
# 0x7F / 0xFF NaN, exponent field 0 = subnormal (m/8 * 2^-6).


def _build_e4m3_lut() -> np.ndarray:
    lut = np.empty(256, np.float32)
    for b in range(256):
        s = -1.0 if b & 0x80 else 1.0
        e = (b >> 3) & 0xF
        m = b & 0x7
        if e == 0xF and m == 0x7:
            v = float("nan")
        elif e == 0:
            v = s * (m / 8.0) * 2.0**-6
        else:
            v = s * (1.0 + m / 8.0) * 2.0 ** (e - 7)
        lut[b] = v
    return lut


#: float32 value of every e4m3fn byte (index = byte).
E4M3_LUT: np.ndarray = _build_e4m3_lut()
E4M3_LUT.setflags(write=False)

#: e2m1 magnitudes for code bits 0-2; bit 3 is the sign.
_E2M1_MAG = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
#: float32 value of every e2m1 code (index = 4-bit code). Code 8 is -0.0.
E2M1_LUT: np.ndarray = np.concatenate([_E2M1_MAG, -_E2M1_MAG]).astype(np.float32)
E2M1_LUT.setflags(write=False)


def e4m3_to_float(b) -> np.ndarray:
    """Decode e4m3fn bytes (uint8, or int8 reinterpreted) to float32, exactly."""
    b = np.asarray(b)
    if b.dtype == np.int8:
        b = b.view(np.uint8)
    if b.dtype != np.uint8:
        raise TypeError(f"e4m3_to_float expects uint8 bytes, got {b.dtype}")
    return E4M3_LUT[b]


def _round_to_grid(a: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Index of the nearest ``grid`` value for non-negative ``a`` (float64), ties to even index.

    ``grid`` is ascending and its index parity equals the mantissa LSB of the encoded value,
    so "even index" is IEEE round-to-nearest-even. Values above ``grid[-1]`` saturate.
    """
    g = grid.astype(np.float64)
    hi = np.clip(np.searchsorted(g, a, side="left"), 1, len(g) - 1)
    lo = hi - 1
    mid = (g[lo] + g[hi]) * 0.5  # exact: grid values have few significant bits
    idx = np.where(a > mid, hi, lo)
    idx = np.where((a == mid) & (lo % 2 == 1), hi, idx)
    idx = np.where(a >= g[-1], len(g) - 1, idx)  # saturation
    return idx


def float_to_e4m3(x) -> np.ndarray:
    """Encode floats to e4m3fn bytes: round to nearest even, saturate to +-448, NaN -> 0x7F/0xFF.

    Infinities saturate to +-448. The sign of zero (and of values rounding to zero) is kept.
    """
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    nan = np.isnan(x)
    a = np.where(nan, 0.0, a)
    idx = _round_to_grid(a, E4M3_LUT[:0x7F])  # codes 0x00..0x7E: 0 .. 448 ascending
    sign = np.signbit(x).astype(np.uint8) << 7
    out = idx.astype(np.uint8) | sign
    out = np.where(nan, np.uint8(0x7F) | sign, out)
    return out.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# FP4 e2m1 (OCP) packed two per byte: low nibble = column 2p, high nibble = column 2p+1.


def e2m1_to_float(codes) -> np.ndarray:
    """Decode 4-bit e2m1 codes (values 0..15 in a uint8 array) to float32."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"e2m1 codes must be uint8, got {codes.dtype}")
    if codes.size and codes.max() > 15:
        raise ValueError("e2m1 codes must be in 0..15")
    return E2M1_LUT[codes]


def float_to_e2m1(x) -> np.ndarray:
    """Encode floats to e2m1 codes (uint8 0..15): RNE, saturate to +-6, sign kept (§4.13).

    Thresholds on |x|: 0.25 -> 0 (tie to 0), 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
    3.5 -> 4, 5 -> 4; above 6 -> 6. NaN is rejected (e2m1 has no NaN).
    """
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("e2m1 cannot encode NaN")
    idx = _round_to_grid(np.abs(x), _E2M1_MAG)
    sign = np.signbit(x).astype(np.uint8) << 3
    return (idx.astype(np.uint8) | sign).astype(np.uint8)


def fp4_unpack(packed) -> np.ndarray:
    """[..., in/2] int8/uint8 bytes -> [..., in] uint8 codes (low nibble = even column)."""
    packed = np.asarray(packed)
    if packed.dtype == np.int8:
        packed = packed.view(np.uint8)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed FP4 must be int8 or uint8, got {packed.dtype}")
    codes = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes


def fp4_pack(codes) -> np.ndarray:
    """[..., in] uint8 codes (0..15) -> [..., in/2] int8 bytes as stored in the checkpoint."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"e2m1 codes must be uint8, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dimension, got {codes.shape}")
    if codes.size and codes.max() > 15:
        raise ValueError("e2m1 codes must be in 0..15")
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed.view(np.int8)


# --------------------------------------------------------------------------------------------
# exact dequantization (§3.3)


def dequant_fp8(w_u8, scale, block: int = 128) -> np.ndarray:
    """``W[i, j] = e4m3(Wq[i, j]) * 2^(S[i // 128, j // 128] - 127)`` as float32.

    ``w_u8``: [..., out, in] uint8 (or int8) e4m3 bytes; ``scale``: [..., ceil(out/128),
    ceil(in/128)] UE8M0 bytes (uint8) or float exact powers of two.
    """
    w = e4m3_to_float(w_u8)
    s = scales_to_float(scale)
    out, inp = w.shape[-2:]
    want = (-(-out // block), -(-inp // block))
    if s.shape[-2:] != want or s.shape[:-2] != w.shape[:-2]:
        raise ValueError(
            f"FP8 scale shape {s.shape} does not match weight {w.shape} with {block}x{block} blocks"
        )
    s_full = np.repeat(np.repeat(s, block, axis=-2), block, axis=-1)[..., :out, :inp]
    with np.errstate(over="ignore", invalid="ignore"):  # only for scales that never occur
        return (w * s_full).astype(np.float32)


def dequant_fp4(w_packed, scale) -> np.ndarray:
    """``W[i, 2p+t] = e2m1(nibble_t(Wq[i, p])) * 2^(S[i, (2p+t) // 32] - 127)`` as float32.

    ``w_packed``: [..., out, in/2] int8/uint8; ``scale``: [..., out, in/32] UE8M0 bytes or
    float exact powers of two.
    """
    w = E2M1_LUT[fp4_unpack(w_packed)]
    s = scales_to_float(scale)
    inp = w.shape[-1]
    if inp % 32 or s.shape != (*w.shape[:-1], inp // 32):
        raise ValueError(f"FP4 scale shape {s.shape} does not match logical weight {w.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # only for scales that never occur
        return (w * np.repeat(s, 32, axis=-1)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# quantization for fixtures (exact published formats)


def _pow2_exponent(amax: np.ndarray, threshold: float) -> np.ndarray:
    """Smallest integer e with ``amax <= threshold * 2^e``, clamped to the UE8M0 range.

    Blocks with ``amax == 0`` get e = 0 (scale byte 127).
    """
    amax = np.asarray(amax, np.float64)
    pos = amax > 0
    safe = np.where(pos, amax, threshold)
    e = np.ceil(np.log2(safe / threshold)).astype(np.int64)
    # fix any floating-point slip of log2 so that threshold*2^(e-1) < amax <= threshold*2^e
    e = np.where(safe > threshold * np.ldexp(1.0, e), e + 1, e)
    e = np.where(safe <= threshold * np.ldexp(1.0, e - 1), e - 1, e)
    e = np.where(pos, e, 0)
    return np.clip(e, -127, 127)


# Scale choice: e = ceil(log2(amax / T)) with T = MAX + half of the top grid step (464 for
# e4m3, 7 for e2m1). amax/2^e then lies in (T/2, T]: values above MAX saturate by at most half
# a grid step (no worse than ordinary rounding), and the largest rounded value is never the
# bottom of the range (224 resp. 3), which makes quantize(dequant(q)) == q exactly. The plain
# 2^ceil(log2(amax/MAX)) rule is not idempotent: e.g. amax/2^e = 3.2 rounds to 3 in e2m1,
# and re-quantizing 3*2^e picks the exponent e-1.
_E4M3_T = 464.0
_E2M1_T = 7.0


def quantize_fp8_block(w, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (e4m3 bytes uint8 [out, in], UE8M0 scales uint8 [ceil(out/b), ceil(in/b)]).

    One power-of-two scale per ``block x block`` tile (edge tiles may be partial).
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"quantize_fp8_block expects a 2-D weight, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("cannot quantize non-finite weights")
    out, inp = w.shape
    bo, bi = -(-out // block), -(-inp // block)
    padded = np.zeros((bo * block, bi * block))
    padded[:out, :inp] = np.abs(w)
    amax = padded.reshape(bo, block, bi, block).max(axis=(1, 3))
    e = _pow2_exponent(amax, _E4M3_T)
    e_full = np.repeat(np.repeat(e, block, axis=0), block, axis=1)[:out, :inp]
    q = float_to_e4m3(np.ldexp(w, -e_full))
    return q, (e + 127).astype(np.uint8)


def quantize_fp4(w) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (packed int8 [out, in/2], UE8M0 scales uint8 [out, in/32])."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] % 32:
        raise ValueError(f"quantize_fp4 expects [out, in] with in % 32 == 0, got {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("cannot quantize non-finite weights")
    out, inp = w.shape
    amax = np.abs(w).reshape(out, inp // 32, 32).max(axis=2)
    e = _pow2_exponent(amax, _E2M1_T)
    codes = float_to_e2m1(np.ldexp(w, -np.repeat(e, 32, axis=1)))
    return fp4_pack(codes), (e + 127).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# MLX repack (§3.3 "MLX loading hint")
#
# MLX mxfp4: weight uint32 [..., out, in/8]; element j of a row lives in byte j//2, low nibble
# for even j (little-endian uint32 words), i.e. exactly the checkpoint's byte stream. Scales:
# uint8 UE8M0 [..., out, in/32]. MLX mxfp8: weight uint32 [..., out, in/4], element j = byte j
# (e4m3fn); scales uint8 UE8M0 [..., out, in/32]. (Layouts checked empirically with
# mx.quantize(..., mode="mxfp4"/"mxfp8") on mlx 0.32.4 and in tests/test_formats.py.)


def fp4_repack(w_packed, scale):
    """Checkpoint FP4 (packed [..., out, in/2] + [..., out, in/32] scales) -> the numpy arrays of
    MLX's mxfp4 layout: ``(weight uint32 [..., out, in/8], scales uint8 [..., out, in/32])``,
    the same bytes read as little-endian words (no re-quantization)."""
    w = np.asarray(w_packed)
    if w.dtype == np.int8:
        w = w.view(np.uint8)
    if w.dtype != np.uint8:
        raise TypeError(f"packed FP4 must be int8 or uint8, got {w.dtype}")
    s = scales_to_e8m0(scale)
    if w.shape[-1] % 16 or s.shape != (*w.shape[:-1], w.shape[-1] // 16):
        raise ValueError(f"FP4 weight {w.shape} / scale {s.shape} do not match (in % 32 == 0)")
    return np.ascontiguousarray(w).view("<u4"), np.ascontiguousarray(s)


def fp4_to_mxfp4(w_packed, scale):
    """:func:`fp4_repack` as MLX arrays: ``mx.dequantize(weight, scales, group_size=32, bits=4,
    mode="mxfp4")`` equals :func:`dequant_fp4` bit for bit."""
    import mlx.core as mx

    w32, s = fp4_repack(w_packed, scale)
    return mx.array(w32, dtype=mx.uint32), mx.array(s, dtype=mx.uint8)


def fp8_repack(w_u8, scale, block: int = 128):
    """Checkpoint FP8 (e4m3 [..., out, in] + block x block scales) -> the numpy arrays of MLX's
    mxfp8 layout: ``(weight uint32 [..., out, in/4], scales uint8 [..., out, in/32])``. Each block
    scale is repeated to every row and every 32-column group it covers
    (``S'[i, g] = S[i // 128, g // 4]``, lossless)."""
    w = np.asarray(w_u8)
    if w.dtype == np.int8:
        w = w.view(np.uint8)
    if w.dtype != np.uint8:
        raise TypeError(f"FP8 weight must be uint8 bytes, got {w.dtype}")
    if block % 32:
        raise ValueError(f"block size {block} must be a multiple of 32 for mxfp8")
    out, inp = w.shape[-2:]
    if inp % 32:
        raise ValueError(f"mxfp8 needs the input width to be a multiple of 32, got {inp}")
    s = scales_to_e8m0(scale)
    want = (-(-out // block), -(-inp // block))
    if s.shape[-2:] != want or s.shape[:-2] != w.shape[:-2]:
        raise ValueError(f"FP8 scale shape {s.shape} does not match weight {w.shape}")
    s_rows = np.repeat(s, block, axis=-2)[..., :out, :]
    s_full = np.repeat(s_rows, block // 32, axis=-1)[..., : inp // 32]
    return np.ascontiguousarray(w).view("<u4"), np.ascontiguousarray(s_full)


def fp8_to_mxfp8(w_u8, scale, block: int = 128):
    """:func:`fp8_repack` as MLX arrays: ``mx.dequantize(weight, scales, group_size=32, bits=8,
    mode="mxfp8")`` equals :func:`dequant_fp8` bit for bit."""
    import mlx.core as mx

    w32, s = fp8_repack(w_u8, scale, block)
    return mx.array(w32, dtype=mx.uint32), mx.array(s, dtype=mx.uint8)
