"""TIES-merging: trim each task vector to its top-k magnitudes, elect a sign, disjoint mean."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from merge.methods._checks import check_choice, check_compat, check_density
from merge.methods._gta import ELECT_CHOICES, fused_merge, magnitude_thresholds
from merge.methods._registry import register


@register(
    "ties",
    reference="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
    per_model={"weight": 1.0, "density": 1.0},
    properties={"idempotent"},
)
def ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[float],
    elect: str = "sum",
    normalize: bool = True,
    scale: float = 1.0,
    compat: str = "paper",
) -> Tensor:
    """base + λ·dis-mean over sign-agreeing trimmed δ_i (top ⌊density·n⌋ |δ| per tensor)."""
    check_density("ties", density)
    check_compat("ties", compat)
    check_choice("ties", "elect", elect, ELECT_CHOICES)
    thresholds = magnitude_thresholds(tensors, base, density)
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
