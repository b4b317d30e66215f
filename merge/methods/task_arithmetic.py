"""Task arithmetic: add scaled task vectors (fine-tuned minus base) to the base."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from merge.methods._registry import register


@register(
    "task_arithmetic",
    reference="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
    per_model={"weight": 1.0},
    elementwise=True,
    properties={"idempotent"},
)
def task_arithmetic(
    tensors: Sequence[Tensor], *, base: Tensor, weight: Sequence[float], scale: float = 1.0
) -> Tensor:
    """base + λ Σ w_i (x_i − base), λ = `scale` (mergekit's `lambda`)."""
    out = base.clone()
    for x, wi in zip(tensors, weight):
        out.add_(x - base, alpha=scale * wi)
    return out
