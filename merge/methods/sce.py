"""SCE (FuseChat): select high-variance entries, weight by task-vector energy, erase conflicts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.methods._checks import check_fraction
from merge.methods._gta import elect_sign
from merge.methods._registry import ComputeDtype, Fraction, register
from merge.methods.sparsify import COMPUTE_DTYPES, mergekit_delta


@register(
    "sce",
    reference="Wan et al. 2024, FuseChat (SCE merging, arXiv:2408.07990)",
    min_models=1,
    properties={"idempotent"},
)
def sce(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    select_topk: Fraction = 1.0,
    compute_dtype: ComputeDtype | None = None,
) -> Tensor:
    """base + Σ w_i m_i δ_i / Σ w_i m_i, w_i ∝ mean(δ_i²), m_i TIES sign agreement, top-var select.

    With `compute_dtype` (a mergekit config's `dtype`), task vectors are rounded to it and the
    variances computed in it, and exactly k entries kept with `torch.topk`'s tie-breaking, as
    mergekit does (rounding makes many sums and variances tie).
    """
    check_fraction("sce", "select_topk", select_topk)
    deltas = torch.stack([mergekit_delta(x, base, compute_dtype) for x in tensors])  # (N, *shape)
    if select_topk < 1.0:
        if compute_dtype is not None:
            var = deltas.to(COMPUTE_DTYPES[compute_dtype]).var(dim=0, unbiased=False)
        else:
            var = deltas.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        if k == 0:
            deltas.zero_()
        elif compute_dtype is not None:
            keep = torch.zeros(var.numel(), dtype=deltas.dtype, device=deltas.device)
            keep[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1
            deltas.mul_(keep.reshape(var.shape))
        else:
            thr = var.reshape(-1).kthvalue(var.numel() - k + 1).values
            deltas.mul_((var >= thr).to(deltas.dtype))
    sign = elect_sign(list(deltas), "sum")
    energy = deltas.reshape(len(tensors), -1).square().mean(dim=1)  # (N,)
    total = float(energy.sum())
    w = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1.0 / len(tensors))
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for d, wi in zip(deltas, w.tolist()):
        agree = (d * sign).clamp(min=0.0).sign_()  # 1 where sgn d = elected sign, zeros excluded
        num.add_(d * agree, alpha=wi)
        den.add_(agree, alpha=wi)
    return base + num / den.clamp_(min=1e-6)
