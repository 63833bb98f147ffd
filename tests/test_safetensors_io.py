"""safetensors reader/writer: raw F8/BF16 access, interop with the official package, errors."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from dsv4_mlx.convert.formats import E4M3_LUT, e8m0_to_float
from dsv4_mlx.convert.safetensors_io import (
    SafeTensorsFile,
    bf16_to_float32,
    float32_to_bf16,
    write_safetensors,
)


def _sample(rng) -> dict:
    return {
        "embed.weight": ("BF16", float32_to_bf16(rng.standard_normal((5, 8)).astype(np.float32))),
        "hc_head_fn": ("F32", rng.standard_normal((4, 8)).astype(np.float32)),
        "layers.0.ffn.gate.tid2eid": ("I64", rng.integers(0, 16, (7, 2)).astype(np.int64)),
        "layers.0.attn.wq_a.weight": ("F8_E4M3", rng.integers(0, 0x7F, (3, 16), dtype=np.uint8)),
        "layers.0.attn.wq_a.scale": ("F8_E8M0", rng.integers(110, 140, (1, 1), dtype=np.uint8)),
        "layers.0.ffn.experts.0.w1.weight": ("I8", rng.integers(-128, 128, (4, 16), dtype=np.int8)),
        "x.i32": ("I32", np.arange(6, dtype=np.int32).reshape(2, 3)),
        "x.u8": ("U8", np.arange(9, dtype=np.uint8)),
    }


def test_roundtrip_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = _sample(rng)
    path = tmp_path / "a.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt", "note": "fixture"})
    f = SafeTensorsFile(path)
    assert sorted(f.keys()) == sorted(tensors)
    assert f.metadata == {"format": "pt", "note": "fixture"}
    want_np = {"BF16": np.uint16, "F32": np.float32, "I64": np.int64, "F8_E4M3": np.uint8,
               "F8_E8M0": np.uint8, "I8": np.int8, "I32": np.int32, "U8": np.uint8}
    for name, (dtype, arr) in tensors.items():
        assert f.info(name) == (dtype, arr.shape)
        got = f.get(name)
        assert got.dtype == want_np[dtype]
        assert np.array_equal(got, arr)
    # lazily memory-mapped, read-only
    got = f.get("hc_head_fn")
    assert isinstance(got, np.memmap) and not got.flags.writeable
    # header length is a multiple of 8 and every tensor is aligned to its element size
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    for name, ent in header.items():
        if name != "__metadata__":
            assert ent["data_offsets"][0] % np.dtype(want_np[ent["dtype"]]).itemsize == 0


def test_scalar_and_empty(tmp_path):
    path = tmp_path / "s.safetensors"
    write_safetensors(
        path,
        {"s": ("F32", np.array(2.5, np.float32)), "e": ("BF16", np.zeros((0, 3), np.uint16))},
    )
    f = SafeTensorsFile(path)
    assert f.get("s").shape == () and float(f.get("s")) == 2.5
    assert f.get("e").shape == (0, 3) and f.metadata is None


def test_official_numpy_reads_our_file(tmp_path):
    from safetensors.numpy import load_file

    path = tmp_path / "np.safetensors"
    f32 = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    i64 = np.arange(10, dtype=np.int64).reshape(5, 2)
    write_safetensors(path, {"a": ("F32", f32), "b": ("I64", i64)}, metadata={"k": "v"})
    out = load_file(path)
    assert np.array_equal(out["a"], f32) and np.array_equal(out["b"], i64)

    # with BF16 in the file the official numpy API fails (numpy has no bfloat16) ...
    bf = float32_to_bf16(f32)
    path2 = tmp_path / "bf.safetensors"
    write_safetensors(path2, {"a": ("F32", f32), "b": ("I64", i64), "c": ("BF16", bf)})
    with pytest.raises(TypeError):
        load_file(path2)
    # ... but the file itself is valid: the torch API reads all three
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load

    t = torch_load(path2)
    assert t["c"].dtype == torch.bfloat16
    assert np.array_equal(t["c"].float().numpy(), bf16_to_float32(bf))
    assert np.array_equal(t["a"].numpy(), f32) and np.array_equal(t["b"].numpy(), i64)


def test_official_torch_reads_f8(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    if not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip("torch lacks float8_e8m0fnu")
    w = np.array([[v for v in range(256) if v not in (0x7F, 0xFF)]], np.uint8)
    s = np.array([0, 1, 100, 127, 128, 254], np.uint8)
    path = tmp_path / "f8.safetensors"
    write_safetensors(path, {"w": ("F8_E4M3", w), "w.scale": ("F8_E8M0", s)})
    t = load_file(path)
    assert t["w"].dtype == torch.float8_e4m3fn and t["w.scale"].dtype == torch.float8_e8m0fnu
    assert np.array_equal(t["w"].float().numpy(), E4M3_LUT[w])
    assert np.array_equal(t["w.scale"].float().numpy(), e8m0_to_float(s))


def test_read_official_torch_file(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    if not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip("torch lacks float8_e8m0fnu")
    x = torch.tensor([[1.0, -2.0, 0.5, 448.0], [0.0, -0.0, 3.0, 2.0**-9]])
    tensors = {
        "w": x.to(torch.float8_e4m3fn),
        "scale": torch.tensor([1.0, 2.0, 2.0**-7]).to(torch.float8_e8m0fnu),
        "bf": x.to(torch.bfloat16),
        "idx": torch.arange(4, dtype=torch.int64),
        "packed": torch.tensor([0x21, -0x61], dtype=torch.int8),  # 0x21, 0x9F
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    f = SafeTensorsFile(path)
    assert f.metadata == {"format": "pt"}
    assert f.info("w") == ("F8_E4M3", (2, 4))
    assert f.get("w").dtype == np.uint8
    assert np.array_equal(E4M3_LUT[f.get("w")], x.numpy())
    assert f.get("scale").tolist() == [127, 128, 120]
    assert np.array_equal(bf16_to_float32(f.get("bf")), x.numpy())
    assert f.get("idx").tolist() == [0, 1, 2, 3]
    assert f.get("packed").dtype == np.int8
    assert f.get("packed").view(np.uint8).tolist() == [0x21, 0x9F]

    # the official numpy API cannot read F8 (nor BF16) tensors: numpy has no such dtypes
    from safetensors.numpy import load_file

    with pytest.raises((AttributeError, TypeError)):
        load_file(path)
    f8_only = tmp_path / "f8only.safetensors"
    save_file({"w": tensors["w"], "scale": tensors["scale"]}, str(f8_only))
    with pytest.raises(AttributeError, match="float8"):
        load_file(f8_only)


# ---------------------------------------------------------------------------------------------
# errors


def _good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    write_safetensors(path, {"a": ("F32", np.arange(16, dtype=np.float32))})
    return path


def test_truncated_data(tmp_path):
    path = _good_file(tmp_path)
    raw = path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(raw[:-4])
    with pytest.raises(ValueError, match=r"trunc\.safetensors.*past the end"):
        SafeTensorsFile(bad)


def test_truncated_header(tmp_path):
    raw = _good_file(tmp_path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    bad = tmp_path / "hdr.safetensors"
    bad.write_bytes(raw[: 8 + n // 2])
    with pytest.raises(ValueError, match=r"hdr\.safetensors.*truncated"):
        SafeTensorsFile(bad)
    bad.write_bytes(raw[:5])
    with pytest.raises(ValueError, match=r"hdr\.safetensors.*truncated"):
        SafeTensorsFile(bad)
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        SafeTensorsFile(bad)


def _with_header(tmp_path, header, data: bytes = b"\0" * 64):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_bad_headers(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"{not js}")
    with pytest.raises(ValueError, match=r"junk\.safetensors.*bad safetensors header"):
        SafeTensorsFile(path)
    with pytest.raises(ValueError, match="unknown dtype 'F4'"):
        SafeTensorsFile(_with_header(tmp_path, {"a": {"dtype": "F4", "shape": [2],
                                                      "data_offsets": [0, 1]}}))
    with pytest.raises(ValueError, match="needs 8"):
        SafeTensorsFile(_with_header(tmp_path, {"a": {"dtype": "F32", "shape": [2],
                                                      "data_offsets": [0, 4]}}))
    with pytest.raises(ValueError, match="past the end"):
        SafeTensorsFile(_with_header(tmp_path, {"a": {"dtype": "F32", "shape": [32],
                                                      "data_offsets": [0, 128]}}))
    with pytest.raises(ValueError, match="overlap"):
        SafeTensorsFile(_with_header(tmp_path, {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        }))
    with pytest.raises(ValueError, match="bad shape"):
        SafeTensorsFile(_with_header(tmp_path, {"a": {"dtype": "F32", "shape": [-1],
                                                      "data_offsets": [0, 4]}}))
    with pytest.raises(ValueError, match="not a JSON object"):
        SafeTensorsFile(_with_header(tmp_path, [1, 2]))
    ok = SafeTensorsFile(_with_header(tmp_path, {"a": {"dtype": "F8_E8M0", "shape": [2, 2],
                                                       "data_offsets": [0, 4]}}))
    assert ok.get("a").tolist() == [[0, 0], [0, 0]]
    with pytest.raises(KeyError):
        ok.get("missing")


def test_writer_rejects_wrong_containers(tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(TypeError):
        write_safetensors(path, {"a": ("F8_E4M3", np.zeros(3, np.float32))})
    with pytest.raises(TypeError):
        write_safetensors(path, {"a": ("F32", np.zeros(3, np.float64))})
    with pytest.raises(ValueError):
        write_safetensors(path, {"a": ("F5", np.zeros(3, np.uint8))})
    with pytest.raises(TypeError):
        write_safetensors(path, {"a": ("U8", np.zeros(3, np.uint8))}, metadata={"k": 1})
    # floats given for BF16 are rounded to bf16 bits
    write_safetensors(path, {"a": ("BF16", np.array([1.0, 1.00390625], np.float32))})
    assert SafeTensorsFile(path).get("a").tolist() == [0x3F80, 0x3F80]


# ---------------------------------------------------------------------------------------------
# bf16 helpers


def test_bf16_helpers():
    x = np.array([1.0, -2.0, 0.0, -0.0, np.inf, -np.inf, 3.140625], np.float32)
    bits = float32_to_bf16(x)
    assert bits.dtype == np.uint16
    assert bits.tolist() == [0x3F80, 0xC000, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x4049]
    assert np.array_equal(bf16_to_float32(bits), x)
    # round to nearest even on the dropped 16 bits
    f = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF], np.uint32)
    assert float32_to_bf16(f.view(np.float32)).tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x7F80]
    nan = float32_to_bf16(np.array([np.nan], np.float32))
    assert np.isnan(bf16_to_float32(nan))[0]
    # NaN whose payload is only in the low bits must stay NaN
    low_nan = np.array([0x7F800001], np.uint32).view(np.float32)
    assert np.isnan(bf16_to_float32(float32_to_bf16(low_nan)))[0]
    # every bf16 bit pattern survives float32 and back
    allbits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    back = float32_to_bf16(bf16_to_float32(allbits))
    finite = ~np.isnan(bf16_to_float32(allbits))
    assert np.array_equal(back[finite], allbits[finite])
