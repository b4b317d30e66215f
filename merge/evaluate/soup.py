"""Greedy soup (Wortsman et al. 2022): add an ingredient only if validation improves.

Ingredients are ranked by their own validation score, best first; the soup starts as the best
one, and each next ingredient is tried once, as the running mean θ = (n·θ_soup + θ_i)/(n+1),
and kept only when the score strictly improves. Every candidate is a uniform weighting of the
kept states, evaluated in place on one model instance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from merge.errors import UsageError
from merge.evaluate.barriers import higher_is_better
from merge.evaluate.evaluators import (
    Batches,
    DataSpec,
    Evaluator,
    declared_directions,
    model_device,
)
from merge.evaluate.executors import RunKwargs, RunOptions
from merge.evaluate.paths import resolve_evaluator
from merge.evaluate.results import Curve, Result
from merge.evaluate.runner import ModelSpec, Point, Runner
from merge.evaluate.weights import StateLike, describe_state

if TYPE_CHECKING:
    from typing_extensions import Unpack


def greedy_soup(
    model: ModelSpec,
    ingredients: Mapping[str, StateLike],
    *,
    evaluator: Evaluator | str | None = None,
    data: DataSpec | Batches | None = None,
    metric: str = "accuracy",
    **run: Unpack[RunKwargs],
) -> Result:
    """Greedy soup over `ingredients`; `selection` holds the kept names, the weights and the score."""
    if len(ingredients) < 2:
        raise UsageError("a soup needs at least two ingredients")
    opts = RunOptions(**run)
    ev = resolve_evaluator(evaluator, data)
    job = opts.job(model, ingredients, ev)
    runner = Runner(job)
    names = list(ingredients)
    singles = [Point("ingredients", {"index": i}, {n: 1.0}) for i, n in enumerate(names)]
    # Ranking the ingredients is embarrassingly parallel; the greedy pass is sequential by nature.
    single_results = opts.run(job, singles, runner)
    if metric not in single_results[0]["metrics"]:
        raise UsageError(
            f"--metric `{metric}` is not among the evaluator's metrics ({', '.join(single_results[0]['metrics'])})"
        )
    higher = higher_is_better(metric, declared_directions(ev))
    sign = 1.0 if higher else -1.0

    def score(r: Mapping[str, Any]) -> float:
        return float(r["metrics"][metric])

    ranked = sorted(range(len(names)), key=lambda i: -sign * score(single_results[i]))
    kept = [names[ranked[0]]]
    best = score(single_results[ranked[0]])
    greedy = Curve("greedy", info={"rule": "keep if strictly better", "metric": metric})
    greedy.points.append(
        {
            "coords": {"step": 0},
            "metrics": single_results[ranked[0]]["metrics"],
            "seconds": single_results[ranked[0]]["seconds"],
            "ingredient": kept[0],
            "kept": True,
        }
    )
    for step, i in enumerate(ranked[1:], start=1):
        trial = [*kept, names[i]]
        r = runner.evaluate(Point("greedy", {"step": step}, dict.fromkeys(trial, 1.0 / len(trial))))
        ok = sign * (score(r) - best) > 0
        if ok:
            kept, best = trial, score(r)
        greedy.points.append(
            {
                "coords": {"step": step},
                "metrics": r["metrics"],
                "seconds": r["seconds"],
                "ingredient": names[i],
                "kept": ok,
            }
        )
    # Each ingredient alone, in the order tried: at step i, the soup candidate against its newcomer.
    ingredients_curve = Curve("ingredients", info={"names": names})
    for step, i in enumerate(ranked):
        r = single_results[i]
        ingredients_curve.points.append(
            {
                "coords": {"step": step},
                "metrics": r["metrics"],
                "seconds": r["seconds"],
                "ingredient": names[i],
            }
        )
    result = Result(
        kind="soup",
        axes=["step"],
        curves=[greedy, ingredients_curve],
        inputs={n: describe_state(s) for n, s in ingredients.items()},
        settings={
            "metric": metric,
            "executor": opts.executor,
            "device": str(model_device(runner.model)),
            "cache": runner.space.cache,
            "order": [names[i] for i in ranked],
        },
    )
    result.selection = {
        "metric": metric,
        "kept": kept,
        "weights": dict.fromkeys(kept, 1.0 / len(kept)),
        "score": best,
        "best_single": names[ranked[0]],
        "best_single_score": score(single_results[ranked[0]]),
    }
    return result
