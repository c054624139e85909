"""attnkit's safetensors files (LoRA adapters, attention maps) against the safetensors package.

Files written by the package load through attnkit and the other way round, in every float
dtype. Every malformed or hostile file raises ValueError naming the file and the field,
never RecursionError, TypeError, RuntimeError or the package's own error.
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from attnkit.inspect import AttentionMaps
from attnkit.lora import add_lora, load_lora, lora_layers, save_lora

_FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _write(path, header, data: bytes = b""):
    """A file of the safetensors layout with this header (a dict, or raw bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _refused(load, path, field: str) -> str:
    """``load(path)`` raises ValueError whose message names ``path`` and matches ``field``."""
    with pytest.raises(ValueError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message, message
    assert re.search(field, message), f"{field!r} not in {message!r}"
    return message


# -- LoRA -------------------------------------------------------------------------------------


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"q": torch.nn.Linear(5, 3), "v": torch.nn.Linear(5, 4)}).to(dtype)


def _settings(rank=2, alpha=6.0, rslora=False, dropout=0.0) -> dict:
    return {"rank": rank, "alpha": alpha, "rslora": rslora, "dropout": dropout}


def _lora_file(path, dtype=torch.float32, layers=None, tensors=None, metadata=None):
    """A LoRA file written by the safetensors package, valid unless told otherwise."""
    g = torch.Generator().manual_seed(1)
    if tensors is None:
        tensors = {"q.lora_A": torch.randn(2, 5, generator=g), "q.lora_B": torch.randn(3, 2, generator=g)}
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    layers = {"q": _settings()} if layers is None else layers
    if metadata is None:
        metadata = {"format": "attnkit-lora-1", "layers": layers if isinstance(layers, str) else json.dumps(layers)}
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    return path, tensors


@pytest.mark.parametrize("dtype", _FLOATS)
def test_lora_file_from_the_package_loads(tmp_path, dtype):
    path, tensors = _lora_file(tmp_path / "a.safetensors", dtype, layers={"q": _settings(rank=2, alpha=3.0)})
    model = _model()
    report = load_lora(model, path)
    assert report.adapted == ("q",)
    layer = dict(lora_layers(model))["q"]
    assert layer.lora_A.dtype == torch.float32  # converted to the model's dtype, as Tensor.to does
    assert torch.equal(layer.lora_A, tensors["q.lora_A"].to(torch.float32))
    assert torch.equal(layer.lora_B, tensors["q.lora_B"].to(torch.float32))
    assert layer.scaling == 3.0 / 2
    x = torch.randn(7, 5, dtype=torch.float64)
    a, b = tensors["q.lora_A"].to(torch.float32).double(), tensors["q.lora_B"].to(torch.float32).double()
    expected = torch.nn.functional.linear(x, model["q"].weight.double(), model["q"].bias.double()) + 1.5 * x @ a.T @ b.T
    assert torch.allclose(model["q"](x.float()).double(), expected, atol=1e-4)


@pytest.mark.parametrize("dtype", _FLOATS)
def test_lora_file_from_attnkit_loads_with_the_package(tmp_path, dtype):
    model = _model(dtype)
    add_lora(model, targets=["q", "v"], rank=3, alpha=5.0, rslora=True, dropout=0.25)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_()
    save_lora(model, tmp_path / "a.safetensors")
    theirs = safetensors.torch.load_file(tmp_path / "a.safetensors")
    ours = {f"{n}.{k}": getattr(layer, k) for n, layer in lora_layers(model) for k in ("lora_A", "lora_B")}
    assert theirs.keys() == ours.keys()
    assert all(theirs[k].dtype == dtype and torch.equal(theirs[k], ours[k]) for k in ours)
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "attnkit-lora-1"
    assert json.loads(meta["layers"]) == {n: _settings(rank=3, alpha=5.0, rslora=True, dropout=0.25) for n in "qv"}


_DEEP = "[" * 100_000 + "]" * 100_000
_LORA_METADATA = [  # (what is wrong, metadata or layers, message)
    ("no format", {"layers": json.dumps({"q": _settings()})}, r"not an attnkit LoRA file \(metadata 'format'"),
    ("no layers", {"format": "attnkit-lora-1"}, r"metadata lacks the 'layers' entry"),
    ("layers not JSON", "{", r"metadata entry 'layers' is not valid JSON"),
    ("layers 100k deep", _DEEP, r"metadata entry 'layers' nests lists and objects more than 32 deep"),
    ("layers 40 deep", json.dumps({"q": {**_settings(), "x": json.loads("[" * 38 + "]" * 38)}}),
     r"metadata entry 'layers' nests lists and objects more than 32 deep"),
    ("layers a list", [], r"'layers' must map layer names to settings"),
    ("layers empty", {}, r"'layers' must map layer names to settings"),
    ("layers null", "null", r"'layers' must map layer names to settings"),
    ("settings a number", {"q": 3}, r"layers\['q'\] must be an object of settings; got 3"),
    ("rank missing", {"q": {"alpha": 1.0, "rslora": False, "dropout": 0.0}}, r"layers\['q'\] lacks 'rank'"),
    ("rank true", {"q": _settings(rank=True)}, r"layers\['q'\]\['rank'\] must be an int >= 1; got True"),
    ("rank 0", {"q": _settings(rank=0)}, r"layers\['q'\]\['rank'\] must be an int >= 1"),
    ("rank 2.0", {"q": _settings(rank=2.0)}, r"layers\['q'\]\['rank'\] must be an int >= 1"),
    ("rank 2**70", {"q": _settings(rank=2**70)}, r"adapter for 'q' has A \(2, 5\) and B \(3, 2\), which do not fit"),
    ("rank 3", {"q": _settings(rank=3)}, r"adapter for 'q' has A \(2, 5\) and B \(3, 2\), which do not fit rank 3"),
    ("alpha NaN", {"q": _settings(alpha=math.nan)}, r"layers\['q'\]\['alpha'\] must be a finite number; got nan"),
    ("alpha a string", {"q": _settings(alpha="6")}, r"layers\['q'\]\['alpha'\] must be a finite number"),
    ("rslora 1", {"q": _settings(rslora=1)}, r"layers\['q'\]\['rslora'\] must be true or false; got 1"),
    ("dropout 1", {"q": _settings(dropout=1)}, r"layers\['q'\]\['dropout'\] must be a number in \[0, 1\)"),
    ("dropout null", {"q": _settings(dropout=None)}, r"layers\['q'\]\['dropout'\] must be a number"),
    ("unknown layer", {"q": _settings(), "k": _settings()}, r"has adapters for layers this model lacks: k"),
]


@pytest.mark.parametrize(("case", "layers", "message"), _LORA_METADATA, ids=[c[0] for c in _LORA_METADATA])
def test_lora_metadata_is_checked(tmp_path, case, layers, message):
    if case in ("no format", "no layers"):
        path, _ = _lora_file(tmp_path / "a.safetensors", metadata=layers)
    else:
        path, _ = _lora_file(tmp_path / "a.safetensors", layers=layers)
    model = _model()
    _refused(lambda p: load_lora(model, p), path, message)
    assert not any(True for _ in lora_layers(model)) and all(p.requires_grad for p in model.parameters())


_LORA_TENSORS = [
    ("B missing", {"q.lora_A": torch.ones(2, 5)}, r"lists layer 'q' but lacks its tensor 'q\.lora_B'"),
    ("A int", {"q.lora_A": torch.ones(2, 5, dtype=torch.int32), "q.lora_B": torch.ones(3, 2)},
     r"tensor 'q\.lora_A' has dtype I32; expected one of F64, F32, F16, BF16"),
    ("B bool", {"q.lora_A": torch.ones(2, 5), "q.lora_B": torch.ones(3, 2, dtype=torch.bool)},
     r"tensor 'q\.lora_B' has dtype BOOL"),
    ("A 3-D", {"q.lora_A": torch.ones(1, 2, 5), "q.lora_B": torch.ones(3, 2)}, r"A \(1, 2, 5\) and B \(3, 2\)"),
    ("A transposed", {"q.lora_A": torch.ones(5, 2), "q.lora_B": torch.ones(3, 2)}, r"A \(5, 2\) .* do not fit"),
]


@pytest.mark.parametrize(("case", "tensors", "message"), _LORA_TENSORS, ids=[c[0] for c in _LORA_TENSORS])
def test_lora_tensors_are_checked(tmp_path, case, tensors, message):
    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "attnkit-lora-1",
                                                         "layers": json.dumps({"q": _settings()})})
    model = _model()
    _refused(lambda p: load_lora(model, p), path, message)
    assert not any(True for _ in lora_layers(model))


# -- attention maps -----------------------------------------------------------------------------


def _maps_meta(**change) -> dict:
    return {"format": 1, "model_name": "m", "layers": [0, 3], "heads": [1], "tokens": [["a", "b", "c"], ["d"]],
            "token_ids": [[5, 6, 7], [8]], **change}


def _attentions(dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {f"attentions.{i}": torch.rand(2, 1, n, n, generator=g).softmax(-1).to(dtype) for i, n in enumerate((3, 1))}


@pytest.mark.parametrize("dtype", _FLOATS)
def test_maps_from_the_package_load(tmp_path, dtype):
    tensors = _attentions(dtype)
    safetensors.torch.save_file(tensors, tmp_path / "m.safetensors",
                                metadata={"attnkit.maps": json.dumps(_maps_meta(), ensure_ascii=False)})
    maps = AttentionMaps.load(tmp_path / "m.safetensors")
    assert (maps.tokens, maps.token_ids, maps.model_name, maps.layers, maps.heads) == \
        ([["a", "b", "c"], ["d"]], [[5, 6, 7], [8]], "m", (0, 3), (1,))
    assert all(a.dtype == dtype and torch.equal(a, tensors[f"attentions.{i}"]) for i, a in enumerate(maps.attentions))


@pytest.mark.parametrize("dtype", _FLOATS)
def test_maps_from_attnkit_load_with_the_package(tmp_path, dtype):
    tensors = _attentions(dtype)
    maps = AttentionMaps(list(tensors.values()), [["é", "b", "c"], ["d"]], None, "some/model", (0, 3), (1,))
    maps.save(tmp_path / "m.safetensors")
    theirs = safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert theirs.keys() == tensors.keys()
    assert all(theirs[k].dtype == dtype and torch.equal(theirs[k], tensors[k]) for k in tensors)
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert json.loads(f.metadata()["attnkit.maps"]) == _maps_meta(
            model_name="some/model", tokens=[["é", "b", "c"], ["d"]], token_ids=None)


def test_maps_sharing_memory_save_and_load(tmp_path):
    """The package refuses tensors that share memory; attnkit writes copies."""
    a = torch.full((1, 1, 2, 2), 0.5)
    maps = AttentionMaps([a, a, a[:, :, :1]], [["x", "y"], ["x", "y"], ["x", "y"]], None, "m", (0,), (0,))
    maps.save(tmp_path / "m.safetensors")
    back = AttentionMaps.load(tmp_path / "m.safetensors")
    assert all(torch.equal(b, m) for b, m in zip(back.attentions, maps.attentions))


def test_loaded_maps_are_copy_on_write_and_survive_saving_over_their_file(tmp_path):
    path = tmp_path / "m.safetensors"
    first = AttentionMaps(list(_attentions().values()), [["a", "b", "c"], ["d"]], None, "m", (0, 3), (1,))
    first.save(path)
    back = AttentionMaps.load(path)
    second = AttentionMaps([torch.ones(1, 1, 1, 1)], [["z"]], None, "n", (0,), (0,))
    second.save(path)  # a smaller file at the same path, while back's tensors map the old one
    assert torch.equal(back[0], first[0]) and torch.equal(back[1], first[1])
    back[0].zero_()  # writes to a private copy of the page
    again = AttentionMaps.load(path)
    assert again.model_name == "n" and torch.equal(again[0], torch.ones(1, 1, 1, 1))


_MAPS_METADATA = [  # (what is wrong, metadata text, message)
    ("not JSON", "{", r"metadata entry 'attnkit\.maps' is not valid JSON"),
    ("100k deep", _DEEP, r"metadata entry 'attnkit\.maps' nests lists and objects more than 32 deep"),
    ("100k deep tokens", json.dumps(_maps_meta())[:-1] + ', "x": ' + _DEEP + "}", r"'attnkit\.maps' nests"),
    ("a list", "[1]", r"attention maps format None"),
    ("format 2", json.dumps(_maps_meta(format=2)), r"attention maps format 2; this attnkit reads format 1"),
    ("no tokens", json.dumps({k: v for k, v in _maps_meta().items() if k != "tokens"}), r"metadata lacks tokens"),
    ("tokens a number", json.dumps(_maps_meta(tokens=3)), r"field 'tokens' must be a list of lists of strings"),
    ("tokens null", json.dumps(_maps_meta(tokens=None)), r"field 'tokens' must be .*; got None"),
    ("tokens a string", json.dumps(_maps_meta(tokens="ab")), r"field 'tokens' must be"),
    ("token a number", json.dumps(_maps_meta(tokens=[["a", "b", 3], ["d"]])), r"field 'tokens' must be"),
    ("layers a number", json.dumps(_maps_meta(layers=2)), r"field 'layers' must be a list of ints; got 2"),
    ("layers null", json.dumps(_maps_meta(layers=None)), r"field 'layers' must be a list of ints; got None"),
    ("layers of bools", json.dumps(_maps_meta(layers=[True, False])), r"field 'layers' must be a list of ints"),
    ("heads null", json.dumps(_maps_meta(heads=None)), r"field 'heads' must be a list of ints; got None"),
    ("heads of floats", json.dumps(_maps_meta(heads=[1.0])), r"field 'heads' must be a list of ints"),
    ("model_name a number", json.dumps(_maps_meta(model_name=5)), r"field 'model_name' must be a string; got 5"),
    ("token_ids a string", json.dumps(_maps_meta(token_ids="x")), r"field 'token_ids' must be null or a list"),
    ("token_ids too short", json.dumps(_maps_meta(token_ids=[[5, 6], [8]])), r"field 'token_ids' must be"),
    ("token_ids one list", json.dumps(_maps_meta(token_ids=[[5, 6, 7]])), r"field 'token_ids' must be"),
    ("a token id a string", json.dumps(_maps_meta(token_ids=[[5, 6, "7"], [8]])), r"field 'token_ids' must be"),
    ("one input fewer", json.dumps(_maps_meta(tokens=[["a", "b", "c"]], token_ids=None)),
     r"unexpected \['attentions\.1'\]"),
    ("one input more", json.dumps(_maps_meta(tokens=[["a", "b", "c"], ["d"], ["e"]], token_ids=None)),
     r"missing \['attentions\.2'\]"),
    ("a key fewer", json.dumps(_maps_meta(tokens=[["a", "b"], ["d"]], token_ids=None)),
     r"tensor 'attentions\.0' has shape \[2, 1, 3, 3\]; expected .* 2 keys"),
    ("a layer more", json.dumps(_maps_meta(layers=[0, 1, 2])), r"tensor 'attentions\.0' has shape .* 3 layers"),
]


@pytest.mark.parametrize(("case", "text", "message"), _MAPS_METADATA, ids=[c[0] for c in _MAPS_METADATA])
def test_maps_metadata_is_checked(tmp_path, case, text, message):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(_attentions(), path, metadata={"attnkit.maps": text})
    _refused(AttentionMaps.load, path, message)


@pytest.mark.parametrize(("case", "tensor", "message"), [
    ("3-D", torch.ones(2, 1, 3), r"tensor 'attentions\.0' has shape \[2, 1, 3\]; expected \(layers, heads, Lq, Lk\)"),
    ("5-D", torch.ones(2, 1, 3, 3, 1), r"tensor 'attentions\.0' has shape \[2, 1, 3, 3, 1\]"),
    ("int64", torch.ones(2, 1, 3, 3, dtype=torch.int64), r"tensor 'attentions\.0' has dtype I64; expected one of"),
    ("bool", torch.ones(2, 1, 3, 3, dtype=torch.bool), r"tensor 'attentions\.0' has dtype BOOL"),
    ("float8", torch.ones(2, 1, 3, 3).to(torch.float8_e4m3fn), r"tensor 'attentions\.0' has dtype F8_E4M3"),
])
def test_maps_tensors_are_checked(tmp_path, case, tensor, message):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({**_attentions(), "attentions.0": tensor}, path,
                                metadata={"attnkit.maps": json.dumps(_maps_meta())})
    _refused(AttentionMaps.load, path, message)


# -- the file itself, for both readers -----------------------------------------------------------


def _entry(shape, offsets=(0, 0), dtype="F32", **extra) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": list(offsets), **extra}


_NOT_SAFETENSORS = r"is not a valid safetensors file: "
_HOSTILE = [  # (what is wrong, header (dict or bytes; None: the file is the data alone), data, message)
    ("empty file", None, b"", _NOT_SAFETENSORS),
    ("truncated length", None, b"\x10\x00\x00", _NOT_SAFETENSORS),
    ("header past the file", None, (1000).to_bytes(8, "little") + b"{}", _NOT_SAFETENSORS + ".*header length"),
    ("header length 2**64 - 1", None, b"\xff" * 12, _NOT_SAFETENSORS + ".*header too large"),
    ("header not JSON", b"not json at all!", b"", _NOT_SAFETENSORS + ".*invalid JSON"),
    ("header not UTF-8", b'{"\xff": 1}', b"", _NOT_SAFETENSORS + ".*UTF-8"),
    ("header a list", b"[1, 2]", b"", _NOT_SAFETENSORS + ".*invalid JSON"),
    ("header 100k deep", b"[" * 100_000 + b"]" * 100_000, b"", _NOT_SAFETENSORS),
    ("a field 200 deep", {"x": _entry([1], (0, 4), deep=json.loads("[" * 200 + "]" * 200))}, b"\0" * 4,
     _NOT_SAFETENSORS + ".*recursion limit"),
    ("overlapping offsets", {"x": _entry([2], (0, 8)), "y": _entry([2], (4, 12))}, b"\0" * 12,
     _NOT_SAFETENSORS + ".*tensor `y`"),
    ("a gap before a tensor", {"x": _entry([1], (4, 8))}, b"\0" * 8, _NOT_SAFETENSORS + ".*tensor `x`"),
    ("offsets past the data", {"x": _entry([4], (0, 16))}, b"\0" * 8, _NOT_SAFETENSORS),
    ("offsets not matching the shape", {"x": _entry([3], (0, 8))}, b"\0" * 8, _NOT_SAFETENSORS + ".*offset for tensor"),
    ("bytes after the last tensor", {"x": _entry([1], (0, 4))}, b"\0" * 8, _NOT_SAFETENSORS + ".*not fully covered"),
    ("three offsets", {"x": _entry([1], (0, 4, 4))}, b"\0" * 4, _NOT_SAFETENSORS + ".*invalid length 3"),
    ("negative offset", {"x": _entry([1], (-4, 0))}, b"\0" * 4, _NOT_SAFETENSORS + ".*-4"),
    ("unknown dtype", {"x": _entry([1], (0, 4), dtype="F99")}, b"\0" * 4, _NOT_SAFETENSORS + ".*F99"),
    ("dtype a number", {"x": _entry([1], (0, 4), dtype=32)}, b"\0" * 4, _NOT_SAFETENSORS),
    ("shape a float", {"x": _entry([1.0], (0, 4))}, b"\0" * 4, _NOT_SAFETENSORS + ".*floating point"),
    ("shape negative", {"x": _entry([-1])}, b"", _NOT_SAFETENSORS + ".*-1"),
    ("shape a string", {"x": _entry("4", (0, 16))}, b"\0" * 16, _NOT_SAFETENSORS),
    ("shape [2**62, 2**62, 0]", {"x": _entry([2**62, 2**62, 0])}, b"", _NOT_SAFETENSORS + ".*overflow"),
    ("shape [0, 2**63]", {"x": _entry([0, 2**63])}, b"",
     r": tensor 'x' has shape \[0, 9223372036854775808\], whose dimensions multiply past 2\*\*63 - 1"),
    ("shape [0, 2**62, 2**62]", {"x": _entry([0, 2**62, 2**62])}, b"", r": tensor 'x' has shape \[0, 4611"),
    ("shape [0, 2**64]", {"x": _entry([0, 2**64])}, b"", _NOT_SAFETENSORS),
    ("metadata not strings", {"__metadata__": {"format": 1}}, b"", _NOT_SAFETENSORS + ".*expected a string"),
    ("metadata a list", {"__metadata__": ["a"]}, b"", _NOT_SAFETENSORS + ".*expected a map"),
    ("a name twice", b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                     b'"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4,
     _NOT_SAFETENSORS + "its header names 'x' more than once"),
]


@pytest.mark.parametrize("reader", ["lora", "maps"])
@pytest.mark.parametrize(("case", "header", "data", "message"), _HOSTILE, ids=[c[0] for c in _HOSTILE])
def test_hostile_files_raise_value_error(tmp_path, reader, case, header, data, message):
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(data)
    else:
        _write(path, header, data)
    model = _model()
    _refused(lambda p: load_lora(model, p) if reader == "lora" else AttentionMaps.load(p), path, message)


def test_a_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        AttentionMaps.load(tmp_path / "nothing.safetensors")


def test_corrupted_headers_raise_only_value_error(tmp_path):
    """Random edits of a valid maps file's header: every one loads or raises ValueError."""
    AttentionMaps(list(_attentions().values()), [["a", "b", "c"], ["d"]], [[5, 6, 7], [8]], "m", (0, 3), (1,)).save(
        tmp_path / "good.safetensors")
    blob = (tmp_path / "good.safetensors").read_bytes()
    end = 8 + int.from_bytes(blob[:8], "little")
    rng = random.Random(0)
    path = tmp_path / "bad.safetensors"
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(300):
        edited = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            edited[rng.randrange(end)] = ord(rng.choice('0123456789[]{}",:-.e "\\x'))
        path.write_bytes(bytes(edited[:rng.choice([len(edited), rng.randrange(len(edited))])]))
        try:
            AttentionMaps.load(path)
            outcomes["loaded"] += 1
        except ValueError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100  # most edits break the file; the rest still load as valid maps


def test_saving_replaces_the_file_whole_with_the_usual_permissions(tmp_path):
    path = tmp_path / "m.safetensors"
    (tmp_path / "other").write_bytes(b"")
    maps = AttentionMaps([torch.ones(1, 1, 1, 1)], [["z"]], None, "n", (0,), (0,))
    maps.save(path)
    maps.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "other"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == (tmp_path / "other").stat().st_mode & 0o777
    with pytest.raises(TypeError):  # the package refuses non-string metadata; nothing is left behind
        from attnkit import _tensorfile

        _tensorfile.save(tmp_path / "x.safetensors", {"a": torch.ones(1)}, {"k": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "other"]
