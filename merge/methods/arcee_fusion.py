"""Arcee Fusion: take the model's change only where it is an outlier of importance."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.methods._registry import register

_KL_EPS = 1e-8  # added to both softmaxes so the log ratio stays finite
QUARTILES = (0.25, 0.5, 0.75)


def importance(x: Tensor, base: Tensor) -> Tensor:
    """|x − base| · KL(softmax(x) ‖ softmax(base)), the KL taken per row (last dimension)."""
    p = torch.softmax(x, dim=-1) + _KL_EPS
    q = torch.softmax(base, dim=-1) + _KL_EPS
    kl = (p * (p / q).log()).sum(dim=-1, keepdim=True)  # (..., 1): one divergence per row
    return (x - base).abs() * kl


def outlier_threshold(scores: Tensor) -> Tensor:
    """Q2 + 1.5·(Q3 − Q1), each quartile the sorted score at index ⌊q·(n − 1)⌋ (mergekit's
    rule; it estimates them from a random sample of 10^6 scores when n is larger, we use all)."""
    flat = scores.reshape(-1).sort().values
    at = (torch.tensor(QUARTILES) * (flat.numel() - 1)).long()  # float32 product, floored
    q1, q2, q3 = flat[at.to(flat.device)]
    return q2 + 1.5 * (q3 - q1)


@register(
    "arcee_fusion",
    reference="Arcee Fusion (Arcee AI, mergekit `arcee_fusion`)",
    min_models=1,
    max_models=1,
    properties={"idempotent"},
)
def arcee_fusion(tensors: Sequence[Tensor], *, base: Tensor) -> Tensor:
    """base + (x − base)·1{I ≥ Q2 + 1.5·IQR(I)}, I = |x − base|·KL(softmax x ‖ softmax base)."""
    (x,) = tensors
    scores = importance(x, base)
    keep = scores >= outlier_threshold(scores)
    return base + (x - base) * keep.to(x.dtype)
