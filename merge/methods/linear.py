"""Weighted averages of checkpoints (model soups)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.methods._registry import register


def normalized_weights(weights: Sequence[float], normalize: bool) -> list[float]:
    """Weights divided by their sum when `normalize`; a zero sum is an error, never NaN."""
    if not normalize:
        return list(weights)
    total = float(sum(weights))
    if abs(total) < 1e-12:
        raise ValueError(
            f"weights {list(weights)} sum to zero, so they cannot be normalized; "
            "change a weight or set `normalize: false`"
        )
    return [w / total for w in weights]


@register(
    "linear",
    reference="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
    per_model={"weight": 1.0},
    elementwise=True,
    affine=lambda per_model, params: (
        normalized_weights(per_model["weight"], bool(params.get("normalize", True))),
        0.0,
    ),
    properties={"idempotent"},
)
def linear(tensors: Sequence[Tensor], *, weight: Sequence[float], normalize: bool = True) -> Tensor:
    """Σ w_i x_i, divided by Σ w_i when `normalize` (the default, as in mergekit)."""
    w = normalized_weights(weight, normalize)
    out = torch.zeros_like(tensors[0])
    for x, wi in zip(tensors, w):
        out.add_(x, alpha=wi)
    return out
