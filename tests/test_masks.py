"""Masks against independent, loop-by-loop definitions, and their block maps against dense."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

import attnkit
from attnkit import masks
from attnkit._blocks import EMPTY, FULL, ScoreBlock
from attnkit.functional.sdpa import sdpa_form
from attnkit.functional.tiled.translate import band_form

from conftest import max_err, qkv


def loops(q_len, k_len, allowed, batch=1):
    """Dense (B, Lq, Lk) mask built one pair at a time from a plain Python predicate."""
    out = np.zeros((batch, q_len, k_len), dtype=bool)
    for b, i, j in itertools.product(range(batch), range(q_len), range(k_len)):
        out[b, i, j] = allowed(b, i, j)
    return torch.from_numpy(out)


LENGTHS = [(1, 1), (5, 5), (7, 13), (13, 7), (33, 33)]
DOC_Q = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3], [0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]])
DOC_K = torch.tensor([[0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 0, 1, 1, 2]])


class EvenDistance(masks.Mask):
    """A user's mask written only as ``allowed``: keys at an even distance of at most 4."""

    def allowed(self, block):
        d = block.i - block.j
        return (d % 2 == 0) & (d.abs() <= 4)

    def __repr__(self):
        return "EvenDistance()"


class EveryThirdKey(masks.Mask):
    """A user's mask written only as FlexAttention's ``mask_mod``: key j with j % 3 == b."""

    def mask_mod(self, q_len, k_len):
        return lambda b, h, q_idx, kv_idx: kv_idx % 3 == b

    def extent(self):
        return 2, 1

    def __repr__(self):
        return "EveryThirdKey()"


def cases(q_len, k_len):
    """(mask, predicate(b, i, j), batch) for every built-in mask kind at these lengths."""
    br = k_len - q_len
    yield masks.causal(), lambda b, i, j: j <= i, 1
    yield masks.causal("bottom_right"), lambda b, i, j: j <= i + br, 1
    yield masks.sliding_window(2), lambda b, i, j: i - 2 <= j <= i, 1
    yield masks.sliding_window(3, 1, "bottom_right"), lambda b, i, j: -3 <= j - (i + br) <= 1, 1
    yield masks.prefix_lm(3), lambda b, i, j: j <= i or j < 3, 1
    g = [0, 4] if max(q_len, k_len) > 4 else [0]
    yield masks.global_tokens(g), lambda b, i, j: i in g or j in g, 1
    lengths = [min(2, k_len), k_len]
    yield masks.key_padding(lengths), lambda b, i, j: j < lengths[b], 2
    valid = torch.arange(k_len)[None, :] % torch.tensor([[2], [3]]) != 0
    yield masks.key_padding(valid=valid), lambda b, i, j: bool(valid[b, j]), 2
    dense = torch.rand(2, 1, q_len, k_len, generator=torch.Generator().manual_seed(q_len)) > 0.5
    yield masks.from_tensor(dense), lambda b, i, j: bool(dense[b, 0, i, j]), 2
    if (q_len, k_len) == (13, 7):
        yield (masks.document(DOC_Q, DOC_K),
               lambda b, i, j: DOC_Q[b, i] == DOC_K[b, j], 2)
    ids = torch.arange(q_len) // 4
    if q_len == k_len:
        yield masks.document(ids), lambda b, i, j: ids[i] == ids[j], 1
        yield (masks.causal() & masks.document(ids),
               lambda b, i, j: j <= i and ids[i] == ids[j], 1)
        yield (masks.sliding_window(2, 2) | masks.global_tokens([0]),
               lambda b, i, j: abs(i - j) <= 2 or 0 in (i, j), 1)
        yield ~masks.causal(), lambda b, i, j: j > i, 1
    yield EvenDistance(), lambda b, i, j: (i - j) % 2 == 0 and abs(i - j) <= 4, 1
    # the sparse patterns of the literature, each from its definition
    yield masks.chunked(3), lambda b, i, j: i // 3 == j // 3, 1
    yield masks.chunked(4) & masks.causal(), lambda b, i, j: i // 4 == j // 4 and j <= i, 1
    yield masks.strided(3), lambda b, i, j: j <= i and (i - j < 3 or (i - j) % 3 == 0), 1
    yield (masks.strided(2, "bottom_right"),
           lambda b, i, j: j <= i + br and (i + br - j < 2 or (i + br - j) % 2 == 0), 1)
    yield masks.dilated(5, 2), lambda b, i, j: 0 <= i - j < 5 and (i - j) % 2 == 0, 1
    yield masks.dilated(7, 3), lambda b, i, j: 0 <= i - j < 7 and (i - j) % 3 == 0, 1
    nq, nk = -(-q_len // 2), -(-k_len // 3)
    blocks = torch.rand(2, 1, nq, nk, generator=torch.Generator().manual_seed(k_len)) > 0.4
    yield masks.from_blocks(blocks, 2, 3), lambda b, i, j: bool(blocks[b, 0, i // 2, j // 3]), 2
    if q_len == k_len:
        bb = masks.bigbird(window=1, global_tokens=2, random_blocks=1, block_size=3, seed=7)
        lay = bb.layout(q_len, k_len)  # its random part is checked against the definition apart
        yield bb, lambda b, i, j: abs(i // 3 - j // 3) <= 1 or i < 2 or j < 2 or bool(lay[i // 3, j // 3]), 1
    yield EveryThirdKey(), lambda b, i, j: j % 3 == b, 2
    yield EvenDistance() & masks.causal(), lambda b, i, j: (i - j) % 2 == 0 and 0 <= i - j <= 4, 1


ALL = [(lq, lk, m, p, b) for lq, lk in LENGTHS for m, p, b in cases(lq, lk)]


@pytest.mark.parametrize(("q_len", "k_len", "mask", "pred", "batch"), ALL,
                         ids=[f"{lq}x{lk}-{m!r}" for lq, lk, m, _, _ in ALL])
def test_to_dense_matches_definition(q_len, k_len, mask, pred, batch):
    want = loops(q_len, k_len, pred, batch)
    got = mask.to_dense(q_len, k_len, batch=batch)
    got = got.expand(batch, 1, q_len, k_len)[:, 0] if got.dim() == 4 else got.expand(batch, q_len, k_len)
    assert torch.equal(got, want)


@pytest.mark.parametrize(("q_len", "k_len", "mask", "pred", "batch"), ALL,
                         ids=[f"{lq}x{lk}-{m!r}" for lq, lk, m, _, _ in ALL])
@pytest.mark.parametrize("block", [(1, 1), (2, 3), (4, 4), (8, 5)])
def test_block_states_agree_with_dense(q_len, k_len, mask, pred, batch, block):
    """EMPTY blocks hold no allowed pair and FULL blocks only allowed pairs, for every
    batch element; built-in masks (not compositions) classify exactly."""
    bq, bk = block
    dense = loops(q_len, k_len, pred, batch)
    state = mask.blocks(q_len, k_len, block).state
    exact = not repr(mask).startswith(("(", "~"))  # the default block states are exact too
    for r, c in itertools.product(range(state.shape[0]), range(state.shape[1])):
        tile = dense[:, r * bq : (r + 1) * bq, c * bk : (c + 1) * bk]
        if state[r, c] == EMPTY:
            assert not tile.any()
        elif state[r, c] == FULL:
            assert tile.all()
        elif exact:
            assert tile.any() and not tile.all(), "a partial block must be neither empty nor full"


@pytest.mark.parametrize(("q_len", "k_len", "mask", "pred", "batch"), ALL[:12],
                         ids=[f"{lq}x{lk}-{m!r}" for lq, lk, m, _, _ in ALL[:12]])
def test_sparsity_is_the_masked_fraction(q_len, k_len, mask, pred, batch):
    dense = loops(q_len, k_len, pred, batch)
    assert mask.sparsity(q_len, k_len) == pytest.approx(1 - dense.float().mean().item())


def test_sliding_window_block_sparsity_is_linear():
    """At L=16384 a 512-token window leaves about 512/16384 of the blocks, without
    materialising anything of size L x L."""
    bm = masks.sliding_window(511).blocks(16384, 16384, 128)
    c = bm.counts()
    assert c["full"] + c["partial"] <= 128 * 6
    assert bm.sparsity > 0.95


def test_picture():
    text = str(masks.causal())
    lines = text.splitlines()
    assert lines[0].startswith("causal(align='top_left') on Lq=16, Lk=16")
    assert lines[1] == "█" + "·" * 15
    assert lines[16] == "█" * 16
    assert "sparsity 46.9%" in lines[0]  # 120 of 256 pairs masked
    big = masks.sliding_window(511).blocks(4096, 4096, 512)
    rows = str(big).splitlines()[1:]
    assert rows[0] == "▒" + "·" * 7  # queries 0..511 see keys 0..i only
    assert rows[1] == "▒▒" + "·" * 6  # queries 512..1023 see keys i-511..i


def test_natural_size_drives_the_picture():
    m = masks.document(torch.tensor([0] * 40 + [1] * 24))
    head = str(m).splitlines()[0]
    assert "Lq=64, Lk=64" in head and "a cell = 2 queries x 2 keys" in head


def test_bad_masks_raise_clear_errors():
    with pytest.raises(ValueError, match="left must be >= 0; got -3"):
        masks.sliding_window(-3)
    with pytest.raises(TypeError, match="left must be an int"):
        masks.sliding_window(2.5)
    with pytest.raises(ValueError, match="align must be one of"):
        masks.causal("top_right")
    with pytest.raises(TypeError, match="document ids"):
        masks.document(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="exactly one of lengths= or valid="):
        masks.key_padding()
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        masks.key_padding([-1])
    with pytest.raises(TypeError, match="pass it as bias= instead"):
        masks.from_tensor(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        masks.global_tokens([-1])
    with pytest.raises(TypeError, match="other must be an attnkit mask"):
        masks.causal() & 3


@pytest.mark.parametrize(("q_len", "k_len", "mask", "pred", "batch"), ALL,
                         ids=[f"{lq}x{lk}-{m!r}" for lq, lk, m, _, _ in ALL])
def test_mask_mod_and_full_empty_match_definition(q_len, k_len, mask, pred, batch):
    want = loops(q_len, k_len, pred, batch)  # (B, Lq, Lk)
    mod = mask.mask_mod(q_len, k_len)
    b = torch.arange(batch).view(-1, 1, 1, 1)
    got = mod(b, torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(q_len).view(1, 1, -1, 1),
              torch.arange(k_len).view(1, 1, 1, -1))
    assert got.dtype == torch.bool
    assert torch.equal(got.expand(batch, 1, q_len, k_len)[:, 0], want)
    assert mask.is_full(q_len, k_len, batch=batch) == bool(want.all())
    assert mask.is_empty(q_len, k_len, batch=batch) == (not want.any())


@pytest.mark.parametrize(("q_len", "k_len", "mask", "pred", "batch"), [c for c in ALL if c[:2] == (13, 7)],
                         ids=[repr(c[2]) for c in ALL if c[:2] == (13, 7)])
def test_shifted_is_a_piece_of_the_whole(q_len, k_len, mask, pred, batch):
    whole = loops(q_len, k_len, pred, batch)
    for (q0, q1), (k0, k1) in [((0, 5), (2, 7)), ((6, 13), (0, 4)), ((3, 4), (6, 7))]:
        piece = mask.shifted(q0, k0, q_total=q_len, k_total=k_len)
        got = piece.to_dense(q1 - q0, k1 - k0, batch=batch)
        got = got.expand(batch, 1, q1 - q0, k1 - k0)[:, 0] if got.dim() == 4 else got.expand(batch, -1, -1)
        assert torch.equal(got, whole[:, q0:q1, k0:k1]), (q0, k0)
        state = piece.block_states(q1 - q0, k1 - k0, 2, 2, batch=batch)
        tiles = whole[:, q0:q1, k0:k1]
        for r, c in itertools.product(range(state.shape[0]), range(state.shape[1])):
            tile = tiles[:, 2 * r: 2 * r + 2, 2 * c: 2 * c + 2]
            assert state[r, c] != EMPTY or not tile.any()
            assert state[r, c] != FULL or tile.all()


@pytest.mark.parametrize("backend", ["reference", "tiled", "sdpa", "auto"])
@pytest.mark.parametrize("user_mask", [EvenDistance(), EveryThirdKey(), EvenDistance() | masks.causal()],
                         ids=repr)
def test_a_user_mask_runs_on_every_backend(backend, user_mask, tiled_kernel):
    """Output and gradients equal the float64 reference under the same mask given as a
    dense tensor built from the definition; sdpa declines with a reason."""
    q_len, k_len = 150, 300  # more than one key block of the tiled backend
    q, k, v = qkv(batch=2, heads=2, q_len=q_len, k_len=k_len, requires_grad=True)
    dense = user_mask.to_dense(q_len, k_len, batch=2)
    if backend == "sdpa":
        with pytest.raises(ValueError, match="only as a dense"):
            attnkit.attention(q, k, v, mask=user_mask, backend="sdpa")
        return
    out = attnkit.attention(q, k, v, mask=user_mask, backend=backend)
    ref = attnkit.attention(q, k, v, mask=dense, backend="reference")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    assert torch.allclose(out, ref, atol=1e-10)
    for g, w in zip(grads, want):
        assert torch.allclose(g, w, atol=1e-10)


def test_sdpa_is_asked_in_its_own_terms():
    form = sdpa_form(masks.causal(), 3, 5)
    assert form is not None and form.is_causal and form.key_valid is None
    assert sdpa_form(masks.causal("bottom_right"), 3, 5) is None
    assert sdpa_form(masks.causal("bottom_right"), 4, 4).is_causal
    assert sdpa_form(masks.causal().shifted(4, 0), 4, 4) is None
    pad = sdpa_form(masks.key_padding([1, 3]), 2, 3)
    assert torch.equal(pad.key_valid, torch.tensor([[True, False, False], [True, True, True]]))
    assert sdpa_form(masks.sliding_window(2), 3, 3) is None and sdpa_form(EvenDistance(), 3, 3) is None


def test_the_kernels_translations_on_mask_are_deprecated_and_agree():
    """``Mask.sdpa_form`` and friends moved to the kernels; for one release they warn and give the same."""
    from attnkit.functional.tiled import translate

    window, pad = masks.sliding_window(3) & masks.causal(), masks.key_padding([2, 4])
    with pytest.deprecated_call(match=r"Mask.sdpa_form\(\) is deprecated.*functional.sdpa.sdpa_form"):
        assert torch.equal(pad.sdpa_form(3, 4).key_valid, sdpa_form(pad, 3, 4).key_valid)
    with pytest.deprecated_call(match="Mask.band_form"):
        assert torch.equal(window.band_form(5, 5).lo, translate.band_form(window, 5, 5).lo)
    with pytest.deprecated_call(match="Mask.causal_offset"):
        assert masks.causal("bottom_right").causal_offset(3, 5) == translate.causal_offset(masks.causal("bottom_right"),
                                                                                          3, 5) == 2
    with pytest.deprecated_call(match="Mask.by_position"):
        assert window.by_position and not masks.global_tokens([0]).by_position
    with pytest.deprecated_call(match=r"attnkit.masks.BandForm is deprecated.*translate.BandForm"):
        assert masks.BandForm is translate.BandForm
    with pytest.deprecated_call(match="attnkit.masks.SDPAForm"):
        assert masks.SDPAForm is type(sdpa_form(masks.causal(), 2, 2))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        masks.Nope


def test_an_empty_block_decides_nothing_about_a_functions_style():
    """A block without positions is answered empty, and the style check waits for a block with some."""
    m = masks.from_function(lambda b, h, q_idx, kv_idx: (_VEC[q_idx] * _VEC[kv_idx]).sum() > 0)
    empty = ScoreBlock(1, 2, 1, 4, 4, 0, 0, 0, 4, torch.device("cpu"))
    assert m.allowed(empty).expand(empty.shape).shape == (1, 2, 0, 1, 4) and m.evaluator.per_position is None
    m.allowed(ScoreBlock(1, 2, 1, 9, 9, 0, 9, 0, 9, torch.device("cpu")))
    assert m.evaluator.per_position  # the broadcast .sum() disagrees with Flex's per-position calls


def test_flex_mask_mod_of_a_users_own_masks():
    """Flex's form of a user's masks: materialised from ``allowed``; a subclass's own ``mask_mod`` (also of a
    built-in class) wins; ``super().mask_mod()`` gives the built-in or materialised form, without recursing."""
    from attnkit.masks.flex import mask_mod

    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    zero = torch.tensor(0)
    even = mask_mod(EvenDistance(), 9, 9)(zero, zero, i, j)
    assert torch.equal(even, ((i - j) % 2 == 0) & ((i - j).abs() <= 4))

    class EvenCausal(masks.Causal):
        def mask_mod(self, q_len, k_len):
            return lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (kv_idx % 2 == 0)

    assert torch.equal(mask_mod(EvenCausal(None, 0, "top_left"), 9, 9)(zero, zero, i, j), (j <= i) & (j % 2 == 0))

    class Narrowed(EvenDistance):
        def mask_mod(self, q_len, k_len):
            wider = super().mask_mod(q_len, k_len)
            return lambda b, h, q_idx, kv_idx: wider(b, h, q_idx, kv_idx) & (kv_idx != 0)

    assert torch.equal(mask_mod(Narrowed(), 9, 9)(zero, zero, i, j), even & (j != 0))
    assert torch.equal(masks.causal().mask_mod(9, 9)(zero, zero, i, j), j <= i)  # the method: the built-in form


def test_a_mask_without_a_definition_says_so():
    class Nothing(masks.Mask):
        pass

    with pytest.raises(NotImplementedError, match="allowed\\(\\) or mask_mod\\(\\)"):
        Nothing().to_dense(2, 2)


# -- from_function -------------------------------------------------------------------------

DOCS = torch.tensor([0] * 40 + [1] * 100 + [2] * 116)  # packed documents over 256 tokens


def _stripes(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx) % 5 == 0


def _docs_causal(b, h, q_idx, kv_idx):
    return (DOCS[q_idx] == DOCS[kv_idx]) & (kv_idx <= q_idx)


def _per_head_window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 8 * (h + 1) + 16 * b


FUNCTIONS = [
    (_stripes, lambda b, h, i, j: (i - j) % 5 == 0),
    (_docs_causal, lambda b, h, i, j: DOCS[i] == DOCS[j] and j <= i),
    (_per_head_window, lambda b, h, i, j: abs(i - j) <= 8 * (h + 1) + 16 * b),
]


@pytest.mark.parametrize(("fn", "pred"), FUNCTIONS, ids=[f.__name__ for f, _ in FUNCTIONS])
def test_from_function_matches_its_definition(fn, pred):
    m = masks.from_function(fn)
    for b, h in [(0, 0), (1, 2)]:
        want = loops(37, 41, lambda _, i, j, b=b, h=h: pred(b, h, i, j))[0]
        block = ScoreBlock(2, 3, 1, 37, 41, 0, 37, 0, 41, torch.device("cpu"))
        got = m.allowed(block).expand(block.shape)[b, h, :, 0, :]
        assert torch.equal(got, want)


def _flex_states(fn, batch, heads, length, block):
    """Flex's create_block_mask as EMPTY/PARTIAL/FULL, aggregated over batch and heads."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    bm = flex.create_block_mask(fn, batch, heads, length, length, device="cpu", BLOCK_SIZE=block, _compile=False)
    nq, nk = -(-length // block), -(-length // block)

    def dense(num, idx):
        out = torch.zeros(*num.shape, nk, dtype=torch.bool)  # (B, H, nq, nk)
        for pos in itertools.product(*map(range, num.shape)):
            out[pos][idx[pos][: int(num[pos])].long()] = True
        return out

    partial, full = dense(bm.kv_num_blocks, bm.kv_indices), dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    per = torch.full(partial.shape, EMPTY, dtype=torch.int8)
    per[partial], per[full] = 1, FULL
    per = per.flatten(0, 1)
    state = torch.full((nq, nk), 1, dtype=torch.int8)
    state[(per == FULL).all(0)], state[(per == EMPTY).all(0)] = FULL, EMPTY
    return state


@pytest.mark.parametrize(("fn", "pred"), FUNCTIONS, ids=[f.__name__ for f, _ in FUNCTIONS])
@pytest.mark.parametrize("block", [16, 32])
def test_from_function_blocks_equal_flex_create_block_mask(fn, pred, block):
    batch, heads = (2, 3) if fn is _per_head_window else (None, None)
    want = _flex_states(fn, batch, heads, 256, block)
    got = masks.from_function(fn).block_states(256, 256, block, block, batch=batch, heads=heads)
    assert torch.equal(got, want)


def test_from_function_ragged_blocks_count_real_pairs_only():
    """Flex pads the last block and calls it partial; attnkit counts real pairs, so it may
    call it full (no mask work). Everywhere else the two agree."""
    got = masks.from_function(_stripes).block_states(250, 250, 32, 32)
    flex = _flex_states(_stripes, None, None, 250, 32)
    assert torch.equal(got[:-1, :-1], flex[:-1, :-1])
    always = masks.from_function(lambda b, h, q_idx, kv_idx: q_idx >= 0, name="always")
    assert (always.block_states(250, 250, 32, 32) == FULL).all()
    assert masks.from_function(lambda *_: torch.tensor(True), name="constant").is_full(5, 5)  # a 0-d answer


def test_from_function_caches_its_block_states():
    calls = []

    def counted(b, h, q_idx, kv_idx):
        calls.append(1)
        return kv_idx <= q_idx

    m = masks.from_function(counted)
    first = m.block_states(300, 300, 64, 128)
    n = len(calls)
    assert m.block_states(300, 300, 64, 128) is first and len(calls) == n
    assert torch.equal(first, masks.causal().block_states(300, 300, 64, 128))
    m.block_states(300, 300, 32, 128)  # other block sizes are another entry
    assert len(calls) > n


def test_from_function_composes_and_prints():
    m = masks.from_function(_stripes, name="stripes") & masks.causal() | masks.global_tokens([0])
    assert "from_function(stripes)" in str(m) and "sparsity" in str(m)
    want = loops(9, 9, lambda b, i, j: ((i - j) % 5 == 0 and j <= i) or 0 in (i, j))[0]
    assert torch.equal(m.to_dense(9, 9), want)
    stripes = loops(9, 9, lambda b, i, j: (i - j) % 5 == 0)[0]
    assert torch.equal((~masks.from_function(_stripes)).to_dense(9, 9), ~stripes)


@pytest.mark.parametrize("backend", ["reference", "tiled", "auto"])
def test_from_function_runs_on_every_backend(backend, tiled_kernel):
    q, k, v = qkv(batch=2, heads=3, q_len=256, k_len=256, requires_grad=True)
    m = masks.from_function(_per_head_window)
    dense = torch.stack([torch.stack([loops(256, 256, lambda _, i, j, b=b, h=h: abs(i - j) <= 8 * (h + 1) + 16 * b)[0]
                                      for h in range(3)]) for b in range(2)])
    out = attnkit.attention(q, k, v, mask=m, backend=backend)
    ref = attnkit.attention(q, k, v, mask=dense, backend="reference")
    assert torch.allclose(out, ref, atol=1e-10)
    g, w = torch.autograd.grad(out.sum(), q), torch.autograd.grad(ref.sum(), q)
    assert torch.allclose(g[0], w[0], atol=1e-10)
    with pytest.raises(ValueError, match="only as a dense"):
        attnkit.attention(q, k, v, mask=m, backend="sdpa")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_from_function_accepts_a_flex_mask_mod_unchanged():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv(heads=2, q_len=128, k_len=128, dtype=torch.float32)
    out = attnkit.attention(q, k, v, mask=masks.from_function(_docs_causal), backend="tiled")
    bm = flex.create_block_mask(_docs_causal, None, None, 128, 128, device="cpu", _compile=False)
    want = flex.flex_attention(q, k, v, block_mask=bm)
    assert torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize(("fn", "error", "match"), [
    (lambda b, h, q_idx, kv_idx: 1 / 0, ValueError, "'bad' raised ZeroDivisionError"),
    (lambda b, h, q_idx, kv_idx: True, TypeError, "'bad' must return a bool tensor; got bool"),
    (lambda b, h, q_idx, kv_idx: q_idx - kv_idx, TypeError, "'bad' must return a bool tensor .* torch.int32"),
    (lambda b, h, q_idx, kv_idx: torch.ones(3, 3, dtype=torch.bool), ValueError,
     "'bad' must return one value per position; called with 0-d indices it returned shape \\(3, 3\\)"),
    (lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) if q_idx > 2 else q_idx < 0, ValueError,
     "'bad' raised RuntimeError.*per position through torch.vmap.*use torch.where instead of if"),
])
def test_from_function_bad_functions_get_clear_errors(fn, error, match):
    m = masks.from_function(fn, name="bad")
    with pytest.raises(error, match=match):
        m.block_states(8, 8, 4, 4)
    with pytest.raises(error, match=match):
        attnkit.attention(*qkv(q_len=8), mask=m, backend="reference")
    with pytest.raises(TypeError, match="callable"):
        masks.from_function("q >= k")


# -- Flex functions of both styles: broadcast index tensors, or 0-d indices as Flex's vmap gives them --------------

_FLEX_L = 45
_gen = torch.Generator().manual_seed(3)
_DOC = torch.randint(0, 3, (_FLEX_L,), generator=_gen).sort().values
_TABLE = torch.randn(3, _FLEX_L, _FLEX_L, generator=_gen)  # (H, L, L)
_VEC = torch.randn(_FLEX_L, 4, generator=_gen)
_INTERVAL = torch.tensor([0, 9])

FLEX_MASKS = {  # name: (mask_mod, style)
    "noop (0-d result)": (lambda b, h, q_idx, kv_idx: b.new_ones((), dtype=torch.bool), "broadcast"),
    "document": (lambda b, h, q_idx, kv_idx: _DOC[q_idx] == _DOC[kv_idx], "broadcast"),
    "interval[0]": (lambda b, h, q_idx, kv_idx: (q_idx - kv_idx >= _INTERVAL[0]) & (q_idx - kv_idx <= _INTERVAL[1]),
                    "broadcast"),
    "table[h][q][kv]": (lambda b, h, q_idx, kv_idx: _TABLE[h][q_idx][kv_idx] > -0.5, "per position"),
    "torch.dot": (lambda b, h, q_idx, kv_idx: torch.dot(_VEC[q_idx], _VEC[kv_idx]) > -1.0, "per position"),
    # broadcast runs, but .sum() reduces the whole block: the check against per-position calls catches it
    "sum as dot": (lambda b, h, q_idx, kv_idx: (_VEC[q_idx] * _VEC[kv_idx]).sum() > 0, "per position"),
}
FLEX_SCORES = {
    "relative": (lambda s, b, h, q_idx, kv_idx: s - 0.1 * (q_idx - kv_idx).abs(), "broadcast"),
    "table[h][q][kv]": (lambda s, b, h, q_idx, kv_idx: s + _TABLE[h][q_idx][kv_idx], "per position"),
    "torch.dot": (lambda s, b, h, q_idx, kv_idx: s + 0.3 * torch.dot(_VEC[q_idx], _VEC[kv_idx]), "per position"),
}


@functools.cache
def _one_call_per_pair(name: str, with_score: bool) -> torch.Tensor:
    """The function called once for each (b, h, i, j) of (2, 3, L, L) with 0-d tensors (a score of 0): (B, H, L, L)."""
    fn = FLEX_SCORES[name][0] if with_score else FLEX_MASKS[name][0]
    head = (torch.tensor(0.0),) if with_score else ()
    return torch.tensor([[[[float(fn(*head, *map(torch.tensor, (b, h, i, j)))) for j in range(_FLEX_L)]
                           for i in range(_FLEX_L)] for h in range(3)] for b in range(2)])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["reference", "tiled", "auto"])
@pytest.mark.parametrize("name", sorted(FLEX_MASKS))
def test_flex_mask_mods_of_both_styles_give_flex_answer(name, backend, tiled_kernel):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    fn, style = FLEX_MASKS[name]
    q, k, v = qkv(batch=2, heads=3, q_len=_FLEX_L, dtype=torch.float32)
    bm = flex.create_block_mask(fn, 2, 3, _FLEX_L, _FLEX_L, device="cpu", _compile=False)
    want = flex.flex_attention(q, k, v, block_mask=bm)
    m = masks.from_function(fn)
    out = attnkit.attention(q, k, v, mask=m, backend=backend)
    assert max_err(out, want) < 2e-6
    assert m.evaluator.per_position == (style == "per position")
    dense = _one_call_per_pair(name, with_score=False).bool()
    block = ScoreBlock(2, 3, 1, _FLEX_L, _FLEX_L, 0, _FLEX_L, 0, _FLEX_L, torch.device("cpu"))
    assert torch.equal(m.allowed(block).expand(block.shape).squeeze(3), dense)  # against one call per pair


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["reference", "tiled", "auto"])
@pytest.mark.parametrize("name", sorted(FLEX_SCORES))
def test_flex_score_mods_of_both_styles_give_flex_answer(name, backend, tiled_kernel):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    fn, style = FLEX_SCORES[name]
    q, k, v = qkv(batch=2, heads=3, q_len=_FLEX_L, dtype=torch.float32)
    want = flex.flex_attention(q, k, v, score_mod=fn)
    bias = attnkit.biases.score_mod(fn)
    assert max_err(attnkit.attention(q, k, v, bias=bias, backend=backend), want) < 2e-6
    assert bias.evaluator.per_position == (style == "per position")
    # gradients (Flex has no CPU backward): against the float64 reference with the bias as a dense tensor
    q, k, v = qkv(batch=2, heads=3, q_len=_FLEX_L, requires_grad=True)
    table = _one_call_per_pair(name, with_score=True).double()
    out = attnkit.attention(q, k, v, bias=attnkit.biases.score_mod(fn), backend=backend)
    ref = attnkit.attention(q, k, v, bias=table, backend="reference")
    assert max_err(out, ref) < 1e-6
    for got, expected in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        assert max_err(got, expected) < 1e-6


# -- the sparse patterns of the literature ------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_bigbird_random_blocks_follow_the_definition(seed):
    """Each query block gets exactly ``random_blocks`` key blocks outside its window (or
    all of them if fewer), the same for the same seed and lengths; other seeds differ."""
    m = masks.bigbird(window=1, global_tokens=0, random_blocks=2, block_size=4, seed=seed)
    lay = m.layout(64, 64)  # 16 x 16 blocks
    for r in range(16):
        outside = [c for c in range(16) if abs(r - c) > 1]
        extra = [c for c in outside if lay[r, c]]
        assert len(extra) == min(2, len(outside))
        assert all(lay[r, c] for c in range(16) if abs(r - c) <= 1)
    assert torch.equal(lay, masks.bigbird(1, 0, 2, 4, seed=seed).layout(64, 64))
    assert not torch.equal(lay, masks.bigbird(1, 0, 2, 4, seed=seed + 10).layout(64, 64))


def test_strided_with_causal_is_the_factorised_pattern_and_dilated_one_is_a_window():
    assert torch.equal((masks.strided(4) & masks.causal()).to_dense(30, 30), masks.strided(4).to_dense(30, 30))
    assert torch.equal(masks.dilated(5, 1).to_dense(20, 20), masks.sliding_window(4).to_dense(20, 20))


LITERATURE = [masks.chunked(64), masks.chunked(100) & masks.causal(), masks.strided(40), masks.dilated(200, 3),
              masks.bigbird(1, 3, 2, 32, seed=1),
              masks.from_blocks(torch.rand(5, 3, generator=torch.Generator().manual_seed(0)) > 0.5, 64, 128)]


@pytest.mark.parametrize("mask", LITERATURE, ids=repr)
@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_the_literature_runs_on_every_backend_and_skips_blocks(mask, backend, tiled_kernel):
    q, k, v = qkv(heads=2, q_len=300, k_len=300, requires_grad=True)
    out = attnkit.attention(q, k, v, mask=mask, backend=backend)
    ref = attnkit.attention(q, k, v, mask=mask.to_dense(300, 300), backend="reference")
    assert torch.allclose(out, ref, atol=1e-10)
    assert torch.allclose(torch.autograd.grad(out.sum(), k)[0], torch.autograd.grad(ref.sum(), k)[0], atol=1e-10)
    with pytest.raises(ValueError, match="only as a dense"):
        attnkit.attention(q, k, v, mask=mask, backend="sdpa")
    # the tiled backend's plan visits only the blocks the mask allows
    from attnkit.functional._call import make_call
    from attnkit.functional.tiled import choose
    from attnkit.functional.tiled.plan import chunk_plan

    call = make_call(q, k, v, mask=mask, bias=None, scale=None, softcap=None, dropout_p=0.0, return_lse=False)
    visited = sum(s.k_stop - s.k_start for c in chunk_plan(call, 64, choose(call)) for s in c.segments for _ in [c])
    state = mask.block_states(300, 300, 64, 128)
    assert (state == EMPTY).any() and visited < 5 * 300


# -- FlexAttention interop -------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("mask", [
    masks.chunked(96) & masks.causal(), masks.key_padding([200, 256]),
    *(pytest.param(m, marks=pytest.mark.slow) for m in (masks.causal(), masks.strided(50),
                                                        masks.from_function(_docs_causal),
                                                        masks.bigbird(1, 8, 1, 32, seed=2)))], ids=repr)
def test_to_flex_gives_flex_the_same_blocks_and_the_same_answer(mask):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    block_mask, mod = masks.to_flex(mask, 2, 2, 256, 256)
    want = flex.create_block_mask(mod, 2, 2, 256, 256, device="cpu", _compile=False)
    # per (b, h), Flex's own blocks: ours are the same, or coarser where the mask varies by batch
    ours, theirs = block_mask.to_dense(), want.to_dense()  # partial blocks
    if mask.extent() == (1, 1):
        assert torch.equal(ours.expand_as(theirs), theirs)
    q, k, v = qkv(batch=2, heads=2, q_len=256, k_len=256, dtype=torch.float32)
    out = flex.flex_attention(q, k, v, block_mask=block_mask)
    ref = attnkit.attention(q, k, v, mask=mask, backend="reference")
    rows = mask.to_dense(256, 256, batch=2).reshape(-1, 1, 256, 256).expand(2, 2, 256, 256).any(-1)
    assert torch.allclose(out[rows], ref[rows], atol=1e-5)  # rows without keys: Flex's convention differs


def test_to_flex_edges_are_partial_like_flex():
    pytest.importorskip("torch.nn.attention.flex_attention")
    block_mask, _ = masks.to_flex(masks.causal(), None, None, 200, 200)
    assert block_mask.full_kv_num_blocks.flatten().tolist() == [0, 0]  # block (1, 0) is full, but ragged
    assert block_mask.kv_num_blocks.flatten().tolist() == [1, 2]


# -- per-sequence alignment in padded batches -------------------------------------------------


def _flash_ref_mask(q_valid, k_valid, window=(-1, 0), left_padded=False):
    """flash-attn's ``attention_ref`` masking, from its definition (construct_local_mask plus
    the key padding mask): True = may attend. Sequence b has sq = q_valid[b].sum() real
    queries and sk real keys; its local positions count from its first real token."""
    batch, lq = q_valid.shape
    lk = k_valid.shape[1]
    out = torch.zeros(batch, lq, lk, dtype=torch.bool)
    for b in range(batch):
        sq, sk = int(q_valid[b].sum()), int(k_valid[b].sum())
        q_pad, k_pad = (lq - sq, lk - sk) if left_padded else (0, 0)
        for i, j in itertools.product(range(lq), range(lk)):
            row, col = i - q_pad, j - k_pad  # local positions
            if window[0] < 0:
                masked = col > row + sk - sq + window[1]
            else:
                masked = col > min(row + sk - sq + window[1], sk) or col < row + sk - sq - window[0]
            out[b, i, j] = not masked and bool(k_valid[b, j])
    return out


def test_the_issue_example_aligns_to_the_real_keys():
    m = masks.key_padding([3]) & masks.causal("bottom_right", k_lengths=[3])
    assert m.to_dense(2, 5).int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]


@pytest.mark.parametrize("left_padded", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("window", [(-1, 0), (3, 0), (2, 1)], ids=["causal", "window-3", "window-2-1"])
def test_per_sequence_alignment_follows_flash_attn_attention_ref(left_padded, window, tiled_kernel):
    q_lengths, k_lengths, lq, lk = torch.tensor([5, 2, 7, 1]), torch.tensor([9, 3, 11, 1]), 7, 140
    pos_q, pos_k = torch.arange(lq)[None, :], torch.arange(lk)[None, :]
    if left_padded:
        q_valid, k_valid = pos_q >= lq - q_lengths[:, None], pos_k >= lk - k_lengths[:, None]
    else:
        q_valid, k_valid = pos_q < q_lengths[:, None], pos_k < k_lengths[:, None]
    want = _flash_ref_mask(q_valid, k_valid, window, left_padded)
    padding = "left" if left_padded else "right"
    kw = dict(q_lengths=q_lengths, k_lengths=k_lengths, padding=padding)
    diag = masks.causal("bottom_right", **kw) if window[0] < 0 else \
        masks.sliding_window(window[0], window[1], "bottom_right", **kw)
    mask = masks.key_padding(valid=k_valid) & diag
    got = mask.to_dense(lq, lk, batch=4)[:, 0]
    assert torch.equal(got[q_valid], want[q_valid])  # padding query rows: flash-attn zeroes them
    # every backend gives the float64 reference's answer under the definition's dense mask
    q, k, v = qkv(batch=4, heads=2, q_len=lq, k_len=lk, requires_grad=True)
    ref = attnkit.attention(q, k, v, mask=want[:, None], backend="reference")
    for backend in ("reference", "tiled", "auto"):
        out = attnkit.attention(q, k, v, mask=mask, backend=backend)
        assert torch.allclose(out.transpose(1, 2)[q_valid], ref.transpose(1, 2)[q_valid], atol=1e-10), backend
    # and block states stay sound per sequence
    state = mask.block_states(lq, lk, 2, 16, batch=4)
    full = mask.to_dense(lq, lk, batch=4)[:, 0]
    for r, c in itertools.product(range(state.shape[0]), range(state.shape[1])):
        tile = full[:, 2 * r: 2 * r + 2, 16 * c: 16 * c + 16]
        assert state[r, c] != EMPTY or not tile.any()
        assert state[r, c] != FULL or tile.all()


def test_per_sequence_alibi_follows_flash_attn_attention_ref(tiled_kernel):
    """attention_ref's ALiBi without causal: -slope * |i + sk - sq - j| per sequence."""
    q_lengths, k_lengths, lq, lk = torch.tensor([3, 6]), torch.tensor([10, 4]), 6, 10
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    bias = attnkit.biases.alibi(slopes=slopes, align="bottom_right", q_lengths=q_lengths, k_lengths=k_lengths)
    want = torch.zeros(2, 2, lq, lk, dtype=torch.float64)
    for b, h, i, j in itertools.product(range(2), range(2), range(lq), range(lk)):
        want[b, h, i, j] = -slopes[h] * abs(i + int(k_lengths[b]) - int(q_lengths[b]) - j)
    assert torch.allclose(bias.to_dense(lq, lk, batch=2, heads=2).double(), want)
    q, k, v = qkv(batch=2, heads=2, q_len=lq, k_len=lk)
    ref = attnkit.attention(q, k, v, bias=want, backend="reference")
    for backend in ("reference", "tiled"):
        assert torch.allclose(attnkit.attention(q, k, v, bias=bias, backend=backend), ref, atol=1e-10)


def test_per_sequence_lengths_are_checked():
    with pytest.raises(ValueError, match="k_lengths must be <= Lk=4"):
        masks.causal("bottom_right", k_lengths=[5]).to_dense(2, 4)
    with pytest.raises(ValueError, match="k_lengths has 3 entries; expected 1 or batch=2"):
        attnkit.attention(*qkv(batch=2, q_len=4), mask=masks.causal(k_lengths=[1, 2, 3]))
    with pytest.raises(ValueError, match="padding must be one of"):
        masks.causal(k_lengths=[1], padding="middle")
    assert sdpa_form(masks.causal("bottom_right", k_lengths=[3]), 2, 5) is None


def _band_dense(form: masks.BandForm, batch: int, q_len: int, k_len: int) -> torch.Tensor:
    """The band form's predicate, pair by pair (B, Lq, Lk)."""
    out = torch.zeros(batch, q_len, k_len, dtype=torch.bool)
    for b in range(batch):
        lo, hi, kl = (int(t[b if t.numel() > 1 else 0]) for t in (form.lo, form.hi, form.key_lengths))
        for i in range(q_len):
            for j in range(k_len):
                ok = lo <= j - i <= hi and j < kl
                if form.q_ids is not None:
                    qb, kb = (b if t.shape[0] > 1 else 0 for t in (form.q_ids, form.kv_ids))
                    ok = ok and int(form.q_ids[qb, i]) == int(form.kv_ids[kb, j])
                out[b, i, j] = ok
    return out


@pytest.mark.parametrize("make", [
    lambda: masks.causal(),
    lambda: masks.causal("bottom_right"),
    lambda: masks.sliding_window(3, align="bottom_right") & masks.key_padding(lengths=[9, 5]),
    lambda: masks.causal(q_lengths=[4, 7], k_lengths=[6, 9], padding="left"),
    lambda: masks.document(torch.tensor([[0, 0, 0, 1, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2, 2]]))
    & masks.causal("bottom_right"),
])
def test_band_form_allows_exactly_the_masks_pairs(make):
    mask, batch, q_len, k_len = make(), 2, 7, 9
    form = band_form(mask, q_len, k_len)
    assert form is not None
    dense = mask.to_dense(q_len, k_len, batch=batch).reshape(-1, q_len, k_len).expand(batch, -1, -1)
    assert torch.equal(_band_dense(form, batch, q_len, k_len), dense)


def test_band_form_is_none_for_masks_it_cannot_describe():
    valid = torch.tensor([[True, False, True, True]])
    for mask in (masks.prefix_lm(2), masks.key_padding(valid=valid), ~masks.causal(), masks.causal() | masks.causal(),
                 masks.strided(2), masks.dilated(2, 4),
                 masks.document(torch.tensor([[0, 1, 1, 1]])) & masks.document(torch.tensor([[0, 0, 1, 1]]))):
        assert band_form(mask, 4, 4) is None, mask


def test_alibi_distance_form_gives_the_bias_values():
    from attnkit import biases
    from attnkit.functional.tiled import translate

    for bias in (biases.alibi(4), biases.alibi(4, align="bottom_right"),
                 biases.alibi(4, align="bottom_right", q_lengths=[3, 5], k_lengths=[6, 7], padding="left")):
        slopes, offsets = translate.distance_form(bias, 5, 7)
        i, j = torch.arange(5)[:, None], torch.arange(7)[None, :]
        built = torch.stack([-slopes.double()[:, None, None] * (i + int(o) - j).abs() for o in offsets])
        dense = bias.to_dense(5, 7, batch=2).double()
        assert torch.allclose(built.expand_as(dense), dense, atol=1e-6)
    assert translate.distance_form(biases.from_tensor(torch.zeros(1, 1, 5, 7)), 5, 7) is None
    with pytest.deprecated_call(match=r"Bias.distance_form\(\) is deprecated"):
        assert torch.equal(biases.alibi(4).distance_form(5, 7)[0], translate.distance_form(biases.alibi(4), 5, 7)[0])
    with pytest.deprecated_call(match="Bias.splits_by_side"):
        assert biases.alibi(4).splits_by_side and not biases.from_tensor(torch.zeros(5, 7)).splits_by_side
