"""The router math of `merge moe` (`merge.moe.gates`) on hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from merge.moe import gates as G


def test_gate_direction_subtracts_then_normalises_each_layer() -> None:
    pos = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    neg = torch.tensor([[3.0, 0.0], [1.0, -1.0]])
    # layer 0: (0, 4) -> (0, 1); layer 1: (0, 2) -> (0, 1)
    assert torch.equal(G.gate_direction(pos, neg), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    # without negatives: each row to unit length
    assert torch.allclose(G.gate_direction(pos, None), torch.tensor([[0.6, 0.8], [0.5**0.5] * 2]))


def test_gate_direction_of_identical_prompts_is_zero_not_nan() -> None:
    v = torch.tensor([[1.0, 2.0]])
    assert torch.equal(G.gate_direction(v, v.clone()), torch.zeros(1, 2))


def test_cheap_embed_vector_sums_real_tokens_only() -> None:
    # two prompts, three positions, hidden 2; the first position of prompt 2 is padding
    embedded = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[100.0, 100.0], [2.0, 0.0], [0.0, 0.0]]]
    )
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    # sum of real rows: (1,0)+(0,1)+(1,1)+(2,0)+(0,0) = (4, 2); normalised by √20
    expected = torch.tensor([4.0, 2.0]) / math.sqrt(20.0)
    assert torch.allclose(G.cheap_embed_vector(embedded, mask), expected)


def test_prompt_summary_last_token_and_average() -> None:
    h = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)  # (prompts, tokens, hidden)
    # last tokens: (4, 5) and (10, 11) -> mean (7, 8)
    assert torch.equal(G.prompt_summary(h, average=False), torch.tensor([7.0, 8.0]))
    # mean over positions: (2, 3) and (8, 9) -> mean (5, 6)
    assert torch.equal(G.prompt_summary(h, average=True), torch.tensor([5.0, 6.0]))


def test_random_gates_are_one_seeded_standard_normal_draw() -> None:
    torch.manual_seed(7)  # what mergekit's --random-seed 7 does before its one draw
    expected = torch.randn((3, 4, 8))
    assert torch.equal(G.random_gates(3, 4, 8, seed=7), expected)
    assert not torch.equal(G.random_gates(3, 4, 8, seed=8), expected)


def test_uniform_gates_match_linear_init_bounds() -> None:
    g = G.uniform_gates(2, 3, 16, seed=0)
    bound = 1 / math.sqrt(16)
    assert g.shape == (2, 3, 16)
    assert float(g.abs().max()) <= bound
    torch.manual_seed(0)
    assert torch.equal(g, torch.rand((2, 3, 16)) * 2 * bound - bound)


@pytest.mark.parametrize(
    ("rows", "large"),
    [([[1.0, 0.0], [0.0, 1.0]], False), ([[1.0, 0.0], [1.0, 0.01]], True)],
)
def test_condition_numbers_flag_nearly_parallel_rows(rows: list[list[float]], large: bool) -> None:
    (c,) = G.condition_numbers(torch.tensor([rows]))
    assert (c > 5.0) == large
