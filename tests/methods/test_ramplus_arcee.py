"""ramplus_tl (RAM+) and arcee_fusion: hand-worked values and mergekit 0.1.5 as the oracle."""

from __future__ import annotations

import pytest
import torch

from merge.methods import get_method


def T(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


@pytest.mark.parametrize("alpha,want", [(1.0, T(1.0, 1.5, 3.0, 0.0)), (0.2, T(1.0, 1.1, 2.2, 0.0))])
def test_ramplus_hand_worked(alpha, want):
    # a1 = [1,1,0,0], a2 = [1,0,1,0]: entry 0 shared (averaged), 1 and 2 unique to one model.
    # Each model shares 1 entry and owns 1: ρ = 1, λ = 1 + 0.5·min(1, α).
    out = get_method("ramplus_tl").fn(
        [T(1, 1, 0, 0), T(1, 0, 2, 0)], base=torch.zeros(4), r=0.5, alpha=alpha
    )
    torch.testing.assert_close(out, want)


def test_ramplus_without_unique_entries_is_ram():
    xs = [T(1.0, -2.0, 0.75), T(3.0, -1.0, 0.25)]  # every entry changed by both
    base = T(0.5, 0.5, 0.5)
    plus = get_method("ramplus_tl").fn(xs, base=base, r=0.9, alpha=5.0)
    torch.testing.assert_close(plus, get_method("ram").fn(xs, base=base))


def test_arcee_fusion_keeps_only_outliers_of_importance():
    # One row: KL is one number k > 0, so importance = k·|x|; sorted indices ⌊q·7⌋ = 1, 3, 5
    # give Q1 = 2k, Q2 = 4k, Q3 = 6k and threshold 4k + 1.5·4k = 10k: only 100 survives.
    x = T(1, 2, 3, 4, 5, 6, 7, 100)
    out = get_method("arcee_fusion").fn([x], base=torch.zeros(8))
    torch.testing.assert_close(out, T(0, 0, 0, 0, 0, 0, 0, 100))


def test_arcee_fusion_per_row_kl_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    x = base + torch.randn(6, 5, generator=g) * 0.5
    p, q = x.softmax(-1) + 1e-8, base.softmax(-1) + 1e-8
    imp = (x - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = imp.flatten().sort().values
    # ⌊0.25·29⌋ = 7, ⌊0.5·29⌋ = 14, ⌊0.75·29⌋ = 21
    thr = s[14] + 1.5 * (s[21] - s[7])
    want = torch.where(imp >= thr, x, base)
    torch.testing.assert_close(get_method("arcee_fusion").fn([x], base=base), want)


mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402


@pytest.mark.parametrize("shape", [(12, 9), (64,), (3, 4, 5)])
@pytest.mark.parametrize("params", [{"r": 0.05, "alpha": 1.0}, {}])
def test_ramplus_matches_mergekit(shape, params):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(*shape, generator=g)
    # sparse task vectors so that entries are unique to one model, shared, or untouched
    xs = [
        base + torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < 0.5)
        for _ in range(3)
    ]
    mk = mk_registry.get("ramplus_tl")
    defaults = {p.name: p.default for p in mk.spec.parameters if p.default is not None}
    ref = mk.merge_group(
        TensorGroup.from_tensors([base, *xs], base_index=0), **{**defaults, **params}
    )
    torch.testing.assert_close(get_method("ramplus_tl").fn(xs, base=base, **params), ref)


@pytest.mark.parametrize("shape", [(12, 9), (64,), (40, 30)])
def test_arcee_fusion_matches_mergekit(shape):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(*shape, generator=g)
    x = base + torch.randn(*shape, generator=g) * 0.3
    ref = mk_registry.get("arcee_fusion").merge_group(
        TensorGroup.from_tensors([base, x], base_index=0)
    )
    torch.testing.assert_close(get_method("arcee_fusion").fn([x], base=base), ref)
