"""One evaluation point, and the worker that runs points on its own model instance.

A `Job` says everything a worker needs (model factory, named states, evaluator, BatchNorm data,
device) and is picklable, so the sequential runner, the process pool and Ray share one code
path: each builds a `Runner` once (one model instance, states in memory) and then evaluates
`Point`s, each a set of weights over the named states plus the BatchNorm treatment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from merge.errors import UsageError
from merge.evaluate.evaluators import Batches, Evaluator
from merge.evaluate.weights import (
    StateLike,
    StateSpace,
    has_batchnorm,
    read_state,
)

ModelSpec = str | Callable[[], nn.Module] | nn.Module


@dataclass
class Point:
    """One evaluation: `weights` over named states; `coords` are what the user sees (α, λ1, ...)."""

    curve: str
    coords: dict[str, float]
    weights: dict[str, float] = field(default_factory=dict)
    bn_reset: bool = False
    repair: bool = False
    build: dict[str, Any] | None = (
        None  # values for `Job.builder` instead of `weights` (recipe sweeps)
    )


@dataclass
class Job:
    model: ModelSpec
    states: dict[str, StateLike]
    evaluator: Evaluator
    bn_data: Batches | None = None
    bn_batches: int | None = None
    device: str = "cpu"
    builder: Callable[[dict[str, Any]], Mapping[str, torch.Tensor]] | None = None


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_model(spec: ModelSpec, device: str) -> nn.Module:
    from merge.entrypoints import make_model

    model = spec if isinstance(spec, nn.Module) else make_model(spec)
    return model.to(resolve_device(device)).eval()


class Runner:
    """A model instance with its states in memory; evaluates points one after another."""

    def __init__(self, job: Job):
        self.job = job
        self.model = build_model(job.model, job.device)
        self.space = StateSpace(self.model, job.states)
        self._repair_models: dict[str, nn.Module] = {}

    def evaluate(self, point: Point) -> dict[str, Any]:
        """{"metrics": evaluator output, "seconds": wall time of the point, weights included}."""
        start = time.perf_counter()
        if point.build is not None:
            self._load_built(point.build)
        else:
            self.space.apply(point.weights)
        if point.repair:
            self._repair(point)
        elif point.bn_reset:
            self.reset_bn()
        self.model.eval()
        metrics = dict(self.job.evaluator(self.model))
        return {"metrics": metrics, "seconds": time.perf_counter() - start}

    def reference(self, name: str) -> dict[str, float]:
        """Metrics of state `name` loaded the plain way (`load_weights`), to check path endpoints."""
        from merge.entrypoints import load_weights
        from merge.evaluate.weights import with_tied_aliases

        load_weights(
            self.model,
            with_tied_aliases(self.model, read_state(self.job.states[name])),
            source=name,
        )
        self.model.eval()
        return dict(self.job.evaluator(self.model))

    def reset_bn(self) -> None:
        if self.job.bn_data is None:
            raise UsageError(
                "--bn-reset needs data to recompute BatchNorm statistics on (--bn-data or --data)"
            )
        try:
            from merge.align import reset_batchnorm
        except ImportError as e:
            raise UsageError(
                "--bn-reset needs `merge.align.reset_batchnorm` (the alignment package), which this "
                "installation does not have"
            ) from e
        reset_batchnorm(self.model, self.job.bn_data, num_batches=self.job.bn_batches)

    def _repair(self, point: Point) -> None:
        repair = repair_function()
        if len(point.weights) != 2 or self.job.bn_data is None:
            raise UsageError(
                "--repair works on a path between two models and needs data (--bn-data or --data)"
            )
        (na, _), (nb, alpha) = point.weights.items()
        ends = []
        for name in (na, nb):
            if name not in self._repair_models:
                m = build_model(
                    self.job.model
                    if not isinstance(self.job.model, nn.Module)
                    else _clone(self.job.model),
                    self.job.device,
                )
                StateSpace(m, {name: self.space.state(name)})
                self._repair_models[name] = m
            ends.append(self._repair_models[name])
        repair(
            self.model, ends[0], ends[1], alpha, self.job.bn_data, num_batches=self.job.bn_batches
        )

    def _load_built(self, values: dict[str, Any]) -> None:
        from merge.entrypoints import load_weights
        from merge.evaluate.weights import with_tied_aliases

        if self.job.builder is None:
            raise UsageError("this job has no builder for recipe points")
        load_weights(
            self.model,
            with_tied_aliases(self.model, self.job.builder(values)),
            source="the recipe's output",
        )

    @property
    def has_batchnorm(self) -> bool:
        return has_batchnorm(self.model)


def repair_function() -> Callable[..., Any]:
    try:
        from merge.align import repair  # type: ignore[attr-defined]
    except ImportError as e:
        raise UsageError(
            "--repair needs `merge.align.repair` (the alignment package), which this installation does not "
            "have yet; use --bn-reset for BatchNorm models meanwhile"
        ) from e
    return repair  # type: ignore[no-any-return]


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
