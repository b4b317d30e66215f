"""The task-negation protocol on synthetic tasks (experiment E1 of the methods reference, in small)."""

from __future__ import annotations

import pytest
import torch

from merge.errors import UsageError
from merge.evaluate.grids import linspace
from merge.evaluate.negation import choose_lambda, negation, random_like_task_vector
from merge.evaluate.results import Curve, Result


def test_negation_forgets_the_target_and_keeps_the_control(negation_tasks) -> None:
    t = negation_tasks
    r = negation(
        t.make_model,
        t.base.state_dict(),
        t.finetuned.state_dict(),
        target_data=t.target,
        control_data=t.control,
        lambdas=linspace(0, 2, 21),
    )
    sel = r.selection
    assert sel["lambda"] is not None and sel["lambda"] > 0
    assert sel["target_drop"] >= 0.15  # ≥ 15 points of target accuracy
    assert sel["control"] >= 0.95 * sel["base_control"]
    # the choice is the lowest target among the λ that keep the control
    feasible = [p for p in r.curve("negation").points if p["feasible"]]
    assert sel["target"] == min(p["metrics"]["target_accuracy"] for p in feasible)
    assert all(p["metrics"]["control_accuracy"] >= 0.95 * sel["base_control"] for p in feasible)
    # a random vector of the same norm at the same λ drops the target far less
    rnd = sel["random_baseline"]["metrics"]
    assert sel["base_target"] - rnd["target_accuracy"] < sel["target_drop"] / 3
    assert r.endpoints["base"]["ok"]


def test_the_random_vector_has_the_task_vectors_norm_tensor_by_tensor() -> None:
    base = {"w": torch.zeros(10, 10), "n": torch.tensor(3)}
    task = {"w": torch.ones(10, 10), "n": torch.tensor(4)}
    rnd = random_like_task_vector(base, task, seed=0)
    assert float(rnd["w"].norm()) == pytest.approx(10.0, rel=1e-6)
    assert int(rnd["n"]) == 3
    assert not torch.equal(rnd["w"], random_like_task_vector(base, task, seed=1)["w"])


def _result(points: list[tuple[float, float, float]]) -> Result:
    c = Curve(
        "negation",
        [
            {
                "coords": {"lambda": lam},
                "metrics": {"target_loss": t, "control_loss": c},
                "seconds": 0.0,
            }
            for lam, t, c in points
        ],
    )
    return Result("negation", ["lambda"], [c])


def test_lower_is_better_metrics_flip_both_rules() -> None:
    # loss: the target loss should go up; the control may rise to base / 0.95 at most
    r = _result([(0.0, 1.0, 1.0), (0.5, 2.0, 1.04), (1.0, 3.0, 1.06)])
    sel = choose_lambda(r, metric="loss", threshold=0.95)
    assert sel["lambda"] == 0.5 and sel["control_limit"] == pytest.approx(1 / 0.95)
    assert sel["target_drop"] == pytest.approx(1.0)


def test_unknown_metric_and_bad_threshold_are_clear(negation_tasks) -> None:
    with pytest.raises(
        UsageError, match=r"--metric `f1` is not among the evaluators' metrics \(accuracy, loss\)"
    ):
        choose_lambda(_acc_result(), metric="f1", threshold=0.95)
    t = negation_tasks
    with pytest.raises(UsageError, match="--threshold"):
        negation(
            t.make_model,
            t.base.state_dict(),
            t.finetuned.state_dict(),
            target_data=t.target,
            control_data=t.control,
            threshold=95,
        )


def _acc_result() -> Result:
    c = Curve(
        "negation",
        [
            {
                "coords": {"lambda": 0.0},
                "metrics": {
                    "target_loss": 1.0,
                    "target_accuracy": 0.5,
                    "control_loss": 1.0,
                    "control_accuracy": 0.5,
                },
                "seconds": 0.0,
            }
        ],
    )
    return Result("negation", ["lambda"], [c])
