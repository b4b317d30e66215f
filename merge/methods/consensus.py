"""TALL masks and Consensus merging: keep the weights that at least k tasks find important."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from merge.errors import UsageError
from merge.methods._checks import check_choice, check_finite, check_positive
from merge.methods._gta import combine
from merge.methods._registry import register

_REF = "Wang et al. 2024, Localizing Task Information (TALL masks, Consensus; arXiv:2405.07813)"


TIES_TOP = 0.2  # tall_masks' `ties_merging(..., reset_thresh=20, merge_func="dis-sum")`


def ties_trim(delta: Tensor, top: float = TIES_TOP) -> Tensor:
    """δ where |δ| ≥ the (n − ⌊top·n⌋)-th smallest |δ|, else 0 (tall_masks' `topk_values_mask`).

    As the reference, this keeps the ⌊top·n⌋ + 1 largest entries and every entry tied with the
    last of them (per tensor here; the reference flattens the whole model).
    """
    flat = delta.abs().reshape(-1)
    n = flat.numel()
    if n == 0:
        return delta.clone()
    kth = torch.kthvalue(flat, n - int(n * top)).values
    return torch.where(delta.abs() >= kth, delta, 0.0)


def multitask_vector(
    base: Tensor, deltas: Sequence[Tensor], weight: Sequence[float], aggregate: str
) -> Tensor:
    """τ_MTL = Σ w_t τ_t ("sum", task arithmetic) or TIES on the τ_t ("ties"): top-20% trim,
    sign elected by the sum of the trimmed τ_t, disjoint sum (the TALL-masks reference)."""
    check_choice("consensus", "aggregate", aggregate, ("sum", "ties"))
    zero = torch.zeros_like(base)
    if aggregate == "ties":
        deltas = [ties_trim(d) for d in deltas]
    return combine(
        "consensus",
        zero,
        deltas,
        weight,
        elect="sum" if aggregate == "ties" else None,
        normalize=False,
        scale=1.0,
        compat="paper",
    )


def tall_masks(deltas: Sequence[Tensor], mtl: Tensor, tall_lambda: Sequence[float]) -> list[Tensor]:
    """m_t = 1{|τ_t| > λ_t·|τ_MTL − τ_t|}: where task t dominates the rest of the merge."""
    for lam in tall_lambda:
        check_positive("consensus", "tall_lambda", float(lam), allow_zero=True)
    return [d.abs() > float(lam) * (mtl - d).abs() for d, lam in zip(deltas, tall_lambda)]


@register(
    "consensus",
    reference=_REF,
    per_model={"weight": 1.0, "tall_lambda": 0.6},
    elementwise=True,
    properties={"idempotent"},
)
def consensus(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    tall_lambda: Sequence[float],
    k: int = 2,
    aggregate: Literal["sum", "ties"] = "sum",
    scale: float = 1.0,
) -> Tensor:
    """base + α·1{Σ_t m_t ≥ k}⊙τ_MTL (k = 0: plain task arithmetic; k > T: the base)."""
    if int(k) != k or k < 0:
        raise UsageError(f"method `consensus`: `k` is {k}; it must be a whole number >= 0")
    check_finite("consensus", tensors, base)
    deltas = [x - base for x in tensors]
    mtl = multitask_vector(base, deltas, weight, aggregate)
    votes = torch.zeros_like(base)
    for m in tall_masks(deltas, mtl, tall_lambda):
        votes.add_(m.to(base.dtype))
    kept = torch.where(votes >= int(k), mtl, 0.0)
    return kept.mul_(scale).add_(base)


@register(
    "tall_mask",
    reference=_REF,
    per_model={"weight": 1.0, "tall_lambda": 0.6},
    elementwise=True,
    properties={"idempotent"},
)
def tall_mask(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    tall_lambda: Sequence[float],
    task: int = 0,
    aggregate: Literal["sum", "ties"] = "sum",
) -> Tensor:
    """θ_task ≈ base + m_task⊙τ_MTL: the TALL-mask reconstruction of one task's model."""
    if int(task) != task or not 0 <= task < len(tensors):
        raise UsageError(
            f"method `tall_mask`: `task` is {task}; it must index one of the {len(tensors)} "
            f"models (0 to {len(tensors) - 1})"
        )
    check_finite("tall_mask", tensors, base)
    deltas = [x - base for x in tensors]
    mtl = multitask_vector(base, deltas, weight, aggregate)
    m = tall_masks(deltas, mtl, tall_lambda)[int(task)]
    return torch.where(m, mtl, 0.0).add_(base)
