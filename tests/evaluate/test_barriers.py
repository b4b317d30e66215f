"""Barrier definitions on synthetic curves whose answers are worked out by hand."""

from __future__ import annotations

import pytest

from merge.errors import UsageError
from merge.evaluate.barriers import (
    barriers,
    curve_barriers,
    higher_is_better,
    max_minus_linear,
    max_minus_mean,
    midpoint,
)
from merge.evaluate.grids import alpha_grid, linspace, parse_range, parse_values, product

GRID = [0.0, 0.25, 0.5, 0.75, 1.0]


def test_symmetric_bump_all_definitions_agree() -> None:
    loss = [1.0, 2.0, 3.0, 2.0, 1.0]
    assert max_minus_mean(GRID, loss) == (2.0, 0.5)
    assert max_minus_linear(GRID, loss) == (2.0, 0.5)
    assert midpoint(GRID, loss) == (2.0, 0.5)


def test_unequal_endpoints_separate_mean_from_linear() -> None:
    # endpoints 0 and 2: mean 1; the line runs 0, .5, 1, 1.5, 2
    loss = [0.0, 1.0, 1.5, 2.0, 2.0]
    assert max_minus_mean(GRID, loss) == (1.0, 0.75)  # first maximum, 2.0 at α = .75
    assert max_minus_linear(GRID, loss) == (0.5, 0.25)  # gaps 0, .5, .5, .5, 0: first at .25
    assert midpoint(GRID, loss) == (0.5, 0.5)


def test_monotone_path_has_no_linear_barrier_but_a_mean_one() -> None:
    loss = [1.0, 0.8, 0.6, 0.4, 0.2]
    value, where = max_minus_mean(GRID, loss)
    assert value == pytest.approx(0.4) and where == 0.0
    value, _ = max_minus_linear(GRID, loss)
    assert value == pytest.approx(0.0, abs=1e-12)


def test_accuracy_barrier_counts_a_dip_as_positive() -> None:
    acc = [1.0, 0.8, 0.5, 0.8, 0.9]
    assert max_minus_mean(GRID, acc, higher_is_better=True) == pytest.approx((0.45, 0.5))
    # line: 1, .975, .95, .925, .9 -> gaps 0, .175, .45, .125, 0
    assert max_minus_linear(GRID, acc, higher_is_better=True) == pytest.approx((0.45, 0.5))
    assert midpoint(GRID, acc, higher_is_better=True) == pytest.approx((0.45, 0.5))


def test_a_path_better_than_its_endpoints_gives_a_negative_barrier() -> None:
    loss = [1.0, 0.5, 0.4, 0.5, 1.0]
    assert max_minus_mean(GRID, loss) == (0.0, 0.0)
    assert midpoint(GRID, loss)[0] == pytest.approx(-0.6)


def test_barriers_reports_every_definition_and_direction() -> None:
    out = barriers(GRID, [1.0, 2.0, 3.0, 2.0, 1.0])
    assert set(out) == {"direction", "endpoints", "max_minus_mean", "max_minus_linear", "midpoint"}
    assert out["direction"] == "lower_is_better"
    assert out["endpoints"] == [1.0, 1.0]
    assert out["midpoint"] == {"value": 2.0, "alpha": 0.5}
    # no α = ½ in the grid: the midpoint barrier is absent, the others are not
    out = barriers([0.0, 0.3, 1.0], [0.0, 1.0, 0.0])
    assert out["midpoint"] is None and out["max_minus_mean"] == {"value": 1.0, "alpha": 0.3}


def test_curve_barriers_skips_counts_and_non_finite_metrics() -> None:
    points = [
        {"loss": 1.0, "accuracy": 0.9, "n": 10},
        {"loss": 3.0, "accuracy": 0.5, "n": 10},
        {"loss": 1.0, "accuracy": 0.9, "n": 10},
    ]
    out = curve_barriers([0.0, 0.5, 1.0], points)
    assert set(out) == {"loss", "accuracy"}
    assert out["accuracy"]["max_minus_mean"]["value"] == pytest.approx(0.4)
    points[1]["loss"] = float("nan")
    assert "loss" not in curve_barriers([0.0, 0.5, 1.0], points)


@pytest.mark.parametrize(
    ("alphas", "values", "message"),
    [
        ([0.0, 0.5], [1.0], "2 α values but 1 metric values"),
        ([0.1, 1.0], [1.0, 1.0], "must start at 0 and end at 1"),
        ([0.0, 0.7, 0.3, 1.0], [1.0] * 4, "strictly increasing"),
    ],
)
def test_bad_grids_are_refused(alphas: list[float], values: list[float], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        max_minus_mean(alphas, values)


def test_midpoint_needs_the_midpoint() -> None:
    with pytest.raises(UsageError, match="needs α = 0.5"):
        midpoint([0.0, 0.4, 1.0], [0.0, 1.0, 0.0])


def test_metric_direction_from_its_name() -> None:
    assert (
        higher_is_better("accuracy")
        and higher_is_better("val_accuracy")
        and higher_is_better("top1")
    )
    assert (
        not higher_is_better("loss")
        and not higher_is_better("perplexity")
        and not higher_is_better("target_loss")
    )
    assert higher_is_better("control_accuracy")


def test_grids() -> None:
    assert linspace(0, 1.5, 16)[:4] == [0.0, 0.1, 0.2, 0.3]
    assert linspace(0, 1.5, 16)[-1] == 1.5 and len(linspace(0, 1.5, 16)) == 16
    assert alpha_grid(4) == [0.0, 0.333333333333, 0.5, 0.666666666667, 1.0]  # ½ added
    assert 0.5 in alpha_grid(25) and len(alpha_grid(25)) == 25
    assert parse_range("vars.lam=0:1.5:16") == ("vars.lam", linspace(0, 1.5, 16))
    assert parse_range("w=0.1,0.5") == ("w", [0.1, 0.5])
    assert parse_values("-1:1:3") == [-1.0, 0.0, 1.0]
    assert product([("a", [1.0, 2.0]), ("b", [3.0])]) == [
        {"a": 1.0, "b": 3.0},
        {"a": 2.0, "b": 3.0},
    ]


@pytest.mark.parametrize(
    "text", ["lam", "lam=", "=0:1:3", "lam=0:1", "lam=0:1:2.5", "lam=0:1:0", "lam=a,b"]
)
def test_bad_ranges_say_the_expected_form(text: str) -> None:
    with pytest.raises(UsageError, match="start:stop:num"):
        parse_range(text)


def test_alpha_grid_refuses_extrapolation_and_too_few_steps() -> None:
    with pytest.raises(UsageError, match="at least 2"):
        alpha_grid(1)
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        alpha_grid(alphas=[0.0, 1.5])
