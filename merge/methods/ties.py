"""TIES-merging: trim each task vector to its top-k magnitudes, elect a sign, disjoint mean."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from merge.errors import UsageError
from merge.methods._checks import check_choice, check_compat, check_density
from merge.methods._gta import ELECT_CHOICES, combine, fused_merge, magnitude_thresholds
from merge.methods._registry import register
from merge.methods.sparsify import magnitude_top_k, mergekit_delta


@register(
    "ties",
    reference="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
    per_model={"weight": 1.0, "density": 1.0, "threshold": -1.0},
    properties={"idempotent"},
)
def ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[float],
    threshold: Sequence[float] | None = None,
    elect: str = "sum",
    normalize: bool = True,
    scale: float = 1.0,
    scope: str = "tensor",
    compat: str = "paper",
    compute_dtype: str | None = None,
) -> Tensor:
    """base + λ·dis-mean over sign-agreeing trimmed δ_i (top ⌊density·n⌋ |δ| per tensor).

    `scope: model` (the paper) trims with one threshold per model over all its tensors: a first
    pass computes it (`selection.model_magnitude_threshold`) and passes it as the per-model
    `threshold`; `scope: tensor` (mergekit, the default) uses `density` on each tensor.
    """
    check_density("ties", density)
    check_compat("ties", compat)
    check_choice("ties", "elect", elect, ELECT_CHOICES)
    check_choice("ties", "scope", scope, ("tensor", "model"))
    if compat == "mergekit" and scope == "tensor":
        deltas = [
            magnitude_top_k(mergekit_delta(x, base, compute_dtype), float(d))
            for x, d in zip(tensors, density)
        ]
        return combine(
            "ties",
            base,
            deltas,
            weight,
            elect=elect,
            normalize=normalize,
            scale=scale,
            compat=compat,
        )
    if scope == "model":
        if threshold is None or any(float(t) < 0 for t in threshold):
            raise UsageError(
                "method `ties`: `scope: model` needs each model's model-wide `threshold` from a "
                "first pass over all its tensors (merge.methods.selection."
                "model_magnitude_threshold); none was given, so use `scope: tensor`"
            )
        thresholds: list[float | None] = [float(t) for t in threshold]
    else:
        thresholds = magnitude_thresholds(tensors, base, density, at_least_one=compat == "mergekit")
    return fused_merge(
        "ties",
        tensors,
        base,
        weight,
        thresholds=thresholds,
        elect=elect,
        normalize=normalize,
        scale=scale,
        compat=compat,
    )
