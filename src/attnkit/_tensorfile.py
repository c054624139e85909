"""Safetensors files through the ``safetensors`` package, with the checks attnkit adds on top.

The package parses and validates the format (header length, JSON, dtypes, offsets that
cover the data exactly, string metadata) and memory-maps the data. attnkit adds what it
lets through:

- duplicate names in the header (the format forbids them; the package keeps one silently);
- shapes torch cannot hold: an empty tensor such as ``[0, 2**63]`` passes the package's
  size check, then fails in torch with a TypeError;
- JSON inside metadata values: parsed here with a nesting limit.

Every problem raises ValueError naming the file and the field.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["FLOATS", "Contents", "open_file", "parse_json", "save"]

FLOATS = ("F64", "F32", "F16", "BF16")
"""The safetensors names of the float dtypes attnkit stores (float64, float32, float16, bfloat16)."""

_MAX_DEPTH = 32  # attnkit's metadata nests 3 levels; a file nesting deeper is not attnkit's
_MAX_ELEMENTS = 2**63 - 1  # torch sizes and strides are int64


def save(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (moved to the CPU, made contiguous) and string ``metadata`` to ``path``.

    The file is written under a temporary name beside ``path`` and renamed over it, so a
    reader never sees half a file, and tensors still memory-mapped from an earlier file at
    ``path`` keep their data (package versions up to 0.7 truncate the file in place). It
    gets the permissions of any new file (the umask). Tensors sharing memory (which the
    package refuses) are written as copies.
    """
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone() if storage in seen else t
        seen.add(storage)
    target = os.path.abspath(os.fspath(path))
    temporary = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{secrets.token_hex(8)}.tmp")
    # Created here only to learn the mode a new file gets (umask): package 0.8 writes files 0600.
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = os.stat(temporary).st_mode & 0o777
        save_file(out, temporary, metadata=metadata)
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@dataclass(frozen=True)
class Contents:
    """An open safetensors file: its metadata and, per tensor, dtype name and shape.

    ``dtypes[name]`` is the safetensors name (``"F32"``, ``"BF16"``, ...); ``shapes[name]``
    a tuple of ints. :meth:`tensor` reads one tensor, memory-mapped (copy-on-write: writing
    to it never changes the file).
    """

    metadata: dict[str, str]
    dtypes: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    _handle: object

    def tensor(self, name: str) -> Tensor:
        return self._handle.get_tensor(name)  # type: ignore[attr-defined]


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        twice = sorted({k for k in names if names.count(k) > 1})
        raise ValueError(f"its header names {', '.join(map(repr, twice))} more than once")
    return dict(pairs)


@contextlib.contextmanager
def open_file(path: str | os.PathLike) -> Iterator[Contents]:
    """Open a safetensors file for reading; the tensors read stay valid after the block.

    Raises:
        ValueError: the file is not valid safetensors (the package's reason follows the
            path), names a tensor twice, or has a shape torch cannot hold.
        OSError: the file cannot be opened (missing, a directory, no permission).
    """
    try:
        handle = safe_open(os.fspath(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    with handle:
        # The package has checked the header (at most 100 MB, JSON of the right structure, nesting
        # at most 128 deep), so it is read again here only for what the package does not check.
        with open(path, "rb") as f:
            header = f.read(int.from_bytes(f.read(8), "little"))
        try:
            entries = json.loads(header, object_pairs_hook=_unique)
        except ValueError as e:
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
        entries.pop("__metadata__", None)
        shapes = {name: tuple(info["shape"]) for name, info in entries.items()}
        for name, shape in shapes.items():
            if math.prod(max(d, 1) for d in shape) > _MAX_ELEMENTS:
                raise ValueError(f"{path}: tensor {name!r} has shape {list(shape)}, whose dimensions multiply past "
                                 f"2**63 - 1, the most torch can index")
        yield Contents(dict(handle.metadata() or {}), {n: i["dtype"] for n, i in entries.items()}, shapes,
                       handle)


def _depth(value: object) -> int:
    """How deeply lists and dicts nest in ``value`` (0 for a scalar), without recursion."""
    deepest, stack = 0, ([(value, 1)] if isinstance(value, (list, dict)) else [])
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, (list, dict)))
    return deepest


def parse_json(path: str | os.PathLike, key: str, text: str) -> Any:
    """The JSON value in metadata entry ``key`` of file ``path``.

    Raises ValueError naming the file and the key if ``text`` is not JSON or nests lists
    and objects more than 32 deep (deeper input would exhaust Python's recursion limit).
    """
    too_deep = ValueError(f"{path}: metadata entry {key!r} nests lists and objects more than {_MAX_DEPTH} deep")
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except ValueError as e:
        raise ValueError(f"{path}: metadata entry {key!r} is not valid JSON ({e})") from None
    if _depth(value) > _MAX_DEPTH:
        raise too_deep
    return value
