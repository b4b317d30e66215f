"""Arcee Fusion: take the model's change only where it is an outlier of importance.

Streamed over chunks of whole rows (the KL is per row): statistics passes find the three
quartiles of the importance scores exactly (`StreamingTopK` on signed values), then each chunk
keeps the entries whose score reaches Q2 + 1.5·IQR.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merge.methods._checks import check_count, check_finite
from merge.methods._gram import by_row_groups
from merge.methods._registry import ROWS, register
from merge.methods._stream import Kernel, rows_of, run_whole
from merge.methods.selection import StreamingTopK

_KL_EPS = 1e-8  # added to both softmaxes so the log ratio stays finite
QUARTILES = (0.25, 0.5, 0.75)


def importance(x: Tensor, base: Tensor) -> Tensor:
    """|x − base| · KL(softmax(x) ‖ softmax(base)), the KL taken per row (last dimension)."""
    p = torch.softmax(x, dim=-1) + _KL_EPS
    q = torch.softmax(base, dim=-1) + _KL_EPS
    kl = (p * (p / q).log()).sum(dim=-1, keepdim=True)  # (..., 1): one divergence per row
    return (x - base).abs() * kl


def quartile_ranks(n: int) -> list[int]:
    """The ascending indices ⌊q·(n − 1)⌋ of Q1, Q2, Q3 (mergekit's rule; float32 product)."""
    return (torch.tensor(QUARTILES) * (n - 1)).long().tolist()


def outlier_threshold(
    q1: float, q2: float, q3: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Q2 + 1.5·(Q3 − Q1), in the scores' dtype as mergekit computes it.

    mergekit 0.1.5 sorts all the scores when there are at most 10^6 and we then agree exactly.
    Above that it sorts 10^6 scores drawn with replacement from torch's global generator, so its
    threshold is a random estimate of this one: it changes from run to run (and with
    `--random-seed`, with the order mergekit visits tensors in), and no fixed draw could repeat
    it. We take the exact order statistics that sample estimates; on 1-4·10^6-entry tensors the
    kept entries then differ from a mergekit run's in about 10^-4 of the entries, as two
    mergekit runs differ from each other (tests/mergekit/test_arcee_fusion_oracle.py).
    """
    q = torch.tensor([q1, q2, q3], dtype=dtype)
    return q[1] + 1.5 * (q[2] - q[0])


class ArceeFusionKernel(Kernel):
    """Scores on chunks of whole rows (fixed row groups, so a row's score has the same bits in
    any chunk); the passes find the quartiles, the apply pass keeps the outliers. A tensor of
    fewer than two dimensions is one row (mergekit's softmax over its last dimension)."""

    def __init__(self, shape: Sequence[int], params: Mapping[str, Any]):
        n = math.prod(int(s) for s in shape)
        self.row = rows_of(shape)
        # the k-th largest for each quartile's ascending index i: k = n − i
        self.select = [StreamingTopK(n, n - i, signed=True) for i in quartile_ranks(max(n, 1))]

    def _scores(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        check_count("arcee_fusion", len(models), at_least=1, at_most=1)
        x, b = models[0].reshape(-1, self.row), base.reshape(-1, self.row)
        return by_row_groups(importance, [x, b], start // self.row).reshape(-1)

    def needs_pass(self) -> bool:
        return any(not s.done for s in self.select)

    def observe(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> None:
        scores = self._scores(start, models, base)
        for s in self.select:
            s.observe(start, scores)

    def end_pass(self) -> None:
        for s in self.select:
            s.end_pass()

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        q1, q2, q3 = (s.threshold for s in self.select)
        threshold = outlier_threshold(q1, q2, q3, base.dtype).to(base.device)
        keep = self._scores(start, models, base) >= threshold
        return base + (models[0] - base) * keep.to(base.dtype)


@register(
    "arcee_fusion",
    reference="Arcee Fusion (Arcee AI, mergekit `arcee_fusion`)",
    min_models=1,
    max_models=1,
    shape=ROWS,
    kernel=lambda shape, params, rng: ArceeFusionKernel(shape, params),
    properties={"idempotent"},
)
def arcee_fusion(tensors: Sequence[Tensor], *, base: Tensor) -> Tensor:
    """base + (x − base)·1{I ≥ Q2 + 1.5·IQR(I)}, I = |x − base|·KL(softmax x ‖ softmax base).

    The quartiles are the sorted scores at ⌊q·(n − 1)⌋, exact over every score (mergekit
    estimates them from a random sample of 10^6 scores when n is larger).
    """
    check_finite("arcee_fusion", tensors, base)
    return run_whole(ArceeFusionKernel(base.shape, {}), tensors, base)
