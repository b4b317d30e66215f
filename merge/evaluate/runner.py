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
    cache: str = "auto"  # where states live: see `StateSpace`
    device_map: str | dict[str, Any] | None = (
        None  # "auto" or {module: device}: see `build_dispatched`
    )
    builder: Callable[[dict[str, Any]], Mapping[str, torch.Tensor]] | None = None


def resolve_device(device: str | None) -> str:
    """`--device` checked as every command checks it (`merge.execute.pick_device`)."""
    from merge.execute import pick_device

    return str(pick_device(device or "auto"))


def build_model(
    spec: ModelSpec, device: str, device_map: str | dict[str, Any] | None = None
) -> nn.Module:
    """The model on `device`; with `device_map`, built on the meta device and spread by accelerate."""
    from merge.entrypoints import make_model

    if device_map is not None:
        return build_dispatched(spec, device_map)
    model = spec if isinstance(spec, nn.Module) else make_model(spec)
    return model.to(resolve_device(device)).eval()


def build_dispatched(spec: ModelSpec, device_map: str | dict[str, Any]) -> nn.Module:
    """A model too big for one device: built without memory (meta), its tensors allocated where
    `device_map` says ("auto": over the visible GPUs, by accelerate), hooks moving activations.

    Tensors are left uninitialised: every point writes all of them. Only accelerator devices
    (or an all-"cpu" map) are accepted: offloaded modules keep their weights outside the model,
    where in-place interpolation cannot reach them.
    """
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import retie_parameters, set_module_tensor_to_device

    from merge.entrypoints import make_model

    if isinstance(spec, nn.Module):
        raise UsageError(
            "--device-map needs a model factory (`module:function`), not a built model"
        )
    # accelerate's empty init re-registers every parameter, which unties `lm_head.weight =
    # wte.weight`; a build under torch's meta device keeps the identities, so read the ties there.
    with torch.device("meta"):
        probe = make_model(spec)
    groups: dict[int, list[str]] = {}
    for name, p in probe.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tied = [names for names in groups.values() if len(names) > 1]
    del probe
    with init_empty_weights():  # buffers stay real: non-persistent ones (masks) are never loaded
        model = make_model(spec)
    if device_map == "auto":
        if not torch.cuda.is_available():
            raise UsageError(
                "--device-map auto spreads the model over GPUs, and none is visible; use --device cpu"
            )
        gpus = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
        device_map = infer_auto_device_map(
            model,
            max_memory=gpus,
            no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []),
        )
    if not isinstance(device_map, dict):
        raise UsageError(
            f"--device-map must be `auto` or a mapping of module names to devices, got {device_map!r}"
        )
    offloaded = sorted({str(v) for v in device_map.values()} & {"cpu", "disk"})
    if offloaded and set(map(str, device_map.values())) != {"cpu"}:
        raise UsageError(
            f"the model does not fit the GPUs (accelerate would offload parts to {', '.join(offloaded)}); "
            "paths need every weight on an accelerator: use more GPUs or a smaller dtype"
        )

    def where(name: str) -> Any:
        best = max(
            (k for k in device_map if k == "" or name == k or name.startswith(k + ".")),
            key=len,
            default=None,
        )
        if best is None:
            raise UsageError(f"--device-map places no module that holds `{name}`")
        return device_map[best]

    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            set_module_tensor_to_device(
                model, name, where(name), value=torch.empty(t.shape, dtype=t.dtype)
            )
    retie_parameters(model, tied)
    return dispatch_model(model, device_map=device_map).eval()  # type: ignore[no-any-return]


class Runner:
    """A model instance with its states in memory; evaluates points one after another."""

    def __init__(self, job: Job):
        self.job = job
        self.model = build_model(job.model, job.device, job.device_map)
        self.space = StateSpace(self.model, job.states, cache=job.cache)
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
        from merge.align import reset_batchnorm

        reset_batchnorm(self.model, self.job.bn_data, num_batches=self.job.bn_batches)

    def _repair(self, point: Point) -> None:
        from merge.align import repair

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


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
