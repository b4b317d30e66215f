"""Interpolation paths between two checkpoints, task-vector scales, planes and scale grids.

Every function here builds one `Job` (model factory, named states, evaluator), a list of
`Point`s (weights over the states), runs them with the chosen executor and returns a `Result`
whose curves hold every point. Endpoints that are checkpoints (α = 0 and 1 of a path, λ = 0 and
1 of a task-vector path, the corners of a plane) are also evaluated the plain way, with their
stored statistics, and must reproduce those metrics before any barrier is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from merge.errors import UsageError
from merge.evaluate.barriers import curve_barriers
from merge.evaluate.evaluators import (
    Batches,
    CallableEvaluator,
    DataSpec,
    Evaluator,
    as_batches,
    declared_directions,
    make_evaluator,
    model_device,
)
from merge.evaluate.executors import RunKwargs, RunOptions
from merge.evaluate.grids import alpha_grid, linspace
from merge.evaluate.results import Curve, Result
from merge.evaluate.runner import ModelSpec, Point, Runner
from merge.evaluate.weights import StateLike, describe_state, read_state

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from merge.align import MatchReport

BN_NOTE = (
    "the model has BatchNorm layers and neither --bn-reset nor --repair was given: interpolated "
    "running statistics are used at every point, which usually overstates barriers"
)

# Relative tolerance for an endpoint evaluated in another process or after a permutation
# (summation order changes the last bits); in this process, unaligned, the match must be exact.
ENDPOINT_RTOL = 1e-4


def resolve_evaluator(
    evaluator: Evaluator | str | None, data: DataSpec | Batches | None, what: str = "--data"
) -> Evaluator:
    """The evaluator given (a built-in, or the user's callable, checked), else the built-in for `data`."""
    if evaluator is None:
        return make_evaluator(data=data, what=what)
    if isinstance(evaluator, str) or not hasattr(evaluator, "kind"):
        return CallableEvaluator(evaluator)  # type: ignore[arg-type]
    return evaluator


def interpolation_path(
    model: ModelSpec,
    a: StateLike,
    b: StateLike,
    *,
    evaluator: Evaluator | str | None = None,
    data: DataSpec | Batches | None = None,
    steps: int = 25,
    alphas: Sequence[float] | None = None,
    align: str | None = None,
    align_data: DataSpec | Batches | None = None,
    seed: int = 0,
    bn_reset: bool = False,
    repair: bool = False,
    bn_data: DataSpec | Batches | None = None,
    bn_batches: int | None = None,
    **run: Unpack[RunKwargs],
) -> Result:
    """Loss (and every other metric) along θ(α) = (1−α)θ_A + αθ_B, with barriers per curve.

    Curves: `naive` (B as given), `aligned` (B permuted onto A with `merge.align`, when `align`
    names a method), each also `+bn_reset` (BatchNorm statistics recomputed at every α, endpoints
    included) and `+repair` (REPAIR at every α) when asked.
    """
    opts = RunOptions(**run)
    grid = alpha_grid(steps, alphas)
    ev = resolve_evaluator(evaluator, data)
    bn = (
        as_batches(bn_data, "--bn-data")
        if bn_data is not None
        else (as_batches(data) if data is not None else None)
    )
    states: dict[str, StateLike] = {"a": a, "b": b}
    settings: dict[str, Any] = {
        "steps": len(grid),
        "alphas": grid,
        "evaluator": getattr(ev, "kind", "custom"),
        "align": align,
        "bn_reset": bn_reset,
        "repair": repair,
        "bn_batches": bn_batches,
        "executor": opts.executor,
        "device": opts.device,
        "device_map": opts.device_map,
    }
    notes: list[str] = []
    if align:
        aligned, report = align_states(
            model,
            a,
            b,
            method=align,
            data=align_data if align_data is not None else data,
            seed=seed,
        )
        states["b_aligned"] = aligned
        settings["alignment"] = _jsonable(report.to_dict())
    job = opts.job(model, states, ev, bn_data=bn, bn_batches=bn_batches)
    runner = Runner(job)
    settings["cache"] = runner.space.cache
    settings["device"] = str(model_device(runner.model))
    if runner.has_batchnorm and not (bn_reset or repair):
        notes.append(BN_NOTE)
    if bn_reset and not runner.has_batchnorm:
        notes.append(
            "--bn-reset: the model has no BatchNorm layer, so there is nothing to recompute; no +bn_reset curve"
        )
        bn_reset = False
    if repair and bn is not None and not _repairable(runner.model, bn):
        from merge.align.repair import NOTHING_TO_REPAIR

        notes.append(f"--repair: {NOTHING_TO_REPAIR}; no +repair curve")
        repair = False

    variants = [("naive", "b")] + ([("aligned", "b_aligned")] if align else [])
    points: list[Point] = []
    infos: dict[str, dict[str, Any]] = {}
    for variant, other in variants:
        modes = ["interpolated"] + (["bn_reset"] if bn_reset else [])
        if repair and (variant == "aligned" or not align):
            modes.append("repair")
        for mode in modes:
            name = variant if mode == "interpolated" else f"{variant}+{mode}"
            infos[name] = {
                "states": ["a", other],
                "aligned": variant == "aligned",
                "statistics": mode,
            }
            for al in grid:
                points.append(
                    Point(
                        curve=name,
                        coords={"alpha": al},
                        weights={"a": 1.0 - al, other: al},
                        bn_reset=mode == "bn_reset",
                        repair=mode == "repair",
                    )
                )
    result = Result(
        kind="path",
        axes=["alpha"],
        inputs={"a": describe_state(a), "b": describe_state(b)},
        settings=settings,
        notes=notes,
    )
    result.curves = collect_curves(points, opts.run(job, points, runner), infos)

    same_process = opts.same_process
    checks = [
        ("a", "naive", {"alpha": 0.0}, same_process),
        ("b", "naive", {"alpha": 1.0}, same_process),
    ]
    if align:
        checks += [
            ("a", "aligned", {"alpha": 0.0}, same_process),
            ("b", "aligned", {"alpha": 1.0}, False),
        ]
    check_endpoints(runner, result, checks)
    directions, unknown = declared_directions(ev), []  # type: ignore[var-annotated]
    for c in result.curves:
        c.barriers = (
            curve_barriers(c.coords("alpha"), [p["metrics"] for p in c.points], directions, unknown)
            if result.ok
            else None
        )
    if unknown:
        result.notes.append(
            "no barrier for "
            + ", ".join(f"`{m}`" for m in unknown)
            + ": whether larger is better is unknown; declare `higher_is_better` in the evaluator"
            " or pass --higher-is-better/--lower-is-better"
        )
    if not result.ok:
        result.notes.append(
            "an endpoint did not reproduce its checkpoint's metrics: barriers are withheld"
        )
    result.selection = barrier_summary(result)
    return result


def task_vector_path(
    model: ModelSpec,
    base: StateLike,
    finetuned: StateLike,
    *,
    scales: Sequence[float] | None = None,
    evaluator: Evaluator | str | None = None,
    data: DataSpec | Batches | None = None,
    **kwargs: Any,
) -> Result:
    """Metrics along θ0 + λτ with τ = θ_ft − θ0 (λ < 0 negates, λ > 1 extrapolates)."""
    lams = list(scales) if scales is not None else linspace(0.0, 1.0, 21)
    return scale_grid(
        "task_vector_path",
        model,
        base,
        {"task": finetuned},
        axes=["lambda"],
        grid=[{"lambda": x} for x in lams],
        weights_of=lambda c: {"task": c["lambda"]},
        evaluator=evaluator,
        data=data,
        **kwargs,
    )


def plane(
    model: ModelSpec,
    base: StateLike,
    task1: StateLike,
    task2: StateLike,
    *,
    grid: int = 21,
    lam_range: tuple[float, float] = (0.0, 1.0),
    evaluator: Evaluator | str | None = None,
    data: DataSpec | Batches | None = None,
    **kwargs: Any,
) -> Result:
    """Metrics over the plane θ0 + λ1τ1 + λ2τ2, `grid` × `grid` points over `lam_range`²."""
    values = linspace(lam_range[0], lam_range[1], grid)
    return scale_grid(
        "plane",
        model,
        base,
        {"task1": task1, "task2": task2},
        axes=["lambda1", "lambda2"],
        grid=[{"lambda1": x, "lambda2": y} for x in values for y in values],
        weights_of=lambda c: {"task1": c["lambda1"], "task2": c["lambda2"]},
        evaluator=evaluator,
        data=data,
        **kwargs,
    )


def scale_grid(
    kind: str,
    model: ModelSpec,
    base: StateLike,
    tasks: Mapping[str, StateLike],
    *,
    axes: list[str],
    grid: Sequence[Mapping[str, float]],
    weights_of: Callable[[Mapping[str, float]], Mapping[str, float]],
    evaluator: Evaluator | str | None = None,
    data: DataSpec | Batches | None = None,
    bn_reset: bool = False,
    bn_data: DataSpec | Batches | None = None,
    bn_batches: int | None = None,
    **run: Unpack[RunKwargs],
) -> Result:
    """θ0 + Σ_t λ_t τ_t at every grid point; `weights_of(coords)` gives {task: λ_t}.

    As weights over states this is (1 − Σλ_t)θ0 + Σ λ_t θ_t, so a point where one λ is 1 and the
    others 0 is that checkpoint exactly (and is checked against it).
    """
    if not grid:
        raise UsageError("the grid is empty")
    opts = RunOptions(**run)
    ev = resolve_evaluator(evaluator, data)
    bn = (
        as_batches(bn_data, "--bn-data")
        if bn_data is not None
        else (as_batches(data) if data is not None else None)
    )
    if "base" in tasks:
        raise UsageError("a task may not be named `base`")
    states: dict[str, StateLike] = {"base": base, **tasks}
    job = opts.job(model, states, ev, bn_data=bn, bn_batches=bn_batches)
    runner = Runner(job)
    notes = []
    if runner.has_batchnorm and not bn_reset:
        notes.append(BN_NOTE.replace(" nor --repair", ""))
    curve = "bn_reset" if bn_reset else kind
    points = []
    for coords in grid:
        lam = {t: float(v) for t, v in weights_of(coords).items()}
        points.append(
            Point(
                curve=curve,
                coords=dict(coords),
                weights={"base": 1.0 - sum(lam.values()), **lam},
                bn_reset=bn_reset,
            )
        )
    results = opts.run(job, points, runner)
    result = Result(
        kind=kind,
        axes=axes,
        inputs={n: describe_state(s) for n, s in states.items()},
        settings={
            "evaluator": getattr(ev, "kind", "custom"),
            "bn_reset": bn_reset,
            "bn_batches": bn_batches,
            "executor": opts.executor,
            "device": str(model_device(runner.model)),
            "cache": runner.space.cache,
            "points": len(points),
        },
        notes=notes,
    )
    result.curves = collect_curves(
        points,
        results,
        {curve: {"states": list(states), "statistics": "reset" if bn_reset else "interpolated"}},
    )
    if not bn_reset:
        checks = []
        for name in states:
            for p in points:
                w = p.weights
                if w.get(name) == 1.0 and all(v == 0.0 for k, v in w.items() if k != name):
                    checks.append((name, curve, p.coords, opts.same_process))
                    break
        check_endpoints(runner, result, checks)
    return result


def align_states(
    model: ModelSpec,
    a: StateLike,
    b: StateLike,
    *,
    method: str,
    data: DataSpec | Batches | None,
    seed: int = 0,
) -> tuple[dict[str, Any], MatchReport]:
    """B permuted onto A by `merge.align.align_state_dicts`."""
    from merge.align import align_state_dicts

    batches = as_batches(data, "--align-data") if data is not None else None
    return align_state_dicts(
        model, read_state(a), read_state(b), method=method, data=batches, seed=seed
    )


def collect_curves(
    points: Sequence[Point],
    results: Sequence[Mapping[str, Any]],
    infos: Mapping[str, dict[str, Any]],
) -> list[Curve]:
    curves: dict[str, Curve] = {}
    for p, r in zip(points, results):
        c = curves.setdefault(p.curve, Curve(p.curve, info=dict(infos.get(p.curve, {}))))
        c.points.append(
            {"coords": dict(p.coords), "metrics": dict(r["metrics"]), "seconds": r["seconds"]}
        )
    return list(curves.values())


def check_endpoints(
    runner: Runner, result: Result, checks: Sequence[tuple[str, str, Mapping[str, float], bool]]
) -> None:
    """Evaluate each named state the plain way and compare with its point on the curve.

    Each check is (state, curve, coords, exact): exact demands identical metrics; otherwise a
    relative difference of ENDPOINT_RTOL is allowed (another process, or a permuted model).
    """
    references: dict[str, dict[str, float]] = {}
    for state, curve_name, coords, exact in checks:
        if state not in references:
            references[state] = runner.reference(state)
        ref = references[state]
        point = next(p for p in result.curve(curve_name).points if p["coords"] == dict(coords))
        got = point["metrics"]
        diffs = {m: abs(float(got.get(m, float("nan"))) - v) for m, v in ref.items()}
        worst = max(diffs.values(), default=0.0)
        tol = 0.0 if exact else ENDPOINT_RTOL
        ok = all(d <= tol * max(1.0, abs(ref[m])) for m, d in diffs.items())
        key = state if state not in result.endpoints else f"{state}@{curve_name}"
        result.endpoints[key] = {
            "state": state,
            "curve": curve_name,
            "coords": dict(coords),
            "reference": ref,
            "path": dict(got),
            "max_abs_diff": worst,
            "tolerance": tol,
            "ok": ok,
        }


def barrier_summary(result: Result) -> dict[str, Any]:
    """Per curve, the headline barriers; with an aligned curve, its reduction relative to naive."""
    out: dict[str, Any] = {}
    for c in result.curves:
        if not c.barriers:
            continue
        out[c.name] = {
            m: {
                d: (b[d]["value"] if b.get(d) else None)
                for d in ("max_minus_mean", "max_minus_linear", "midpoint")
            }
            for m, b in c.barriers.items()
        }
    naive = out.get("naive", {})
    for name, per_metric in out.items():
        if name == "naive":
            continue
        for m, vals in per_metric.items():
            ref = naive.get(m, {}).get("max_minus_mean")
            v = vals.get("max_minus_mean")
            if ref is not None and v is not None and ref > 0:
                vals["reduction_vs_naive"] = 1.0 - v / ref
    return out


def _jsonable(x: Any) -> Any:
    import json

    try:
        json.dumps(x)
        return x
    except TypeError:
        if isinstance(x, Mapping):
            return {str(k): _jsonable(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [_jsonable(v) for v in x]
        if hasattr(x, "tolist"):
            return x.tolist() if getattr(x, "numel", lambda: 0)() <= 64 else str(x)
        if hasattr(x, "__dict__"):
            return _jsonable(vars(x))
        return str(x)


def _repairable(model: nn.Module, data: Batches) -> bool:
    from merge.align.repair import repair_points

    return bool(repair_points(model, data))
