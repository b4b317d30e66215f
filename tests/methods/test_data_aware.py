"""Fisher merging and RegMean: statistics from a model and data, and the closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merge.errors import UsageError
from merge.methods.fisher import compute_fisher, fisher
from merge.methods.regmean import compute_grams, regmean, shrink_off_diagonal

T = torch.tensor


def test_fisher_merge_hand_worked():
    x1, x2 = T([1.0, 2.0, 3.0]), T([3.0, 0.0, -1.0])
    f1, f2 = T([1.0, 0.0, 3.0]), T([1.0, 2.0, 1.0])
    # (w1 F1 x1 + w2 F2 x2)/(w1 F1 + w2 F2), F floored at eps = 1e-6
    out = fisher([x1, x2], weight=[1.0, 1.0], statistics=[f1, f2])
    torch.testing.assert_close(out, T([2.0, (1e-6 * 2 + 0) / (1e-6 + 2), (9 - 1) / 4]))


def test_fisher_without_statistics_is_refused():
    with pytest.raises(UsageError, match="method `fisher` needs one Fisher tensor per model"):
        fisher([torch.ones(2)], weight=[1.0])


def test_exact_fisher_of_softmax_regression_matches_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(16, 4)
    y = torch.randint(0, 3, (16,))
    f = compute_fisher(model, [(x[:8], y[:8]), (x[8:], y[8:])], kind="exact")
    # ∇_W log p_c = (e_c − p) xᵀ, so E_c[(·)²]_jk = p_j(1 − p_j) x_k²
    with torch.no_grad():
        p = torch.softmax(model(x), -1)  # (16, 3)
    v = p * (1 - p)
    torch.testing.assert_close(f["weight"], (v[:, :, None] * x[:, None, :] ** 2).mean(0))
    torch.testing.assert_close(f["bias"], v.mean(0))


def test_empirical_fisher_uses_labels():
    torch.manual_seed(1)
    model = nn.Linear(2, 2)
    x, y = torch.randn(5, 2), torch.randint(0, 2, (5,))
    f = compute_fisher(model, [(x, y)], kind="empirical")
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    g = torch.nn.functional.one_hot(y, 2) - p  # ∇_bias log p_y
    torch.testing.assert_close(f["bias"], (g**2).mean(0))
    with pytest.raises(UsageError, match="needs labels"):
        compute_fisher(model, [{"input": x}], kind="empirical")


def test_regmean_on_linear_regressions_is_the_joint_least_squares_fit():
    g = torch.Generator().manual_seed(2)
    d_in, d_out = 5, 3
    xs = [torch.randn(40, d_in, generator=g, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randn(40, d_out, generator=g, dtype=torch.float64) for _ in range(3)]
    models, grams = [], []
    for x, y in zip(xs, ys):
        w_t = torch.linalg.lstsq(x, y).solution  # (in, out): each task's own fit
        m = nn.Linear(d_in, d_out, bias=False)
        with torch.no_grad():
            m.weight.copy_(w_t.T)
        models.append(m.weight.detach().clone())
        grams.append(compute_grams(m, [(x.float(), y.float())], n_examples=1000)["weight"])
    merged = regmean(models, weight=[1.0] * 3, statistics=grams, alpha=1.0)
    joint = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T
    torch.testing.assert_close(merged.double(), joint, rtol=1e-4, atol=1e-5)


def test_regmean_shrink_and_fallback():
    gram = T([[4.0, 2.0], [2.0, 9.0]])
    torch.testing.assert_close(shrink_off_diagonal(gram, 0.5), T([[4.0, 1.0], [1.0, 9.0]]))
    # with α = 0 the Grams are diagonal: a per-input-column weighted mean
    w1, w2 = T([[1.0, 1.0]]), T([[3.0, 5.0]])
    g1, g2 = T([[1.0, 7.0], [7.0, 1.0]]), T([[1.0, 0.0], [0.0, 3.0]])
    out = regmean([w1, w2], weight=[1.0, 1.0], statistics=[g1, g2], alpha=0.0)
    torch.testing.assert_close(out, T([[(1 + 3) / 2, (1 + 15) / 4]]))
    # no statistics (a bias, a norm): weighted mean
    torch.testing.assert_close(regmean([w1, w2], weight=[3.0, 1.0]), T([[1.5, 2.0]]))


def test_regmean_wrong_gram_shape_is_named():
    with pytest.raises(UsageError, match=r"needs \(in, in\) = \(2, 2\) Gram matrices"):
        regmean([torch.ones(3, 2)], weight=[1.0], statistics=[torch.ones(3, 3)])


def test_statistics_file_names_are_refused_with_the_alternative():
    with pytest.raises(
        UsageError, match=r"`statistics: f.safetensors` names a file.*merge data-merge fisher"
    ):
        fisher([torch.ones(2)], weight=[1.0], statistics="f.safetensors")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"merge data-merge regmean"):
        regmean([torch.ones(2, 2)], weight=[1.0], statistics="g.safetensors")  # type: ignore[arg-type]
