"""A first pass for methods whose parameters depend on the whole model, not one tensor.

TIES as the paper states it (`scope: model`) trims every task vector with one magnitude
threshold per model over all its tensors. That threshold needs a pass over every tensor of the
model before the merge pass; this module runs it (headers first, one tensor at a time, twice:
sample then count) and writes the thresholds into the planned jobs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import Tensor

from merge.errors import PlanError
from merge.expr import Affine
from merge.methods import get_method
from merge.methods._registry import MODEL
from merge.methods.selection import model_magnitude_threshold
from merge.plan import Plan, ResolvedCall, TensorJob
from merge.progress import counted


def _model_scoped(call: ResolvedCall) -> bool:
    """The call's registration declares model-wide statistics for these parameters.

    Contract of the `model` shape: one magnitude threshold per model over all its tensors,
    from the per-model `density`, handed back as the per-model `threshold`.
    """
    return get_method(call.method).shape_for(dict(call.params)) == MODEL


def _scoped_calls(form: Affine) -> Iterator[ResolvedCall]:
    for leaf, _ in form.terms:
        if isinstance(leaf, ResolvedCall):
            if _model_scoped(leaf):
                yield leaf
            for m in leaf.models:
                yield from _scoped_calls(m)


def resolve_model_scope(plan: Plan, *, quiet: bool = True) -> None:
    """Compute model-wide thresholds for every `scope: model` call and put them into the jobs."""
    # (step, model index) -> [(tensor, model input, base input, density)]
    members: dict[tuple[str, int], list[tuple[str, str, str, float]]] = defaultdict(list)
    for job in plan.jobs:
        for call in _scoped_calls(job.form):
            base = call.base.single_input() if call.base is not None else None
            params = dict(call.params)
            for i, m in enumerate(call.models):
                x = m.single_input()
                if x is None or base is None:
                    raise PlanError(
                        f"step `{call.step}`: `scope: model` needs plain inputs as the models and "
                        "base (it computes one threshold per input over all its tensors)"
                    )
                members[(call.step, i)].append((job.name, x, base, float(params["density"][i])))
    if not members:
        return
    thresholds: dict[tuple[str, int], float] = {}
    for key, entries in counted(
        list(members.items()), "model-wide thresholds", quiet=quiet, unit="groups"
    ):
        densities = {d for *_, d in entries}
        if len(densities) > 1:
            raise PlanError(
                f"step `{key[0]}`: `scope: model` needs one density per model over the whole "
                f"model, but overrides give {sorted(densities)}; use `scope: tensor` for per-tensor densities"
            )

        def pairs(
            entries: list[tuple[str, str, str, float]] = entries,
        ) -> Iterator[tuple[Tensor, Tensor]]:
            for name, x, base, _ in entries:
                yield (
                    plan.sources[x].read(name).to(torch.float32),
                    plan.sources[base].read(name).to(torch.float32),
                )

        numels = [plan.sources[x].meta(name).numel for name, x, _, _ in entries]
        thresholds[key] = model_magnitude_threshold(pairs, numels, densities.pop())
    plan.jobs = [_with_thresholds(job, thresholds) for job in plan.jobs]


def _with_thresholds(job: TensorJob, thresholds: dict[tuple[str, int], float]) -> TensorJob:
    def rewrite(form: Affine) -> Affine:
        terms = []
        for leaf, c in form.terms:
            if isinstance(leaf, ResolvedCall):
                models = tuple(rewrite(m) for m in leaf.models)
                params = dict(leaf.params)
                if _model_scoped(leaf):
                    params["threshold"] = tuple(
                        thresholds[(leaf.step, i)] for i in range(len(models))
                    )
                leaf = replace(leaf, models=models, params=tuple(sorted(params.items())))
            terms.append((leaf, c))
        return Affine(tuple(terms))  # type: ignore[arg-type]

    return replace(job, form=rewrite(job.form))
