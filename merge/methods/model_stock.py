"""Model Stock: interpolate between the base and the mean of ≥ 2 fine-tunes by their angle."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.methods._checks import check_count
from merge.methods._registry import register


def model_stock_ratio(deltas: Tensor, *, filter_wise: bool) -> Tensor:
    """t = N·c/(1 + (N−1)·c), c the mean pairwise cosine of the task vectors `deltas` (N, ...).

    Flattened per tensor, or per row (last dimension) when `filter_wise`; returns t broadcastable
    against one tensor. Cosines use max(‖a‖‖b‖, 1e−6) and are clamped to [−1, 1], as in mergekit.
    """
    n = deltas.shape[0]
    if filter_wise and deltas.dim() > 2:
        vecs = deltas.reshape(n, -1, deltas.shape[-1])  # (N, rows, cols)
    else:
        vecs = deltas.reshape(n, 1, -1)  # (N, 1, numel)
    norms = torch.linalg.vector_norm(vecs, dim=-1)  # (N, rows)
    total = torch.zeros(vecs.shape[1], dtype=deltas.dtype, device=deltas.device)
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            dot = (vecs[i] * vecs[j]).sum(-1)
            total += (dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
            pairs += 1
    c = total / pairs
    t = n * c / (1.0 + (n - 1) * c)
    if filter_wise and deltas.dim() > 2:
        return t.reshape(*deltas.shape[1:-1], 1)
    return t.reshape([1] * (deltas.dim() - 1))


@register(
    "model_stock",
    reference="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
    min_models=2,
    properties={"idempotent"},
)
def model_stock(tensors: Sequence[Tensor], *, base: Tensor, filter_wise: bool = False) -> Tensor:
    """t·mean_i(x_i) + (1−t)·base with t = N cos φ / (1 + (N−1) cos φ)."""
    check_count("model_stock", len(tensors), at_least=2)
    deltas = torch.stack([x - base for x in tensors])  # (N, *shape)
    t = model_stock_ratio(deltas, filter_wise=filter_wise)
    return base + t * deltas.mean(0)
