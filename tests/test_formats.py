"""Exact codecs of spec §3.3 (UE8M0, FP8 e4m3fn, FP4 e2m1) and the MLX mxfp4/mxfp8 repack."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dsv4_mlx.convert.formats import (
    E2M1_LUT,
    E4M3_LUT,
    dequant_fp4,
    dequant_fp8,
    e2m1_to_float,
    e4m3_to_float,
    e8m0_to_float,
    float_to_e2m1,
    float_to_e4m3,
    float_to_e8m0,
    fp4_pack,
    fp4_to_mxfp4,
    fp4_unpack,
    fp8_to_mxfp8,
    quantize_fp4,
    quantize_fp8_block,
)

mx = pytest.importorskip("mlx.core")


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


# ---------------------------------------------------------------------------------------------
# UE8M0


def test_e8m0_hand_values():
    b = np.array([127, 128, 120, 0, 254, 126], np.uint8)
    got = e8m0_to_float(b)
    assert got.dtype == np.float32
    assert got.tolist() == [1.0, 2.0, 2.0**-7, 2.0**-127, 2.0**127, 0.5]
    assert got[3] == np.float32(2.0**-127) and got[3] > 0  # float32 subnormal, exact
    assert np.isnan(e8m0_to_float(np.array([255], np.uint8)))[0]


def test_e8m0_encode():
    x = np.array([1.0, 2.0, 2.0**-7, 2.0**-127, 2.0**127, 0.25], np.float32)
    assert float_to_e8m0(x).tolist() == [127, 128, 120, 0, 254, 125]
    all_bytes = np.arange(255, dtype=np.uint8)
    assert np.array_equal(float_to_e8m0(e8m0_to_float(all_bytes)), all_bytes)
    for bad in (3.0, 0.0, -2.0, np.inf, np.nan, 1.5, 2.0**128):
        with pytest.raises(ValueError):
            float_to_e8m0(np.array([bad], np.float64))


# ---------------------------------------------------------------------------------------------
# FP8 e4m3fn


@pytest.mark.parametrize(
    "byte, value",
    [
        (0x00, 0.0),
        (0x01, 2.0**-9),  # exponent field 0 -> subnormal: 1/8 * 2^-6
        (0x07, 7 / 8 * 2.0**-6),  # largest subnormal
        (0x08, 2.0**-6),  # smallest normal: exponent field 1, bias 7
        (0x38, 1.0),  # 0 0111 000
        (0x3C, 1.5),  # 0 0111 100
        (0x40, 2.0),  # 0 1000 000
        (0x77, 240.0),  # 0 1110 111 = 1.875 * 2^7
        (0x7E, 448.0),  # 0 1111 110 = 1.75 * 2^8, the maximum
        (0xC0, -2.0),  # 1 1000 000
        (0xFE, -448.0),
        (0x81, -(2.0**-9)),
    ],
)
def test_e4m3_hand_values(byte, value):
    got = e4m3_to_float(np.array([byte], np.uint8))[0]
    assert got == np.float32(value)


def test_e4m3_special():
    assert E4M3_LUT.shape == (256,) and E4M3_LUT.dtype == np.float32
    z = e4m3_to_float(np.array([0x80], np.uint8))[0]
    assert z == 0.0 and math.copysign(1.0, z) == -1.0  # 0x80 is -0.0
    assert np.isnan(E4M3_LUT[0x7F]) and np.isnan(E4M3_LUT[0xFF])
    assert np.isnan(E4M3_LUT).sum() == 2
    assert np.nanmax(np.abs(E4M3_LUT)) == 448.0
    # int8 containers are reinterpreted
    assert e4m3_to_float(np.array([-64], np.int8))[0] == -2.0  # -64 == 0xC0


def test_e4m3_encode_roundtrip_all_bytes():
    b = np.array([x for x in range(256) if x not in (0x7F, 0xFF)], np.uint8)
    assert np.array_equal(float_to_e4m3(E4M3_LUT[b]), b)
    assert float_to_e4m3(np.array([np.nan]))[0] == 0x7F
    assert float_to_e4m3(np.array([-0.0]))[0] == 0x80


@pytest.mark.parametrize(
    "x, byte",
    [
        (1.0625, 0x38),  # tie 1.0 (m=0) / 1.125 (m=1) -> even mantissa: 1.0
        (1.1875, 0x3A),  # tie 1.125 (m=1) / 1.25 (m=2) -> 1.25
        (1.0625 + 1e-6, 0x39),  # just above the tie -> up
        (1.0625 - 1e-6, 0x38),
        (2.0**-10, 0x00),  # tie 0 / 2^-9 -> 0
        (3 * 2.0**-10, 0x02),  # tie 2^-9 (0x01) / 2^-8 (0x02) -> even code 0x02
        (1.9375 * 2.0**-6, 0x10),  # tie 0x0F (1.875*2^-6) / 0x10 (2^-5): carry into exponent
        (232.0, 0x76),  # tie 224 (0x76, m=6) / 240 (0x77, m=7) -> 224
        (456.0, 0x7E),  # above max -> saturate
        (464.0, 0x7E),
        (1e9, 0x7E),
        (np.inf, 0x7E),
        (-np.inf, 0xFE),
        (-1.0625, 0xB8),
        (-1e-9, 0x80),  # rounds to zero, sign kept
    ],
)
def test_e4m3_rne_and_saturation(x, byte):
    assert float_to_e4m3(np.array([x], np.float64))[0] == byte


# ---------------------------------------------------------------------------------------------
# FP4 e2m1


def test_e2m1_lut():
    assert E2M1_LUT.tolist()[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert E2M1_LUT.tolist()[9:] == [-0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert E2M1_LUT[8] == 0.0 and math.copysign(1.0, E2M1_LUT[8]) == -1.0


def test_fp4_nibble_order_hand_bytes():
    # byte 0x21: low nibble 0x1 -> column 0 = +0.5 (sign 0, index 1);
    #            high nibble 0x2 -> column 1 = +1.0 (sign 0, index 2).
    # byte 0x9F: low nibble 0xF = 1111b -> sign 1, index 7 -> column 0 = -6.0;
    #            high nibble 0x9 = 1001b -> sign 1, index 1 -> column 1 = -0.5.
    # byte 0x70: low nibble 0 -> 0.0, high nibble 7 -> 6.0.
    packed = np.array([[0x21, 0x9F, 0x70]], np.uint8).view(np.int8)
    codes = fp4_unpack(packed)
    assert codes.tolist() == [[0x1, 0x2, 0xF, 0x9, 0x0, 0x7]]
    assert e2m1_to_float(codes).tolist() == [[0.5, 1.0, -6.0, -0.5, 0.0, 6.0]]
    assert fp4_pack(codes).view(np.uint8).tolist() == [[0x21, 0x9F, 0x70]]
    assert fp4_pack(codes).dtype == np.int8


def test_fp4_pack_unpack_all_bytes():
    b = np.arange(256, dtype=np.uint8).reshape(4, 64)
    assert np.array_equal(fp4_pack(fp4_unpack(b)).view(np.uint8), b)


@pytest.mark.parametrize(
    "x, value",
    [
        # spec §4.13 RNE thresholds on |x|
        (0.25, 0.0),  # tie -> 0
        (0.2500001, 0.5),
        (0.75, 1.0),  # tie 0.5/1.0 -> 1.0 (even code)
        (1.25, 1.0),
        (1.75, 2.0),
        (2.5, 2.0),
        (3.5, 4.0),
        (5.0, 4.0),
        (5.0001, 6.0),
        (6.5, 6.0),  # saturation
        (100.0, 6.0),
        (-0.75, -1.0),
        (-5.0, -4.0),
        (2.4, 2.0),
        (2.6, 3.0),
    ],
)
def test_e2m1_rne(x, value):
    code = float_to_e2m1(np.array([x]))
    assert E2M1_LUT[code][0] == value


def test_e2m1_roundtrip_all_codes():
    codes = np.arange(16, dtype=np.uint8)
    assert np.array_equal(float_to_e2m1(E2M1_LUT[codes]), codes)


# ---------------------------------------------------------------------------------------------
# dequantization, hand-computed


def test_dequant_fp8_hand():
    w = np.zeros((256, 256), np.uint8)
    w[0, 0] = 0x38  # 1.0 in block (0, 0), scale 127 -> 1.0
    w[5, 200] = 0xC0  # -2.0 in block (0, 1), scale 128 -> 2.0   => -4.0
    w[130, 3] = 0x7E  # 448 in block (1, 0), scale 120 -> 2^-7 => 3.5
    w[255, 255] = 0x01  # 2^-9 in block (1, 1), scale 140 -> 2^13 => 16
    s = np.array([[127, 128], [120, 140]], np.uint8)
    d = dequant_fp8(w, s)
    assert d.dtype == np.float32 and d.shape == (256, 256)
    assert d[0, 0] == 1.0 and d[5, 200] == -4.0 and d[130, 3] == 3.5 and d[255, 255] == 16.0
    assert np.count_nonzero(d) == 4
    # non-multiple-of-128 shapes use ceil-sized scale grids
    d2 = dequant_fp8(w[:130, :200], s)
    assert d2.shape == (130, 200) and d2[5, 199] == 0 and d2[0, 0] == 1.0
    with pytest.raises(ValueError):
        dequant_fp8(w, s[:1])


def test_dequant_fp4_hand():
    packed = np.zeros((2, 32), np.uint8)  # logical [2, 64]
    packed[0, 0] = 0x21  # columns 0, 1 = 0.5, 1.0
    packed[0, 16] = 0x9F  # columns 32, 33 = -6.0, -0.5
    packed[1, 31] = 0x70  # columns 62, 63 = 0.0, 6.0
    s = np.array([[128, 125], [127, 131]], np.uint8)  # x2, x1/4 ; x1, x16
    d = dequant_fp4(packed.view(np.int8), s)
    assert d.shape == (2, 64) and d.dtype == np.float32
    assert d[0, :2].tolist() == [1.0, 2.0]
    assert d[0, 32:34].tolist() == [-1.5, -0.125]
    assert d[1, 62:].tolist() == [0.0, 96.0]
    assert np.count_nonzero(d) == 5


def test_float32_pow2_scales_accepted():
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (8, 32), dtype=np.uint8).view(np.int8)
    s = rng.integers(110, 140, (8, 2), dtype=np.uint8)
    assert np.array_equal(dequant_fp4(packed, s), dequant_fp4(packed, e8m0_to_float(s)))
    w8 = rng.integers(0, 0x7F, (256, 128), dtype=np.uint8)
    s8 = rng.integers(110, 140, (2, 1), dtype=np.uint8)
    assert np.array_equal(dequant_fp8(w8, s8), dequant_fp8(w8, e8m0_to_float(s8)))


def test_non_pow2_float_scale_rejected():
    packed = np.zeros((1, 16), np.int8)
    with pytest.raises(ValueError):
        dequant_fp4(packed, np.array([[3.0]], np.float32))
    with pytest.raises(ValueError):
        dequant_fp8(np.zeros((128, 128), np.uint8), np.array([[0.3]], np.float32))
    with pytest.raises(ValueError):
        fp4_to_mxfp4(packed, np.array([[1.5]], np.float32))
    with pytest.raises(TypeError):
        dequant_fp4(packed, np.array([[127]], np.int32))


# ---------------------------------------------------------------------------------------------
# quantization for fixtures


@pytest.mark.parametrize("seed", range(4))
def test_quantize_fp8_roundtrip(seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((300, 260)) * 10.0 ** rng.uniform(-4, 3, (300, 1))).astype(
        np.float32
    )
    q, s = quantize_fp8_block(w)
    assert q.dtype == np.uint8 and q.shape == w.shape
    assert s.dtype == np.uint8 and s.shape == (3, 3)
    d = dequant_fp8(q, s)
    # error relative to each 128x128 block's amax: at most half a top-grid step of 464
    blk = np.zeros((384, 384))
    blk[:300, :260] = np.abs(w)
    amax = blk.reshape(3, 128, 3, 128).max(axis=(1, 3))
    amax_full = np.repeat(np.repeat(amax, 128, 0), 128, 1)[:300, :260]
    assert (np.abs(d - w) <= amax_full * (16 / 232)).all()
    q2, s2 = quantize_fp8_block(d)
    assert np.array_equal(q, q2) and np.array_equal(s, s2)


@pytest.mark.parametrize("seed", range(4))
def test_quantize_fp4_roundtrip(seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((64, 128)) * 10.0 ** rng.uniform(-4, 3, (64, 1))).astype(np.float32)
    p, s = quantize_fp4(w)
    assert p.dtype == np.int8 and p.shape == (64, 64)
    assert s.dtype == np.uint8 and s.shape == (64, 4)
    d = dequant_fp4(p, s)
    amax = np.repeat(np.abs(w).reshape(64, 4, 32).max(axis=2), 32, axis=1)
    assert (np.abs(d - w) <= amax * 0.2 + 1e-30).all()
    p2, s2 = quantize_fp4(d)
    assert np.array_equal(p, p2) and np.array_equal(s, s2)


def test_quantize_edge_blocks():
    # a block whose max would round to the bottom of the range with 2^ceil(log2(amax/6))
    w = np.zeros((1, 32), np.float32)
    w[0, 0] = 3.2
    p, s = quantize_fp4(w)
    assert np.array_equal(quantize_fp4(dequant_fp4(p, s))[0], p)
    # zero block -> scale byte 127, all-zero codes
    p, s = quantize_fp4(np.zeros((2, 32), np.float32))
    assert s.tolist() == [[127], [127]] and not p.any()
    q, s = quantize_fp8_block(np.zeros((4, 4), np.float32))
    assert s.tolist() == [[127]] and not q.any()


# ---------------------------------------------------------------------------------------------
# MLX mxfp4 / mxfp8: bit-exact against the numpy reference


def _mx_deq(w, s, bits, mode):
    out = mx.dequantize(w, s, group_size=32, bits=bits, mode=mode, dtype=mx.float32)
    return np.array(out)


def test_mxfp4_layout_matches_mx_quantize():
    # mx.quantize packs element 2p in the low nibble of byte p (little-endian uint32 words)
    w = np.array([[0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5] + [0.0] * 24], np.float32)
    q, s = mx.quantize(mx.array(w), group_size=32, bits=4, mode="mxfp4")
    assert np.array(s).tolist() == [[127]]
    assert np.array(q).view(np.uint8)[0, :4].tolist() == [0x21, 0x43, 0x65, 0x97]
    assert fp4_pack(float_to_e2m1(w)).view(np.uint8)[0, :4].tolist() == [0x21, 0x43, 0x65, 0x97]


def test_one_expert_mxfp4_bit_exact():
    rng = np.random.default_rng(1)
    D, I = 256, 128  # one expert: w1/w3 [I, D], w2 [D, I]
    for out, inp in ((I, D), (D, I), (I, D)):
        w = (rng.standard_normal((out, inp)) * 0.02).astype(np.float32)
        packed, scale = quantize_fp4(w)
        ref = dequant_fp4(packed, scale)
        wq, sq = fp4_to_mxfp4(packed, scale)
        assert wq.dtype == mx.uint32 and wq.shape == (out, inp // 8)
        assert sq.dtype == mx.uint8 and sq.shape == (out, inp // 32)
        got = _mx_deq(wq, sq, 4, "mxfp4")
        assert np.array_equal(got, ref)
        assert np.array_equal(_bits(got), _bits(ref))
        # float32 power-of-two scales give the same MLX arrays
        wq2, sq2 = fp4_to_mxfp4(packed, e8m0_to_float(scale))
        assert np.array_equal(np.array(sq2), np.array(sq))


def test_mxfp4_all_bytes_full_scale_range():
    rng = np.random.default_rng(2)
    packed = np.tile(np.arange(256, dtype=np.uint8), (64, 1))  # [64, 256] -> logical [64, 512]
    scale = rng.integers(0, 255, (64, 16), dtype=np.uint8)
    scale[0, :] = [0, 1, 2, 10, 100, 126, 127, 128, 200, 240, 250, 251, 252, 253, 254, 254]
    ref = dequant_fp4(packed, scale)
    got = _mx_deq(*fp4_to_mxfp4(packed, scale), 4, "mxfp4")
    assert np.array_equal(_bits(got), _bits(ref))


def test_one_expert_mxfp8_bit_exact():
    # the CPU build of mlx 0.32.4 dequantizes mxfp8
    rng = np.random.default_rng(3)
    for out, inp in ((256, 384), (384, 256)):
        w = (rng.standard_normal((out, inp)) * 0.02).astype(np.float32)
        q, scale = quantize_fp8_block(w)
        ref = dequant_fp8(q, scale)
        wq, sq = fp8_to_mxfp8(q, scale)
        assert wq.dtype == mx.uint32 and wq.shape == (out, inp // 4)
        assert sq.dtype == mx.uint8 and sq.shape == (out, inp // 32)
        assert np.array(sq)[200, 5] == scale[1, 1]  # S'[i, g] = S[i // 128, g // 4]
        got = _mx_deq(wq, sq, 8, "mxfp8")
        assert np.array_equal(got, ref)
        assert np.array_equal(_bits(got), _bits(ref))


def test_mxfp8_all_bytes_full_scale_range():
    w8 = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # every e4m3 byte, incl. NaN
    for s in ([[0, 1], [127, 254]], [[3, 120], [135, 250]]):
        scale = np.array(s, np.uint8)
        ref = dequant_fp8(w8, scale)
        got = _mx_deq(*fp8_to_mxfp8(w8, scale), 8, "mxfp8")
        assert np.array_equal(got, ref, equal_nan=True)
        finite = ~np.isnan(ref)
        assert np.array_equal(_bits(got)[finite], _bits(ref)[finite])


def test_mxfp8_partial_row_block():
    # out not a multiple of 128: the last block's scale row is truncated
    rng = np.random.default_rng(4)
    w = rng.standard_normal((160, 64)).astype(np.float32)
    q, scale = quantize_fp8_block(w)
    assert scale.shape == (2, 1)
    wq, sq = fp8_to_mxfp8(q, scale)
    assert sq.shape == (160, 2)
    assert np.array_equal(_mx_deq(wq, sq, 8, "mxfp8"), dequant_fp8(q, scale))
