"""nn.EncoderDecoder: cached decoding against the full forward, attention probabilities
against a by-hand float64 computation from the module's weights, padding, and input checks."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.nn import EncoderDecoder, EncoderDecoderConfig, Seq2SeqOutput


def model(seed: int = 0, **kwargs) -> EncoderDecoder:
    torch.manual_seed(seed)
    fields = dict(src_vocab_size=23, tgt_vocab_size=31, dim=24, num_heads=3, encoder_depth=2, decoder_depth=2,
                  max_length=16)
    fields.update(kwargs)
    m = EncoderDecoder(EncoderDecoderConfig(**fields)).eval()
    with torch.no_grad():  # trained-looking weights: random embeddings at std 0.02 give near-uniform attention
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, 23, (3, 7), generator=g)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, 5:] = False  # row 1 has 5 real tokens, row 2 has 3
    valid[2, 3:] = False
    tgt = torch.randint(3, 31, (3, 6), generator=g)
    tgt[:, 0] = 1
    return src, valid, tgt


def test_cached_decoding_equals_the_full_forward():
    m = model()
    src, valid, tgt = batch()
    with torch.no_grad():
        full = m(src, tgt, src_padding_mask=valid)  # (B, T, V)
        memory = m.encode(src, valid)
        for kind in ("dynamic", "static"):
            caches = m.new_caches(kind, max_length=tgt.shape[1])
            steps = [m.decode(tgt[:, t:t + 1], memory, src_padding_mask=valid, caches=caches)
                     for t in range(tgt.shape[1])]
            torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
            # the cross keys and values were projected once: the cache holds the source, not more
            assert all(cross.length == src.shape[1] for _, cross in caches)
            assert all(own.length == tgt.shape[1] for own, _ in caches)


def test_cached_generation_gives_the_uncached_tokens_and_logits():
    m = model()
    src, valid, _ = batch()
    out = m.generate(src, 10, bos=1, src_padding_mask=valid)
    assert out.shape == (3, 11) and (out[:, 0] == 1).all()
    for cache in ("static", "none"):
        assert torch.equal(m.generate(src, 10, bos=1, src_padding_mask=valid, cache=cache), out)
    # each generated token is the argmax of the full teacher-forced forward over the output
    with torch.no_grad():
        logits = m(src, out[:, :-1], src_padding_mask=valid)
    assert torch.equal(logits.argmax(-1), out[:, 1:])


def test_generation_stops_at_eos_and_pads_finished_rows_with_it():
    m = model()
    src, valid, _ = batch()
    free = m.generate(src, 10, bos=1, src_padding_mask=valid)
    eos = int(free[0, 3])  # row 0 emits this token at step 3
    out = m.generate(src, 10, bos=1, eos=eos, src_padding_mask=valid)
    for row, free_row in zip(out.tolist(), free.tolist()):
        if eos in free_row[1:]:
            first = free_row.index(eos, 1)
            assert row[:first + 1] == free_row[:first + 1] and set(row[first:]) == {eos}
        else:
            assert row == free_row
    # it stops as soon as every row has emitted eos, else after the 10 new tokens
    ends = [row.index(eos, 1) + 1 if eos in row[1:] else 11 for row in free.tolist()]
    assert out.shape[1] == max(ends)


def _by_hand(attn, xq, xkv, key_valid, causal):
    """Probabilities and output of a MultiHeadAttention from its weights, float64: softmax(QK^T/sqrt(d))."""
    heads, d = attn.config.num_heads, attn.config.dim_per_head

    def split(t):  # (B, L, H*D) -> (B, H, L, D)
        return t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    q = split(xq @ attn.q_proj.weight.T + attn.q_proj.bias)
    k = split(xkv @ attn.k_proj.weight.T + attn.k_proj.bias)
    v = split(xkv @ attn.v_proj.weight.T + attn.v_proj.bias)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, Lq, Lk)
    allowed = key_valid[:, None, None, :].expand_as(scores).clone()
    if causal:
        allowed &= torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(xq.shape[0], xq.shape[1], heads * d)
    return probs, out @ attn.o_proj.weight.T + attn.o_proj.bias


def test_attention_probabilities_equal_the_definition_float64():
    m = model(encoder_depth=1, decoder_depth=1).double()
    src, valid, tgt = batch()
    out = m(src, tgt, src_padding_mask=valid, return_attention=True)
    assert isinstance(out, Seq2SeqOutput)
    enc, dec = m.encoder[0], m.decoder[0]
    x = m.src_embed(src) + m.src_positions(torch.arange(src.shape[1]))
    p_enc, a = _by_hand(enc.attn, enc.attn_norm(x), enc.attn_norm(x), valid, causal=False)
    x = x + a
    memory = m.encoder_norm(x + enc.mlp(enc.mlp_norm(x)))
    y = m.tgt_embed(tgt) + m.tgt_positions(torch.arange(tgt.shape[1]))
    every = torch.ones_like(tgt, dtype=torch.bool)
    p_dec, a = _by_hand(dec.self_attn, dec.self_norm(y), dec.self_norm(y), every, causal=True)
    y = y + a
    p_cross, a = _by_hand(dec.cross_attn, dec.cross_norm(y), memory, valid, causal=False)
    y = y + a
    logits = m.head(m.decoder_norm(y + dec.mlp(dec.mlp_norm(y))))
    for got, want in ((out.encoder_attentions[0], p_enc), (out.decoder_attentions[0], p_dec),
                      (out.cross_attentions[0], p_cross), (out.logits, logits)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert (out.cross_attentions[0][2, :, :, 3:] == 0).all()  # padded source keys get nothing
    assert out.cross_attentions[0].std() > 0.05  # not near-uniform: the comparison has teeth


def test_return_attention_shapes_per_layer_and_logits_unchanged():
    m = model()
    src, valid, tgt = batch()
    with torch.no_grad():
        out = m(src, tgt, src_padding_mask=valid, return_attention=True)
        plain = m(src, tgt, src_padding_mask=valid)
    assert torch.equal(out.logits, plain)
    assert [p.shape for p in out.encoder_attentions] == [torch.Size([3, 3, 7, 7])] * 2
    assert [p.shape for p in out.decoder_attentions] == [torch.Size([3, 3, 6, 6])] * 2
    assert [p.shape for p in out.cross_attentions] == [torch.Size([3, 3, 6, 7])] * 2
    for p in (*out.encoder_attentions, *out.decoder_attentions, *out.cross_attentions):
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    assert all((p.triu(1) == 0).all() for p in out.decoder_attentions)
    # no hook is left behind
    assert all(not b.attn._attention_hooks for b in m.encoder)


def test_source_and_target_padding_do_not_change_real_tokens():
    m = model()
    src, valid, tgt = batch()
    tgt_valid = torch.ones_like(tgt, dtype=torch.bool)
    tgt_valid[2, 4:] = False
    padded = src.clone()
    padded[~valid] = 0  # whatever the padding ids are
    with torch.no_grad():
        together = m(padded, tgt, src_padding_mask=valid, tgt_padding_mask=tgt_valid)
        for row in range(3):
            s, t = int(valid[row].sum()), int(tgt_valid[row].sum())
            alone = m(src[row:row + 1, :s], tgt[row:row + 1, :t])
            torch.testing.assert_close(together[row:row + 1, :t], alone, atol=1e-5, rtol=0)
        alone_gen = m.generate(src[2:3, :3], 8, bos=1)
        assert torch.equal(m.generate(padded, 8, bos=1, src_padding_mask=valid)[2:3], alone_gen)


def test_training_step_reduces_the_loss():
    m = model(seed=3).train()
    src, valid, tgt = batch()
    target = torch.roll(tgt, -1, 1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        logits = m(src, tgt, src_padding_mask=valid)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("call, error, words", [
    (lambda m, s, t: m(s.float(), t), ValueError, "src_ids must be (B, L) integer"),
    (lambda m, s, t: m(s, t + 100), ValueError, "tgt_ids must lie in [0, 31)"),
    (lambda m, s, t: m(s, t[:2]), ValueError, "same batch size"),
    (lambda m, s, t: m(s, t, src_padding_mask=torch.ones(3, 6, dtype=torch.bool)), ValueError,
     "src_padding_mask must be (B, L) = (3, 7)"),
    (lambda m, s, t: m(s, t, src_padding_mask=torch.ones(3, 7)), TypeError, "src_padding_mask must be bool"),
    (lambda m, s, t: m(s, t, src_padding_mask=torch.arange(7).repeat(3, 1) > 2), ValueError,
     "src_padding_mask leaves a row"),
    (lambda m, s, t: m(s, t, return_attention=1), TypeError, "return_attention must be a bool"),
    (lambda m, s, t: m([[1]], t), TypeError, "src_ids must be a torch.Tensor"),
    (lambda m, s, t: m(torch.zeros(1, 17, dtype=torch.long), t[:1]), ValueError, "past max_length=16"),
    (lambda m, s, t: m.generate(s, 3, bos=31), ValueError, "bos must be a target token id"),
    (lambda m, s, t: m.generate(s, 3, bos=1, eos=1.0), TypeError, "eos must be an int"),
    (lambda m, s, t: m.generate(s, -1, bos=1), ValueError, "max_new_tokens must be >= 0"),
    (lambda m, s, t: m.generate(s, 16, bos=1), ValueError, "max_new_tokens=16 needs 17"),
    (lambda m, s, t: m.generate(s, 3, bos=1, cache="paged"), ValueError, "cache must be one of"),
    (lambda m, s, t: m.decode(t, torch.zeros(3, 7, 5)), ValueError, "memory must be (B=3, S, dim=24)"),
    (lambda m, s, t: m.decode(t, m.encode(s), caches=[]), ValueError, "caches must be a list of 2"),
    (lambda m, s, t: m.new_caches("static"), ValueError, "needs max_length"),
])
def test_bad_inputs_name_the_argument(call, error, words):
    m = model()
    src, _, tgt = batch()
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call(m, src, tgt)


@pytest.mark.parametrize("fields, error, words", [
    (dict(dim=10, num_heads=3), ValueError, "embed_dim"),
    (dict(encoder_depth=0), ValueError, "encoder_depth must be >= 1"),
    (dict(mlp_ratio=0), ValueError, "mlp_ratio"),
    (dict(tie_embeddings=1), TypeError, "tie_embeddings must be a bool"),
    (dict(tgt_vocab_size=2.0), TypeError, "tgt_vocab_size must be an int"),
])
def test_config_is_checked(fields, error, words):
    base = dict(src_vocab_size=10, tgt_vocab_size=10)
    with pytest.raises(error, match=words):
        EncoderDecoderConfig(**{**base, **fields})
    with pytest.raises(TypeError, match="config must be an EncoderDecoderConfig"):
        EncoderDecoder(base)
