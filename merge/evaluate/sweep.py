"""Coefficient sweeps: a grid over a recipe's `vars:` or its method parameters, or over task-vector scales.

Ranges are `name=start:stop:num` (inclusive, `num` points) or `name=v1,v2,...`; several ranges
make a full grid. A recipe name is `vars.NAME` (a declared variable) or a step path such as
`steps.skills.models.math.weight` or `steps.skills.density`. Each point merges the recipe in
memory (`merge.api.evaluate_recipe_in_memory`) and loads the result into the one model instance.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from merge.errors import RecipeError, UsageError, did_you_mean
from merge.evaluate.barriers import higher_is_better
from merge.evaluate.evaluators import Batches, DataSpec, Evaluator, declared_directions
from merge.evaluate.executors import RunKwargs, RunOptions
from merge.evaluate.grids import product
from merge.evaluate.paths import collect_curves, resolve_evaluator, scale_grid
from merge.evaluate.results import Result
from merge.evaluate.runner import ModelSpec, Point
from merge.evaluate.weights import StateLike

if TYPE_CHECKING:
    from typing_extensions import Unpack


class RecipeBuilder:
    """values -> the recipe's merged state dict, with `vars.*` passed as vars and step paths set in place."""

    def __init__(self, recipe: str | Path | Mapping[str, Any], device: str = "cpu"):
        self.recipe = str(recipe) if isinstance(recipe, str | Path) else dict(recipe)
        self.device = device
        self._data: dict[str, Any] | None = None

    def data(self) -> dict[str, Any]:
        """The recipe as a dict, with relative input paths made absolute (they are relative to its file)."""
        if self._data is None:
            if isinstance(self.recipe, dict):
                self._data = copy.deepcopy(self.recipe)
            else:
                import yaml

                path = Path(self.recipe)
                if not path.is_file():
                    raise UsageError(f"recipe {path} does not exist")
                loaded = yaml.safe_load(path.read_text())
                if not isinstance(loaded, dict):
                    raise RecipeError(
                        "a recipe must be a mapping with `inputs:` and `steps:`", str(path)
                    )
                for name, value in (loaded.get("inputs") or {}).items():
                    if (
                        isinstance(value, str)
                        and not Path(value).is_absolute()
                        and (path.parent / value).exists()
                    ):
                        loaded["inputs"][name] = str((path.parent / value).resolve())
                self._data = loaded
        return self._data

    def split(self, values: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        vars_ = {k[len("vars.") :]: float(v) for k, v in values.items() if k.startswith("vars.")}
        others = {k: v for k, v in values.items() if not k.startswith("vars.")}
        return vars_, others

    def recipe_for(self, values: Mapping[str, Any]) -> tuple[Any, dict[str, float]]:
        vars_, others = self.split(values)
        if not others:
            return self.recipe, vars_
        data = copy.deepcopy(self.data())
        for dotted, v in others.items():
            set_path(data, dotted, v)
        return data, vars_

    def validate(self, values: Mapping[str, Any]) -> None:
        """Fail early, before any worker starts, on unknown vars or paths and invalid recipes."""
        from merge.recipe import load_recipe

        recipe, vars_ = self.recipe_for(values)
        load_recipe(recipe, vars=vars_ or None)

    def __call__(self, values: Mapping[str, Any]) -> dict[str, Tensor]:
        from merge.api import evaluate_recipe_in_memory

        recipe, vars_ = self.recipe_for(values)
        return evaluate_recipe_in_memory(recipe, vars=vars_ or None, device=self.device)


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `steps.skills.models.math.weight` (a key path through nested mappings) to `value`."""
    parts = dotted.split(".")
    node: Any = data
    for i, key in enumerate(parts[:-1]):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(parts[:i]) or "the recipe"
            options = list(node) if isinstance(node, dict) else []
            raise UsageError(
                f"--param `{dotted}`: {where} has no key `{key}`{did_you_mean(key, options)}"
            )
        node = node[key]
    if not isinstance(node, dict):
        raise UsageError(
            f"--param `{dotted}`: `{'.'.join(parts[:-1])}` is not a mapping (an expression step? "
            "sweep a number in it through `vars:`)"
        )
    node[parts[-1]] = value


def sweep_recipe(
    recipe: str | Path | Mapping[str, Any],
    ranges: Sequence[tuple[str, list[float]]],
    model: ModelSpec,
    *,
    evaluator: Evaluator | str | None = None,
    data: DataSpec | Batches | None = None,
    metric: str = "loss",
    **run: Unpack[RunKwargs],
) -> Result:
    """Evaluate the recipe's merge at every combination of `ranges`; `selection.best` is the best point."""
    if not ranges:
        raise UsageError("a sweep needs at least one --param name=start:stop:num")
    grid = product(ranges)
    builder = RecipeBuilder(recipe, device="cpu")
    builder.validate(grid[0])
    opts = RunOptions(**run)
    ev = resolve_evaluator(evaluator, data)
    job = opts.job(model, {}, ev, builder=builder)
    points = [Point("sweep", dict(c), build=dict(c)) for c in grid]
    results = opts.run(job, points)
    axes = [n for n, _ in ranges]
    result = Result(
        kind="sweep",
        axes=axes,
        inputs={"recipe": str(recipe) if isinstance(recipe, str | Path) else "<in-memory recipe>"},
        settings={
            "ranges": {n: v for n, v in ranges},
            "metric": metric,
            "evaluator": getattr(ev, "kind", "custom"),
            "executor": opts.executor,
            "device": opts.device,
            "points": len(points),
        },
    )
    result.curves = collect_curves(points, results, {"sweep": {}})
    result.selection = best_point(result, metric, declared_directions(ev))
    return result


def sweep_task_vectors(
    model: ModelSpec,
    base: StateLike,
    tasks: Mapping[str, StateLike],
    ranges: Sequence[tuple[str, list[float]]],
    *,
    metric: str = "loss",
    **kwargs: Any,
) -> Result:
    """θ0 + Σ_t λ_t τ_t over a grid of λs named after the tasks (`math=0:1:5 code=0:1:5`)."""
    unknown = [n for n, _ in ranges if n not in tasks]
    if unknown:
        raise UsageError(
            f"--param `{unknown[0]}` names no task{did_you_mean(unknown[0], tasks)}; tasks: {', '.join(tasks)}"
        )
    grid = product(ranges)
    result = scale_grid(
        "sweep",
        model,
        base,
        tasks,
        axes=[n for n, _ in ranges],
        grid=grid,
        weights_of=lambda c: dict(c),
        **kwargs,
    )
    result.settings.update({"ranges": {n: v for n, v in ranges}, "metric": metric})
    given = kwargs.get("evaluator")
    directions = declared_directions(resolve_evaluator(given, None) if given is not None else None)
    result.selection = best_point(result, metric, directions)
    return result


def best_point(
    result: Result, metric: str, directions: Mapping[str, bool] | None = None
) -> dict[str, Any]:
    points = [p for c in result.curves for p in c.points]
    if not points or metric not in points[0]["metrics"]:
        have = ", ".join(points[0]["metrics"]) if points else "none"
        raise UsageError(f"--metric `{metric}` is not among the evaluator's metrics ({have})")
    higher = higher_is_better(metric, directions)
    sign = -1.0 if higher else 1.0
    finite = [p for p in points if math.isfinite(float(p["metrics"][metric]))]
    if not finite:
        return {"metric": metric, "best": None}
    best = min(finite, key=lambda p: sign * float(p["metrics"][metric]))
    return {
        "metric": metric,
        "higher_is_better": higher,
        "best": {
            "coords": best["coords"],
            "value": best["metrics"][metric],
            "metrics": best["metrics"],
        },
    }
