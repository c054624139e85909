"""Head roles of cross-attention maps (rows: target tokens, keys: source tokens), on hand-built
maps whose answers are known: a perfect diagonal, a reversed alignment, uniform attention."""

from __future__ import annotations

import pytest
import torch

from attnkit.inspect import AttentionMaps, head_roles, top_attended
from attnkit.inspect.roles import CROSS_ROLES, alignment_monotonicity, diagonal_score, top_key_share


def _stack(*maps: torch.Tensor) -> torch.Tensor:
    """(1 layer, len(maps) heads, Lq, Lk)."""
    return torch.stack(maps)[None].double()


def test_a_perfect_diagonal_a_reversed_alignment_and_uniform_attention():
    eye, rev, uni = torch.eye(5), torch.eye(5).flip(-1), torch.full((5, 5), 0.2)
    roles = head_roles(_stack(eye, rev, uni), cross=True)
    assert tuple(roles.scores) == CROSS_ROLES
    # monotonicity: 4 forward steps of 4; 0 of 4; a uniform row's argmax is the earliest key, which never moves
    assert roles["monotonicity"].tolist() == [[1.0, 0.0, 1.0]]
    # diagonal (Lq == Lk: j == i): every row; only the middle row (2, 2) of the reversed map; 1/5 of each uniform row
    torch.testing.assert_close(roles["diagonal"], torch.tensor([[1.0, 0.2, 0.2]], dtype=torch.float64))
    # each key gets one row's whole weight (1 of 5 rows), also uniform: 5 * 0.2 of 5
    torch.testing.assert_close(roles["top_key"], torch.full((1, 3), 0.2, dtype=torch.float64))
    torch.testing.assert_close(roles["normalized_entropy"], torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))
    assert set(roles.skipped) == {"previous_token", "duplicate_token", "induction", "mean_distance"}


def test_a_stretched_diagonal_when_the_source_is_longer_or_shorter():
    longer = torch.zeros(3, 6)
    longer[[0, 1, 2], [1, 2, 5]] = 1.0  # row i's span is keys 2i..2i+1: rows 0 and 2 on it, row 1 at key 2 too
    assert diagonal_score(longer).item() == 1.0
    off = torch.zeros(3, 6)
    off[[0, 1, 2], [2, 0, 3]] = 1.0  # none on its span; the argmax goes 2 -> 0 (back) -> 3 (forward)
    assert diagonal_score(off).item() == 0.0 and alignment_monotonicity(off).item() == 0.5
    shorter = torch.zeros(6, 3)
    shorter[torch.arange(6), torch.arange(6) // 2] = 1.0  # rows 2j, 2j+1 on key j
    assert diagonal_score(shorter).item() == 1.0 and alignment_monotonicity(shorter).item() == 1.0
    uniform = torch.full((3, 6), 1 / 6)
    assert diagonal_score(uniform).item() == pytest.approx(1 / 3)  # each row's span holds 2 of 6 keys
    assert top_key_share(uniform).item() == pytest.approx(1 / 6)


def test_a_masked_row_drops_out_of_monotonicity():
    attn = torch.eye(4).flip(-1)
    attn[1] = 0.0  # row 1 sees no key: the steps are 0 -> 2 -> 3, keys 3 -> 1 -> 0
    assert alignment_monotonicity(attn).item() == 0.0
    assert torch.isnan(alignment_monotonicity(torch.eye(1, 3))).item()  # one row: no step


def _cross_maps() -> AttentionMaps:
    attn = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.0, 0.3, 0.7], [0.0, 0.1, 0.9]])  # (T=4, S=3)
    return AttentionMaps(attentions=[attn[None, None]], tokens=[["<s>", "la", "rive", "</s>"]],
                         token_ids=[[0, 5, 6, 2]], model_name="toy", layers=(0,), heads=(0,),
                         key_tokens=[["the", "bank", "</s>"]], key_token_ids=[[7, 8, 2]])


def test_cross_maps_are_recognised_and_self_attention_roles_refused():
    maps = _cross_maps()
    roles = head_roles(maps)
    assert "monotonicity" in roles.scores and "previous_token" in roles.skipped
    for role in ("previous_token", "induction", "mean_distance", "duplicate_token"):
        with pytest.raises(ValueError, match=f"role '{role}' is defined for self-attention maps only"):
            head_roles(maps, roles=[role])
    with pytest.raises(ValueError, match="'diagonal' is defined for cross-attention maps only"):
        head_roles(torch.eye(3)[None, None], roles="diagonal")
    with pytest.raises(ValueError, match="needs key_set"):
        head_roles(maps, roles=["token_set_mass"])
    with pytest.raises(ValueError, match="roles must name roles among"):
        head_roles(maps, roles=["syntax"])
    with pytest.raises(ValueError, match="cross=False says self-attention"):
        head_roles(maps, cross=False)
    # monotone: argmax 0, 1, 2, 2. Row i covers [3i/4, 3(i+1)/4) of the source, overlapping keys
    # {0}, {0, 1}, {1, 2}, {2}
    chosen = head_roles(maps, roles=["monotonicity", "diagonal", "token_set_mass"], key_set=[1])
    assert tuple(chosen.scores) == ("monotonicity", "diagonal", "token_set_mass")
    assert chosen["monotonicity"].item() == 1.0
    assert chosen["diagonal"].item() == pytest.approx((0.7 + (0.1 + 0.8) + (0.3 + 0.7) + 0.9) / 4)
    assert chosen["token_set_mass"].item() == pytest.approx((0.2 + 0.8 + 0.3 + 0.1) / 4)


def test_top_attended_on_cross_maps_names_the_source_tokens():
    top = top_attended(_cross_maps(), layer=0, head=0, k=1)
    assert [row[0][1] for row in top] == ["the", "bank", "</s>", "</s>"]
