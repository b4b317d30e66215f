"""Exact selection pieces of the streamed TIES trim, against sorts done by hand."""

from __future__ import annotations

import math

import pytest
import torch

from merge.methods.selection import keep_top, nth_largest_nonneg, trim_below


@pytest.mark.parametrize("seed", range(5))
def test_nth_largest_matches_a_sort_with_many_ties(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # bf16-rounded magnitudes: a few hundred distinct values, so the n-th largest is tied
    vals = torch.randn(50_000, generator=g).abs().bfloat16().float()
    ordered = vals.sort(descending=True).values
    for need in (1, 7, 10_000, 25_001, 50_000):
        t, taken, equal = nth_largest_nonneg(vals, need)
        assert t == float(ordered[need - 1])
        assert equal == int((vals == t).sum())
        assert taken == need - int((vals > t).sum())


def test_nth_largest_of_zeros_and_subnormals() -> None:
    vals = torch.tensor([0.0, 0.0, 1e-45, 3.0, 0.0])
    assert nth_largest_nonneg(vals, 1) == (3.0, 1, 1)
    assert nth_largest_nonneg(vals, 2) == (pytest.approx(1e-45), 1, 1)
    assert nth_largest_nonneg(vals, 4) == (0.0, 2, 3)


def test_trim_below_keeps_ties_unless_strict() -> None:
    x = torch.tensor([0.5, -1.0, 1.0, 2.0, -0.999])
    assert trim_below(x, 1.0).tolist() == [0.0, -1.0, 1.0, 2.0, 0.0]
    assert trim_below(x, 1.0, strict=True).tolist() == [0.0, 0.0, 0.0, 2.0, 0.0]
    assert trim_below(x, math.inf).tolist() == [0.0] * 5
    assert trim_below(x.double(), 1.0).tolist() == [0.0, -1.0, 1.0, 2.0, 0.0]


@pytest.mark.parametrize("start", [0, 3, 6, 10])
def test_keep_top_drops_ties_from_the_cut_on(start: int) -> None:
    # flat elements [start, start + 6); ties at |d| = 1 are kept below index 8 only
    d = torch.tensor([1.0, -1.0, 3.0, 0.5, -1.0, 1.0])
    got = keep_top(d.clone(), start, 1.0, cut=8)
    want = [
        0.0 if abs(v) < 1.0 or (abs(v) == 1.0 and start + i >= 8) else v
        for i, v in enumerate(d.tolist())
    ]
    assert got.tolist() == want
