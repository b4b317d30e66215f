"""Fisher merging and RegMean: statistics from a model and data, and the closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merge.errors import ExecutionError, MergeWarning, UsageError
from merge.methods.data_aware import merge_with_data
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


# -- issue 14.4: per-position Fisher -----------------------------------------------------------


class _TokenClassifier(nn.Module):
    """Logits (1, P, C) from inputs (1, P, d): every position is its own sample."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_exact_fisher_squares_each_position_on_its_own():
    torch.manual_seed(4)
    model = _TokenClassifier()
    x = torch.randn(5, 2, 3)  # 5 examples, 2 positions
    f = compute_fisher(model, [(x, None)], kind="exact")
    # per position s: E_c[(∇_W log p_c)²]_jk = p_j(1 − p_j) x_k², averaged over the 10 samples
    with torch.no_grad():
        p = torch.softmax(model(x), -1).reshape(10, 4)
    xs = x.reshape(10, 3)
    v = p * (1 - p)
    torch.testing.assert_close(f["head.weight"], (v[:, :, None] * xs[:, None, :] ** 2).mean(0))
    torch.testing.assert_close(f["head.bias"], v.mean(0))


def test_empirical_and_sampled_fisher_per_position_against_autograd():
    torch.manual_seed(5)
    model = _TokenClassifier()
    x = torch.randn(3, 2, 3)
    y = torch.randint(0, 4, (3, 2))
    y[1, 0] = -100  # ignored position
    f = compute_fisher(model, [(x, y)], kind="empirical")
    # reference: one autograd call per (example, position), squared, averaged over the 5 kept
    ref = torch.zeros(4)
    for i in range(3):
        for s in range(2):
            if y[i, s] == -100:
                continue
            model.zero_grad()
            torch.log_softmax(model(x[i : i + 1]), -1)[0, s, y[i, s]].backward()
            ref += model.head.bias.grad**2
    torch.testing.assert_close(f["head.bias"], ref / 5)
    # sampled: the same per-position squares; deterministic under its seed
    a = compute_fisher(model, [(x, None)], kind="sampled", seed=3)
    b = compute_fisher(model, [(x, None)], kind="sampled", seed=3)
    torch.testing.assert_close(a["head.weight"], b["head.weight"])


# -- issue 14.5: RegMean with dead inputs, weights, averaged Grams, skipped layers -----------


def test_regmean_dead_inputs_keep_the_weighted_mean_and_fit_the_rest():
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(30, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    for x in xs:
        x[:, 1] = 0.0  # an input no example ever excites (a dead unit upstream)
    ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [(x.T @ x / len(x)).float() for x in xs]
    out = regmean([w.float() for w in ws], weight=[1.0, 1.0], statistics=grams, alpha=1.0)
    # column 1: the data says nothing, so the weighted mean; columns 0, 2, 3: the joint
    # least-squares fit of the targets X_i W_iᵀ on the live inputs (the RegMean objective)
    torch.testing.assert_close(out[:, 1], ((ws[0] + ws[1]) / 2)[:, 1].float())
    live = [0, 2, 3]
    xl = torch.cat([x[:, live] for x in xs])
    yl = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    joint = torch.linalg.lstsq(xl, yl).solution.T  # (out, 3)
    torch.testing.assert_close(out[:, live].double(), joint, rtol=1e-4, atol=1e-5)


def test_data_merge_regmean_with_a_dead_unit_warns_and_keeps_the_weights():
    torch.manual_seed(7)

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

    states = []
    for _ in range(2):
        m = make_model()
        with torch.no_grad():
            m[0].bias[2] = -100.0  # unit 2 never fires: input 2 of layer `2` is always zero
        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    data = [(torch.randn(16, 3), torch.zeros(16, dtype=torch.long))]
    with pytest.warns(MergeWarning, match=r"RegMean: `2\.weight`: 1 of 4 input features were zero"):
        merged = merge_with_data("regmean", states, make_model=make_model, data=[data])
    mean = (states[0]["2.weight"] + states[1]["2.weight"]) / 2
    torch.testing.assert_close(merged["2.weight"][:, 2], mean[:, 2])
    assert float(merged["2.weight"].abs().min()) > 0  # not the all-zero lstsq answer


def test_regmean_honours_weight_with_grams():
    w1, w2 = T([[1.0, 1.0]]), T([[3.0, 5.0]])
    g1, g2 = T([[1.0, 0.0], [0.0, 2.0]]), T([[1.0, 0.0], [0.0, 3.0]])
    # diagonal Grams: per input column (w1·g1·W1 + w2·g2·W2)/(w1·g1 + w2·g2), with w = (3, 1)
    out = regmean([w1, w2], weight=[3.0, 1.0], statistics=[g1, g2], alpha=1.0)
    torch.testing.assert_close(out, T([[(3 * 1 + 3) / 4, (3 * 2 * 1 + 3 * 5) / (6 + 3)]]))
    with pytest.raises(UsageError, match=r"weights \[1.0, -1.0\] must be >= 0 with a positive sum"):
        regmean([w1, w2], weight=[1.0, -1.0], statistics=[g1, g2])


def test_grams_are_averaged_over_positions_as_fusionbench():
    model = nn.Linear(2, 1, bias=False)
    x = T([[1.0, 2.0], [3.0, -1.0]])
    once = compute_grams(model, [(x, None)])["weight"]
    torch.testing.assert_close(once, x.T @ x / 2)  # [[10, −1], [−1, 5]] / 2
    twice = compute_grams(model, [(torch.cat([x, x, x]), None)])["weight"]
    torch.testing.assert_close(twice, once)  # more of the same data: the same Gram
    seq = compute_grams(model, [(x[None], None)])["weight"]  # one example, two positions
    torch.testing.assert_close(seq, once)


def test_grams_warn_about_attention_out_proj():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, x, x)[0])

    with pytest.warns(MergeWarning, match=r"1 linear layer never ran .*`attn\.out_proj`"):
        grams = compute_grams(Attn(), [(torch.randn(2, 3, 4), None)])
    assert set(grams) == {"fc.weight"}


def test_fisher_skips_padded_positions():
    class Masked(_TokenClassifier):
        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):  # type: ignore[override]
            return self.head(x)

    torch.manual_seed(8)
    model = Masked()
    x = torch.randn(2, 2, 3)
    mask = torch.tensor([[1, 0], [1, 1]])  # example 0's second position is padding
    f = compute_fisher(model, [{"x": x, "attention_mask": mask}], kind="exact")
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    v = torch.stack([p[0, 0], p[1, 0], p[1, 1]])
    v = v * (1 - v)  # the three real positions
    torch.testing.assert_close(f["head.bias"], v.mean(0))


def test_data_merge_refuses_non_finite_weights_naming_the_tensor():
    a = {"w": torch.ones(2), "b": torch.zeros(1)}
    b = {"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(1)}
    with pytest.raises(
        ExecutionError, match=r"method `regmean`: model 2 has 1 NaN and 0 inf value in tensor `w`"
    ):
        merge_with_data("regmean", [a, b], make_model=lambda: nn.Linear(2, 1), data=[[]])
