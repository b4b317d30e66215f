"""Task arithmetic: add scaled task vectors (fine-tuned minus base) to the base."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from merge.methods._registry import register


def _fold(weight: Sequence[float], scale: float) -> tuple[list[float], float]:
    """base + λ Σ w_i (x_i − base) as coefficients: λ w_i on x_i, 1 − Σ λ w_i on the base."""
    coefs = [scale * float(w) for w in weight]
    base = 1.0
    for c in coefs:
        base += -c
    return coefs, base


@register(
    "task_arithmetic",
    reference="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
    per_model={"weight": 1.0},
    elementwise=True,
    affine=lambda per_model, params: _fold(per_model["weight"], float(params.get("scale", 1.0))),
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
