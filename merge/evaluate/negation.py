"""The task-negation protocol (Ilharco et al. 2023): forget a task by subtracting its vector.

θ(λ) = θ0 − λτ, τ = θ_ft − θ0. Over the λ grid, choose the λ with the lowest target score
among those whose control score stays within a relative threshold of the base model's:
control(λ) ≥ 0.95 · control(θ0) for a higher-is-better metric such as accuracy (for a
lower-is-better one such as loss: control(λ) ≤ control(θ0) / 0.95, and the target score is
then maximised). A random vector with the same norm as τ, tensor by tensor, is evaluated at the
chosen λ as the baseline: it should harm the target far less.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from merge.errors import UsageError
from merge.evaluate.barriers import higher_is_better
from merge.evaluate.evaluators import (
    Batches,
    DataSpec,
    Evaluator,
    PrefixedEvaluators,
    declared_directions,
    model_device,
)
from merge.evaluate.executors import RunKwargs, RunOptions
from merge.evaluate.grids import linspace
from merge.evaluate.paths import check_endpoints, collect_curves, resolve_evaluator
from merge.evaluate.results import Result
from merge.evaluate.runner import ModelSpec, Point, Runner
from merge.evaluate.weights import StateLike, describe_state

if TYPE_CHECKING:
    from typing_extensions import Unpack

DEFAULT_THRESHOLD = 0.95  # Ilharco et al.: control accuracy ≥ 95% of the pre-trained model's


def negation(
    model: ModelSpec,
    base: StateLike,
    finetuned: StateLike,
    *,
    target_data: DataSpec | Batches | None = None,
    control_data: DataSpec | Batches | None = None,
    target_eval: Evaluator | str | None = None,
    control_eval: Evaluator | str | None = None,
    lambdas: Sequence[float] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    metric: str = "accuracy",
    random_baseline: bool = True,
    seed: int = 0,
    **run: Unpack[RunKwargs],
) -> Result:
    """Evaluate θ0 − λτ on the target and control tasks over `lambdas` and pick λ (see module doc)."""
    if not 0.0 < threshold <= 1.0:
        raise UsageError(
            f"--threshold is a fraction of the base model's control score in (0, 1], got {threshold}"
        )
    grid = sorted(set(lambdas if lambdas is not None else linspace(0.0, 1.0, 21)) | {0.0})
    if grid[0] < 0:
        raise UsageError(
            "negation λ values must be ≥ 0 (θ0 − λτ); a negative λ adds the task vector"
        )
    ev = PrefixedEvaluators(
        {
            "target": resolve_evaluator(target_eval, target_data, "--target-data"),
            "control": resolve_evaluator(control_eval, control_data, "--control-data"),
        }
    )
    opts = RunOptions(**run)
    states: dict[str, StateLike] = {"base": base, "task": finetuned}
    job = opts.job(model, states, ev)
    runner = Runner(job)
    if random_baseline:
        runner.space.add(
            "random",
            random_like_task_vector(
                runner.space.state("base"), runner.space.state("task"), seed=seed
            ),
        )
    points = [Point("negation", {"lambda": lam}, {"base": 1.0 + lam, "task": -lam}) for lam in grid]
    results = opts.run(job, points, runner)
    result = Result(
        kind="negation",
        axes=["lambda"],
        inputs={n: describe_state(s) for n, s in states.items()},
        settings={
            "lambdas": grid,
            "threshold": threshold,
            "metric": metric,
            "random_baseline": random_baseline,
            "seed": seed,
            "executor": opts.executor,
            "device": str(model_device(runner.model)),
            "cache": runner.space.cache,
        },
    )
    result.curves = collect_curves(points, results, {"negation": {"formula": "θ0 − λ(θ_ft − θ0)"}})
    check_endpoints(runner, result, [("base", "negation", {"lambda": 0.0}, opts.same_process)])
    sel = choose_lambda(
        result, metric=metric, threshold=threshold, directions=declared_directions(ev)
    )
    if random_baseline and sel.get("lambda") is not None:
        lam = sel["lambda"]
        r = runner.evaluate(Point("random", {"lambda": lam}, {"base": 1.0 + lam, "random": -lam}))
        sel["random_baseline"] = {
            "lambda": lam,
            "metrics": r["metrics"],
            "norm": "per tensor, equal to τ's",
        }
    result.selection = sel
    return result


def choose_lambda(
    result: Result,
    *,
    metric: str,
    threshold: float,
    directions: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """The protocol's choice over the curve's points; marks each point `feasible`."""
    points = result.curve("negation").points
    t_key, c_key = f"target_{metric}", f"control_{metric}"
    if t_key not in points[0]["metrics"] or c_key not in points[0]["metrics"]:
        have = sorted({k.split("_", 1)[1] for k in points[0]["metrics"] if "_" in k})
        raise UsageError(
            f"--metric `{metric}` is not among the evaluators' metrics ({', '.join(have)})"
        )
    higher = higher_is_better(t_key, directions)
    base = next(p for p in points if p["coords"]["lambda"] == 0.0)["metrics"]
    limit = threshold * base[c_key] if higher else base[c_key] / threshold
    best = None
    for p in points:
        c = p["metrics"][c_key]
        p["feasible"] = bool(c >= limit if higher else c <= limit)
        if not p["feasible"]:
            continue
        t = p["metrics"][t_key]
        if best is None or (t < best["metrics"][t_key] if higher else t > best["metrics"][t_key]):
            best = p
    sel: dict[str, Any] = {
        "metric": metric,
        "threshold": threshold,
        "control_limit": limit,
        "base_target": base[t_key],
        "base_control": base[c_key],
        "lambda": None,
    }
    if best is not None:
        m = best["metrics"]
        sel.update(
            {
                "lambda": best["coords"]["lambda"],
                "target": m[t_key],
                "control": m[c_key],
                "target_drop": (base[t_key] - m[t_key]) if higher else (m[t_key] - base[t_key]),
                "control_ratio": (m[c_key] / base[c_key]) if base[c_key] else None,
            }
        )
    return sel


def random_like_task_vector(
    base: Mapping[str, torch.Tensor], task: Mapping[str, torch.Tensor], *, seed: int
) -> dict[str, torch.Tensor]:
    """θ0 + r, r Gaussian with ‖r_k‖ = ‖τ_k‖ for every float tensor k (others copied from θ0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b.clone()
            continue
        tau_norm = float((task[k].double() - b.double()).norm())
        r = torch.randn(b.shape, generator=g, dtype=torch.float64)
        norm = float(r.norm())
        r = r * (tau_norm / norm) if norm > 0 else r * 0
        out[k] = (b.double().cpu() + r).to(b.dtype).to(b.device)
    return out
