"""RAM: sum the task-vector entries only one model changed, average the ones several changed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.methods._checks import check_positive
from merge.methods._registry import register


@register(
    "ram",
    reference="RAM, Reinforced Agent Merging (arXiv:2601.13572); as in mergekit",
    min_models=1,
    elementwise=True,
    properties={"idempotent"},
)
def ram(tensors: Sequence[Tensor], *, base: Tensor, epsilon: float = 1e-5) -> Tensor:
    """base + Σ_i δ_i a_i / max(c, 1), a_i = 1{|δ_i| > ε}, c = Σ_i a_i (unique: summed)."""
    check_positive("ram", "epsilon", epsilon, allow_zero=True)
    total = torch.zeros_like(base)
    count = torch.zeros_like(base)
    for x in tensors:
        d = x - base
        active = (d.abs() - epsilon).clamp_(min=0.0).sign_()  # 1{|δ| > ε} in float
        total.add_(d * active)
        count.add_(active)
    return base + total / count.clamp_(min=1.0)
