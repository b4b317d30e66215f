"""Passthrough: copy one input tensor, optionally scaled (frankenmerges, layer stacking)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from merge.methods._checks import check_count
from merge.methods._registry import register


@register(
    "passthrough",
    reference="mergekit passthrough (layer stacking via `slices`)",
    per_model={"scale": 1.0},
    min_models=1,
    max_models=1,
    elementwise=True,
    properties={"idempotent"},
)
def passthrough(tensors: Sequence[Tensor], *, scale: Sequence[float]) -> Tensor:
    """x · scale for the single input x."""
    check_count("passthrough", len(tensors), at_least=1, at_most=1)
    s = float(scale[0])
    return tensors[0].clone() if s == 1.0 else tensors[0] * s
