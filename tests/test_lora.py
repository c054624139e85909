"""LoRA: unchanged at init, merged == unmerged, only adapters train, save/load round trip."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from attnkit.lora import add_lora, load_lora, lora_layers, merge_lora, remove_lora, save_lora, unmerge_lora
from attnkit.nn import TransformerConfig, TransformerLM


def _lm(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(vocab_size=50, dim=32, depth=2, num_heads=4, num_kv_heads=2)).eval()


def _train(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_output_unchanged_at_init_and_parameter_count():
    lm = _lm()
    tokens = torch.randint(0, 50, (2, 9))
    before = lm(tokens)
    report = add_lora(lm, targets=("q_proj", "v_proj"), rank=4, alpha=8)
    assert torch.equal(lm(tokens), before)
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 KV heads x 8), in each of 2 blocks
    assert report.trainable == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert len(report.adapted) == 4 and "trainable" in str(report)
    assert all(layer.scaling == 8 / 4 for _, layer in lora_layers(lm))  # alpha / r


def test_only_adapters_train_and_merge_equals_unmerged():
    lm = _lm()
    add_lora(lm, targets="*_proj", rank=4, alpha=16, rslora=True)
    frozen = {n: p.detach().clone() for n, p in lm.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in lm.named_parameters() if "lora_" in n}
    _train(lm)
    assert all(torch.equal(p, frozen[n]) for n, p in lm.named_parameters() if n in frozen)
    assert all(not torch.equal(p, adapters[n]) for n, p in lm.named_parameters() if n.endswith("lora_B"))
    layer = next(layer for _, layer in lora_layers(lm))
    assert layer.scaling == pytest.approx(16 / 2.0)  # rsLoRA: alpha / sqrt(r)
    tokens = torch.randint(0, 50, (2, 9))
    unmerged = lm(tokens)
    merge_lora(lm)
    assert torch.allclose(lm(tokens), unmerged, atol=1e-5)
    unmerge_lora(lm)
    assert torch.allclose(lm(tokens), unmerged, atol=1e-5)
    assert all(torch.allclose(p, frozen[n], atol=1e-6) for n, p in lm.named_parameters() if n in frozen)


def test_save_load_reproduces_outputs(tmp_path):
    lm = _lm()
    add_lora(lm, rank=4)
    _train(lm)
    tokens = torch.randint(0, 50, (2, 9))
    expected = lm(tokens)
    save_lora(lm, tmp_path / "adapter.safetensors")
    fresh = _lm()  # same base weights, no adapters
    assert not torch.allclose(fresh(tokens), expected, atol=1e-4)
    load_lora(fresh, tmp_path / "adapter.safetensors")
    assert torch.allclose(fresh(tokens), expected, atol=1e-6)
    other = _lm()
    add_lora(other, rank=4, alpha=3.0)  # a different adapter, and a different alpha
    _train(other, steps=2)
    merge_lora(other)
    load_lora(other, tmp_path / "adapter.safetensors")  # into a merged model: stays merged, takes the file's alpha
    assert all(layer.merged for _, layer in lora_layers(other))
    assert torch.allclose(other(tokens), expected, atol=1e-5)
    remove_lora(fresh)
    assert not any(True for _ in lora_layers(fresh))
    assert torch.allclose(fresh(tokens), expected, atol=1e-5)


def test_saved_file_loads_with_the_safetensors_package(tmp_path):
    lm = _lm()
    add_lora(lm, rank=2)
    save_lora(lm, tmp_path / "a.safetensors")
    theirs = safetensors.torch.load_file(tmp_path / "a.safetensors")
    ours = {f"{n}.{k}": getattr(layer, k) for n, layer in lora_layers(lm) for k in ("lora_A", "lora_B")}
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_hugging_face_style_names():
    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = (torch.nn.Linear(8, 8) for _ in range(3))

    model = torch.nn.ModuleDict({"layer": torch.nn.ModuleList([SelfAttention(), SelfAttention()])})
    report = add_lora(model, targets=("query", "value"), rank=2)
    assert report.adapted == ("layer.0.query", "layer.0.value", "layer.1.query", "layer.1.value")
    model2 = torch.nn.ModuleDict({"layer": torch.nn.ModuleList([SelfAttention(), SelfAttention()])})
    assert add_lora(model2, targets="layer.1.*", rank=2).adapted == ("layer.1.query", "layer.1.key", "layer.1.value")


def test_refuses_tied_weights_and_torch_multihead_out_proj():
    lm = _lm()
    with pytest.raises(ValueError, match=r"head\.weight is tied to embed\.weight"):
        add_lora(lm, targets="head")
    assert not any(True for _ in lora_layers(lm)) and all(p.requires_grad for p in lm.parameters())
    torch_mha = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(8, 2)})
    with pytest.raises(ValueError, match="reads its weight directly"):
        add_lora(torch_mha, targets="out_proj")


def test_malformed_file_changes_nothing(tmp_path):
    lm = _lm()
    add_lora(lm, rank=2)
    save_lora(lm, tmp_path / "a.safetensors")
    tensors = safetensors.torch.load_file(tmp_path / "a.safetensors")
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        meta = f.metadata()
    layers = json.loads(meta["layers"])
    last = sorted(layers)[-1]
    layers[last]["dropout"] = 2.0  # the last layer's settings are bad
    safetensors.torch.save_file(tensors, tmp_path / "bad.safetensors", metadata={**meta, "layers": json.dumps(layers)})
    fresh = _lm()
    with pytest.raises(ValueError, match=rf"bad\.safetensors: layers\['{last}'\]\['dropout'\] must be a number in"):
        load_lora(fresh, tmp_path / "bad.safetensors")
    assert not any(True for _ in lora_layers(fresh)) and all(p.requires_grad for p in fresh.parameters())


def test_lora_errors(tmp_path):
    lm = _lm()
    with pytest.raises(ValueError, match=r"no nn\.Linear matches targets \('query',\); the model's linear layers"):
        add_lora(lm, targets="query")
    with pytest.raises(ValueError, match=r"has no LoRA adapters; call add_lora\(model"):
        merge_lora(lm)
    add_lora(lm)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(lm)
    save_lora(lm, tmp_path / "a.safetensors")
    other = TransformerLM(TransformerConfig(vocab_size=50, dim=16, depth=2, num_heads=4))
    with pytest.raises(ValueError, match="do not fit"):
        load_lora(other, tmp_path / "a.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match=r"junk\.safetensors is not a valid safetensors file: .*invalid JSON"):
        load_lora(other, tmp_path / "junk.safetensors")
