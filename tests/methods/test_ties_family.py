"""TIES, DARE, breadcrumbs, DELLA: hand-worked three-element cases and peft oracles."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from merge.errors import UsageError
from merge.methods.breadcrumbs import breadcrumbs
from merge.methods.dare import dare_linear, dare_ties
from merge.methods.della import della, della_linear
from merge.methods.selection import kth_largest_abs, trim
from merge.methods.sparsify import breadcrumbs_band, della_probabilities
from merge.methods.ties import ties

T = torch.tensor


def test_ties_hand_worked_paper():
    base = T([1.0, 1.0, 1.0])
    # δ1 = [0.5, -2, 0.1], δ2 = [0.3, 1, -0.4]
    x1, x2 = base + T([0.5, -2.0, 0.1]), base + T([0.3, 1.0, -0.4])
    # density 2/3 keeps ⌊2/3·3⌋ = 2 entries: δ̂1 = [0.5, -2, 0], δ̂2 = [0, 1, -0.4].
    # sign of the sum [0.5, -1, -0.4] → [+, -, -]; agreeing: e0 {1}, e1 {1}, e2 {2}.
    # dis-mean with weights (1, 0.5): [0.5/1, -2/1, 0.5*-0.4/1] = [0.5, -2, -0.2]
    out = ties([x1, x2], base=base, weight=[1.0, 0.5], density=[2 / 3, 2 / 3])
    torch.testing.assert_close(out, base + T([0.5, -2.0, -0.2]))


def test_ties_mergekit_normalises_by_agreeing_weights():
    base = torch.zeros(3)
    x1, x2 = T([1.0, 2.0, -1.0]), T([3.0, -1.0, -3.0])
    # ω1 = 1·δ1, ω2 = 0.5·δ2 = [1.5, -0.5, -1.5]; sum [2.5, 1.5, -2.5] → [+, +, -]
    # e0: both agree → (1 + 1.5)/(1 + 0.5) = 5/3; e1: only 1 → 2/1; e2: both → (-1 - 1.5)/1.5
    mk = ties([x1, x2], base=base, weight=[1.0, 0.5], density=[1.0, 1.0], compat="mergekit")
    torch.testing.assert_close(mk, T([5 / 3, 2.0, -2.5 / 1.5]))
    # paper: dis-mean by count: e0 (1 + 1.5)/2, e1 2/1, e2 (-1 - 1.5)/2
    paper = ties([x1, x2], base=base, weight=[1.0, 0.5], density=[1.0, 1.0])
    torch.testing.assert_close(paper, T([1.25, 2.0, -1.25]))


def test_ties_count_election():
    base = torch.zeros(1)
    xs = [T([-5.0]), T([1.0]), T([1.0])]
    # sum → −3 (−); count → +1 (+)
    assert float(ties(xs, base=base, weight=[1] * 3, density=[1] * 3)) == -5.0
    assert float(ties(xs, base=base, weight=[1] * 3, density=[1] * 3, elect="count")) == 1.0


@pytest.mark.parametrize("elect,peft_method", [("sum", "total"), ("count", "frequency")])
def test_ties_matches_peft(elect, peft_method):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 30, generator=g)
    xs = [base + torch.randn(40, 30, generator=g) for _ in range(3)]
    w = [1.0, 0.7, 0.4]
    ours = ties(xs, base=base, weight=w, density=[0.3] * 3, elect=elect, scale=0.8)
    ref = merge_utils.ties([x - base for x in xs], torch.tensor(w), 0.3, peft_method)
    torch.testing.assert_close(ours, base + 0.8 * ref)


def test_ties_full_density_agreeing_signs_is_the_mean():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(50, generator=g)
    deltas = [torch.rand(50, generator=g) + 0.1 for _ in range(4)]  # all positive
    out = ties([base + d for d in deltas], base=base, weight=[1.0] * 4, density=[1.0] * 4)
    torch.testing.assert_close(out, base + torch.stack(deltas).mean(0))


def test_trim_and_threshold_agree_with_sorting():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300_000, generator=g)  # above SMALL: exercises the sample bracket
    for k in (1, 7, 60_000, 299_999, 300_000):
        want = float(x.abs().sort(descending=True).values[k - 1])
        assert kth_largest_abs(x, k) == want
        assert kth_largest_abs(x, k, method="bracket") == want
    t = trim(x, 0.2)
    assert int((t != 0).sum()) == 60_000
    torch.testing.assert_close(t, merge_utils.magnitude_based_pruning(x, 0.2))


def test_dare_linear_hand_worked_and_peft(monkeypatch):
    base = torch.zeros(3)
    x = T([2.0, -4.0, 6.0])
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, generator=torch.Generator().manual_seed(0)) + 0.5 >= 1  # u ≥ 1 − d
    out = dare_linear([x], base=base, weight=[1.0], density=[0.5], generator=g)
    # kept entries doubled (1/0.5), dropped ones zero
    torch.testing.assert_close(out, torch.where(keep, 2 * x, 0.0))
    # peft's dare_linear with the same mask is the same formula: Σ w (m⊙δ/d)
    monkeypatch.setattr(torch, "bernoulli", lambda p: keep.to(p.dtype))
    ref = merge_utils.dare_linear([x], torch.tensor([1.0]), 0.5)
    torch.testing.assert_close(out, ref)


def test_dare_ties_matches_peft_with_the_same_masks(monkeypatch):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(20, 10, generator=g)
    xs = [base + torch.randn(20, 10, generator=g) for _ in range(3)]
    ours = dare_ties(
        xs,
        base=base,
        weight=[1.0, 0.5, 0.8],
        density=[0.4] * 3,
        normalize=True,
        generator=torch.Generator().manual_seed(9),
    )
    # the same draws: one generator, model by model, keep where u ≥ 1 − density
    gm = torch.Generator().manual_seed(9)
    masks = iter([torch.rand(20, 10, generator=gm) + 0.4 >= 1 for _ in range(3)])
    monkeypatch.setattr(torch, "bernoulli", lambda p: next(masks).to(p.dtype))
    ref = merge_utils.dare_ties([x - base for x in xs], torch.tensor([1.0, 0.5, 0.8]), 0.4)
    torch.testing.assert_close(ours, base + ref)


def test_dare_is_unbiased_monte_carlo():
    delta = T([0.5, -1.0, 2.0])
    g = torch.Generator().manual_seed(5)
    runs = torch.stack(
        [
            dare_linear([delta], base=torch.zeros(3), weight=[1.0], density=[0.3], generator=g)
            for _ in range(20_000)
        ]
    )
    # std of one draw is |δ|·sqrt((1−d)/d) ≈ 1.53|δ|; of the mean ≈ 0.011|δ|
    torch.testing.assert_close(runs.mean(0), delta, atol=0.06, rtol=0.0)


def test_dare_mergekit_rescale_matches_l1_norm():
    x = T([1.0, -2.0, 3.0, 4.0])
    out = dare_linear(
        [x],
        base=torch.zeros(4),
        weight=[1.0],
        density=[0.5],
        compat="mergekit",
        generator=torch.Generator().manual_seed(1),
    )
    kept = out != 0
    torch.testing.assert_close(out.abs().sum(), x.abs().sum())
    torch.testing.assert_close(
        out[kept] / x[kept], torch.full((int(kept.sum()),), 10 / float(x[kept].abs().sum()))
    )


def test_dare_seeded_is_deterministic():
    x = torch.randn(100)
    a = dare_ties(
        [x, -x],
        base=torch.zeros(100),
        weight=[1, 1],
        density=[0.5, 0.5],
        generator=torch.Generator().manual_seed(3),
    )
    b = dare_ties(
        [x, -x],
        base=torch.zeros(100),
        weight=[1, 1],
        density=[0.5, 0.5],
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(a, b)


def test_breadcrumbs_paper_band_per_row():
    # one row of 10: magnitudes 1..10; γ = 0.1 drops the top 1 (10), density 0.5 keeps the
    # next 5 (9, 8, 7, 6, 5); the rest is zero.
    d = T([[1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, -8.0, 9.0, 10.0]])
    out = breadcrumbs_band(d, 0.5, 0.1, compat="paper")
    torch.testing.assert_close(out, T([[0.0, 0, 0, 0, -5.0, 6.0, 7.0, -8.0, 9.0, 0.0]]))


def test_breadcrumbs_mergekit_edge_cases():
    d = T([1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, -8.0, 9.0, 10.0])
    # N = 10, n_top = ⌊0.1·10⌋ = 1, n_bot = 10 − 5 − 1 = 4: keep ascending ranks 4..8 (5 to 9)
    out = breadcrumbs_band(d, 0.5, 0.1, compat="mergekit")
    torch.testing.assert_close(out, T([0.0, 0, 0, 0, -5.0, 6.0, 7.0, -8.0, 9.0, 0.0]))
    # γ·N < 1 → n_top = 0: mergekit 0.1.5 keeps the top 5 (0.1.4 zeroed everything)
    top5 = T([0.0, 0, 0, 0, 0, 6.0, 7.0, -8.0, 9.0, 10.0])
    torch.testing.assert_close(breadcrumbs_band(d, 0.5, 0.05, compat="mergekit"), top5)
    # density + γ > 1: n_bot = max(0, 10 − 9 − 2) = 0, keep the 9 smallest (only 1 outlier goes)
    torch.testing.assert_close(
        breadcrumbs_band(d, 0.9, 0.2, compat="mergekit"), torch.cat([d[:9], T([0.0])])
    )
    # density 1 is a no-op in mergekit, but still drops the top γ in the paper's band
    assert torch.equal(breadcrumbs_band(d, 1.0, 0.1, compat="mergekit"), d)
    assert float(breadcrumbs_band(d, 1.0, 0.1, compat="paper")[-1]) == 0.0


def test_breadcrumbs_method_sums_masked_vectors():
    base = torch.ones(1, 10)
    d = T([[1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, -8.0, 9.0, 10.0]])
    out = breadcrumbs(
        [base + d, base + d],
        base=base,
        weight=[1.0, 0.5],
        density=[0.5] * 2,
        gamma=[0.1] * 2,
        scale=2.0,
    )
    band = T([[0.0, 0, 0, 0, -5.0, 6.0, 7.0, -8.0, 9.0, 0.0]])
    torch.testing.assert_close(out, base + 2.0 * 1.5 * band)


def test_della_probabilities_hand_worked():
    # ranks of |[0.1, -3, 2]| (1 = smallest) are 1, 3, 2: p = d − ε + 2ε(r − 1)/(n − 1)
    p = della_probabilities(T([0.1, -3.0, 2.0]), 0.5, 0.2)
    torch.testing.assert_close(p, T([0.3, 0.7, 0.5]))


def test_della_paper_rescales_by_one_over_p():
    x = T([0.1, -3.0, 2.0])
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(3, generator=torch.Generator().manual_seed(7)) + T([0.3, 0.7, 0.5]) >= 1
    out = della_linear(
        [x], base=torch.zeros(3), weight=[1.0], density=[0.5], epsilon=[0.2], generator=g
    )
    torch.testing.assert_close(out, torch.where(keep, x / T([0.3, 0.7, 0.5]), 0.0))


def test_della_is_unbiased_monte_carlo():
    x = T([0.1, -3.0, 2.0])
    g = torch.Generator().manual_seed(8)
    runs = torch.stack(
        [
            della_linear(
                [x], base=torch.zeros(3), weight=[1.0], density=[0.5], epsilon=[0.2], generator=g
            )
            for _ in range(20_000)
        ]
    )
    torch.testing.assert_close(runs.mean(0), x, atol=0.08, rtol=0.0)


def test_della_window_outside_unit_interval_is_refused():
    with pytest.raises(UsageError, match=r"keep probabilities span \[-0.05, 0.25\]"):
        della([torch.ones(3)], base=torch.zeros(3), weight=[1.0], density=[0.1], epsilon=[0.15])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval_is_refused(density):
    with pytest.raises(UsageError, match=r"`density` of model 1 is .* outside \(0, 1\]"):
        ties([torch.ones(3)], base=torch.zeros(3), weight=[1.0], density=[density])


def test_unknown_election_and_compat_are_named():
    with pytest.raises(
        UsageError, match=r"`elect: summ` is not one of sum, count \(did you mean `sum`\?\)"
    ):
        ties([torch.ones(3)], base=torch.zeros(3), weight=[1.0], density=[1.0], elect="summ")
    with pytest.raises(UsageError, match=r"`compat: mergkit` is not one of paper, mergekit"):
        ties([torch.ones(3)], base=torch.zeros(3), weight=[1.0], density=[1.0], compat="mergkit")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bracket_threshold_is_exact_on_tied_bf16_values(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(400_000, generator=g).bfloat16().float()
    x = (base + 0.1 * torch.randn(400_000, generator=g)).bfloat16().float()  # many equal |δ|
    a = (x - base).abs().sort(descending=True).values
    for k in (1, 399, 80_000, 200_001, 399_999, 400_000):
        assert kth_largest_abs(x, k, minus=base, method="bracket") == float(a[k - 1])


def test_scope_model_uses_one_threshold_over_the_whole_model():
    from merge.methods.selection import model_magnitude_threshold

    g = torch.Generator().manual_seed(6)
    shapes = [(300, 200), (50,), (400, 100)]
    base = [torch.randn(s, generator=g) for s in shapes]
    # model 1 changes the first tensor a lot, the others little: a global top-k keeps mostly it
    ft = [b + torch.randn(b.shape, generator=g) * s for b, s in zip(base, (3.0, 0.1, 0.1))]
    numels = [b.numel() for b in base]
    thr = model_magnitude_threshold(lambda: zip(ft, base), numels, 0.2)
    flat = torch.cat([(f - b).reshape(-1) for f, b in zip(ft, base)]).abs()
    assert thr == float(flat.sort(descending=True).values[int(0.2 * flat.numel()) - 1])
    # trimming each tensor with it equals the paper's global top-k (reference: flattened vector)
    outs = [
        ties([f], base=b, weight=[1.0], density=[0.2], threshold=[thr], scope="model")
        for f, b in zip(ft, base)
    ]
    kept = sum(int(((o - b) != 0).sum()) for o, b in zip(outs, base))
    assert kept == int(0.2 * flat.numel())
    assert int(((outs[0] - base[0]) != 0).sum()) > 0.9 * kept
    with pytest.raises(
        UsageError, match="`scope: model` needs each model's model-wide `threshold`"
    ):
        ties([ft[0]], base=base[0], weight=[1.0], density=[0.2], scope="model")


def test_tiny_density_keeps_nothing_in_paper_mode_and_one_entry_in_mergekit_mode():
    base = torch.zeros(3)
    x = T([0.5, -2.0, 0.1])
    # ⌊0.2·3⌋ = 0: paper/peft keep nothing; mergekit 0.1.5 keeps at least the largest
    torch.testing.assert_close(ties([x], base=base, weight=[1.0], density=[0.2]), base)
    mk = ties([x], base=base, weight=[1.0], density=[0.2], compat="mergekit")
    torch.testing.assert_close(mk, T([0.0, -2.0, 0.0]))
