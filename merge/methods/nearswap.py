"""Nearswap: move the base towards the model only where the two are already close."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from merge.methods._checks import check_count
from merge.methods._registry import register


@register(
    "nearswap",
    reference="mergekit nearswap (Goddard et al. 2024, arXiv:2403.13257)",
    min_models=1,
    max_models=1,
    elementwise=True,
    properties={"idempotent"},
)
def nearswap(tensors: Sequence[Tensor], *, base: Tensor, t: float) -> Tensor:
    """w·x + (1 − w)·base with w = clamp(t / max(|base − x|, 1e−6), 0, 1) per entry."""
    check_count("nearswap", len(tensors), at_least=1, at_most=1)
    x = tensors[0]
    w = (t / (base - x).abs().clamp_(min=1e-6)).clamp_(0.0, 1.0)
    return base + w * (x - base)
