"""Executors: the pool and Ray give the sequential results, in order; worker errors surface as they are."""

from __future__ import annotations

import evaluate_entry as entry
import pytest

from merge.errors import UsageError
from merge.evaluate import interpolation_path
from merge.evaluate.evaluators import ClassificationEvaluator
from merge.evaluate.executors import run_points
from merge.evaluate.runner import Job, Point


def _metrics(result) -> list[dict]:  # type: ignore[no-untyped-def]
    return [p["metrics"] for c in result.curves for p in c.points]


@pytest.fixture(scope="module")
def sequential(mlp_pair):  # type: ignore[no-untyped-def]
    return interpolation_path(
        entry.make_model, mlp_pair.path_a, mlp_pair.path_b, data=entry.test_data, steps=5
    )


def test_pool_matches_sequential_in_order(mlp_pair, sequential) -> None:
    r = interpolation_path(
        entry.make_model,
        mlp_pair.path_a,
        mlp_pair.path_b,
        data=entry.test_data,
        steps=5,
        executor="pool",
        workers=2,
    )
    for got, want in zip(_metrics(r), _metrics(sequential), strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert r.ok and r.endpoints["a"]["tolerance"] > 0  # another process: compared with a tolerance


def test_worker_errors_surface_with_their_message(mlp_pair) -> None:
    job = Job(
        entry.make_model, {"a": str(mlp_pair.path_a)}, ClassificationEvaluator(entry.empty_data)
    )
    with pytest.raises(UsageError, match="yielded no batches"):
        run_points(job, [Point("x", {}, {"a": 1.0})] * 2, executor="pool", workers=2)
    with pytest.raises(UsageError, match=r"unknown executor `pol` \(did you mean `pool`\?\)"):
        run_points(job, [], executor="pol")


def test_ray_matches_sequential_in_order(mlp_pair, sequential) -> None:
    pytest.importorskip("ray")
    r = interpolation_path(
        entry.make_model,
        mlp_pair.path_a,
        mlp_pair.path_b,
        data=entry.test_data,
        steps=5,
        executor="ray",
        workers=2,
    )
    for got, want in zip(_metrics(r), _metrics(sequential), strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert r.ok


def test_run_keywords_are_the_run_options() -> None:
    from dataclasses import fields

    from merge.evaluate.executors import RunKwargs, RunOptions

    assert list(RunKwargs.__annotations__) == [f.name for f in fields(RunOptions)]
