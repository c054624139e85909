"""attnkit's own safetensors reader/writer against the safetensors package."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit._safetensors import load_file, save_file

_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool]


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(_DTYPES):
        t = torch.randn(3, i + 1, generator=g) * 50
        out[f"t.{i}"] = t > 0 if dt == torch.bool else t.to(dt)
    out["empty"] = torch.empty(0, 4)
    out["scalar"] = torch.tensor(3.5)
    return out


def test_round_trip_both_ways(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = _tensors()
    save_file(tensors, tmp_path / "ours.safetensors", metadata={"k": "v"})
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    assert theirs.keys() == tensors.keys()
    assert all(torch.equal(theirs[k], tensors[k]) and theirs[k].dtype == tensors[k].dtype for k in tensors)
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"a": "b"})
    back, meta = load_file(tmp_path / "theirs.safetensors")
    assert meta == {"a": "b"}
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)


def test_malformed_files_raise_value_error(tmp_path):
    def write(header: dict, data: bytes = b"") -> str:
        raw = json.dumps(header).encode()
        p = tmp_path / "bad.safetensors"
        p.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
        return str(p)

    with pytest.raises(ValueError, match="do not fit"):
        load_file(write({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8))
    with pytest.raises(ValueError, match="overlap"):
        load_file(write({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12))
    with pytest.raises(ValueError, match="malformed"):
        load_file(write({"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))
    with pytest.raises(ValueError, match="malformed"):  # a float dimension
        load_file(write({"x": {"dtype": "F32", "shape": [1.9], "data_offsets": [0, 4]}}, b"\0" * 4))
    with pytest.raises(ValueError, match="gap"):
        load_file(write({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8))
    with pytest.raises(ValueError, match="bytes after the last tensor"):
        load_file(write({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8))
    with pytest.raises(ValueError, match="other than 0 and 1"):
        load_file(write({"x": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x07"))
    with pytest.raises(ValueError, match="__metadata__ must map strings to strings"):
        load_file(write({"__metadata__": {"a": 1}}))
    raw = b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "x": {}}'
    (tmp_path / "dup").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(ValueError, match="duplicate names"):
        load_file(tmp_path / "dup")
    deep = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "deep").write_bytes(len(deep).to_bytes(8, "little") + deep)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_file(tmp_path / "deep")
    (tmp_path / "short").write_bytes(b"\xff" * 12)
    with pytest.raises(ValueError, match="exceeds the file"):
        load_file(tmp_path / "short")
