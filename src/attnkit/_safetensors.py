"""Read and write the safetensors format with torch alone (no pickle, no extra dependency).

The format: an 8-byte little-endian header length N, N bytes of JSON mapping each name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional ``"__metadata__"``
of strings), then the raw little-endian bytes. Offsets are relative to the end of the
header. Files written here load with the ``safetensors`` package and vice versa.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000


def save_file(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata must map str to str")
        header["__metadata__"] = metadata
    blobs = []
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        t = t.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        if sys.byteorder == "big":  # pragma: no cover - every supported platform is little-endian
            raise RuntimeError("writing safetensors on a big-endian machine is not supported")
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for data in blobs:
            f.write(data)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate names in the header")
    return dict(pairs)


def load_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file. A malformed file raises ValueError."""
    blob = Path(path).read_bytes()
    if len(blob) < 8:
        raise ValueError(f"{path} is not a safetensors file: {len(blob)} bytes")
    n = int.from_bytes(blob[:8], "little")
    if n > min(_MAX_HEADER, len(blob) - 8):
        raise ValueError(f"{path} is not a safetensors file: header length {n} exceeds the file")
    try:
        header = json.loads(blob[8:8 + n], object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not a safetensors file: its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    data = memoryview(blob)[8 + n:]
    out: dict[str, Tensor] = {}
    spans = []
    for name, info in header.items():
        if not (isinstance(info, dict) and info.get("dtype") in _DTYPES
                and isinstance(info.get("shape"), list) and all(type(d) is int and d >= 0 for d in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(type(x) is int for x in info["data_offsets"])):
            raise ValueError(f"{path}: entry {name!r} is malformed: {info!r:.200}")
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        begin, end = info["data_offsets"]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(data) or end - begin != size:
            raise ValueError(f"{path}: entry {name!r} has offsets {begin}..{end} that do not fit "
                             f"its shape {shape} and dtype {info['dtype']} in {len(data)} data bytes")
        spans.append((begin, end))
        raw = bytearray(data[begin:end])  # a private, writable copy
        t = torch.frombuffer(raw, dtype=dtype) if size else torch.empty(0, dtype=dtype)
        if dtype == torch.bool and size and max(raw) > 1:
            raise ValueError(f"{path}: entry {name!r} is BOOL but holds bytes other than 0 and 1")
        out[name] = t.reshape(shape)
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise ValueError(f"{path}: tensors overlap or leave a gap in the data section at byte {covered}")
        covered = end
    if covered != len(data):
        raise ValueError(f"{path}: {len(data) - covered} bytes after the last tensor")
    return out, dict(metadata)
