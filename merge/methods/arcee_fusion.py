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
    """Q2 + 1.5·(Q3 − Q1), each quartile the sorted score at index ⌊q·(n − 1)⌋ (mergekit's rule,
    the index computed in float32 as mergekit does), in the scores' dtype.

    mergekit 0.1.5 sorts all the scores when there are at most 10^6 and we then agree exactly.
    Above that it sorts 10^6 scores drawn with replacement from torch's global generator, so its
    threshold is a random estimate of this one: it changes from run to run (and with
    `--random-seed`, with the order mergekit visits tensors in), and no fixed draw could repeat
    it. We take the exact order statistics that sample estimates; on 1-4·10^6-entry tensors the
    kept entries then differ from a mergekit run's in about 10^-4 of the entries, as two
    mergekit runs differ from each other (tests/mergekit/test_arcee_fusion_oracle.py).
    """
    flat = scores.reshape(-1)
    at = (torch.tensor(QUARTILES) * (flat.numel() - 1)).long()  # float32 product, floored
    # Three selections instead of a sort: the same order statistics, about twice as fast.
    q1, q2, q3 = (flat.kthvalue(int(i) + 1).values for i in at)
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
