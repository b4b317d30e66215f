"""Spectral merges of 2-D task vectors: TSV-Merge, Iso-C and Iso-CTS (other tensors: mean τ).

All SVDs run in float64 on the layer's task vectors and the result is cast back to float32.
They run on one intra-op thread (CPU): LAPACK's blocking depends on the thread count, so the
same recipe could otherwise round differently under OMP_NUM_THREADS=1 and 2 (issue 15.19).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.methods._checks import check_finite, check_fraction
from merge.methods._registry import register
from merge.threads import one_thread


def polar_factor(a: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (Procrustes): a = P S Qᵀ ↦ P Qᵀ."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _mean_delta(tensors: Sequence[Tensor], base: Tensor) -> Tensor:
    out = torch.zeros_like(base)
    for x in tensors:
        out.add_(x - base)
    return out.div_(len(tensors))


def tsv_factors(deltas: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(U⊥, σ̂, V⊥): each task keeps its top ⌊r/T⌋ (≥ 1) singular triplets; U and V orthogonalised."""
    t = len(deltas)
    m, n = deltas[0].shape
    r = min(m, n)
    k = max(1, r // t)
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_cat = torch.cat(us, dim=1)  # (m, kT)
    v_cat = torch.cat(vs, dim=1)  # (n, kT)
    return polar_factor(u_cat), torch.cat(ss), polar_factor(v_cat)


@register(
    "tsv",
    reference="Gargiulo et al. 2025, Task Singular Vectors (TSV-Merge, arXiv:2412.00081)",
    min_models=1,
    properties={"idempotent"},
)
def tsv(tensors: Sequence[Tensor], *, base: Tensor, scale: float = 1.0) -> Tensor:
    """base + α·U⊥ diag(σ̂) V⊥ᵀ from the tasks' top singular vectors (2-D); else base + α·mean τ."""
    check_finite("tsv", tensors, base)
    if base.dim() != 2:
        return _mean_delta(tensors, base).mul_(scale).add_(base)
    with one_thread():
        u, s, v = tsv_factors([x - base for x in tensors])
        delta = (u * s) @ v.T
    return delta.to(base.dtype).mul_(scale).add_(base)


@register(
    "iso_c",
    reference="Marczak et al. 2025, No Task Left Behind (Iso-C, arXiv:2502.04959)",
    min_models=1,
    properties={"idempotent"},
)
def iso_c(tensors: Sequence[Tensor], *, base: Tensor, scale: float = 1.0) -> Tensor:
    """base + α·σ̄ U Vᵀ where Σ_t τ_t = U diag(σ) Vᵀ and σ̄ = mean(σ) (2-D); else base + α·mean τ."""
    check_finite("iso_c", tensors, base)
    if base.dim() != 2:
        return _mean_delta(tensors, base).mul_(scale).add_(base)
    total = torch.zeros_like(base, dtype=torch.float64)
    for x in tensors:
        total += (x - base).double()
    with one_thread():
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        delta = s.mean() * (u @ vh)
    return delta.to(base.dtype).mul_(scale).add_(base)


@register(
    "iso_cts",
    reference="Marczak et al. 2025, No Task Left Behind (Iso-CTS, arXiv:2502.04959)",
    min_models=1,
    properties={"idempotent"},
)
def iso_cts(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    scale: float = 1.0,
    common_space_fraction: float = 0.8,
) -> Tensor:
    """Common top-k subspace of Σ τ_t plus each task's top components outside it, isotropic σ̄."""
    check_fraction("iso_cts", "common_space_fraction", common_space_fraction)
    check_finite("iso_cts", tensors, base)
    if base.dim() != 2:
        return _mean_delta(tensors, base).mul_(scale).add_(base)
    with one_thread():
        delta = _iso_cts_delta([(x - base).double() for x in tensors], common_space_fraction)
    return delta.to(base.dtype).mul_(scale).add_(base)


def _iso_cts_delta(deltas: list[Tensor], common_space_fraction: float) -> Tensor:
    t = len(deltas)
    r = min(deltas[0].shape)
    k = int(common_space_fraction * r)
    # Components each task adds outside the common subspace: rounded as the reference (Python's
    # round, half to even; ViT-B, 20 tasks: round(7.7) = 8), at most ⌊r/T⌋ so that k ≥ 0.
    per_task = min(round((r - k) / t), r // t)
    k = r - per_task * t  # so that r − k is divisible by T
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k].T]
    if per_task > 0:
        uc = u[:, :k]  # (m, k)
        for d in deltas:
            residual = d - uc @ (uc.T @ d)  # task t's update outside the common subspace
            ut, st, vth = torch.linalg.svd(residual, full_matrices=False)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vs.append(vth[:per_task].T)
    u_all = polar_factor(torch.cat(us, dim=1))  # (m, r)
    v_all = polar_factor(torch.cat(vs, dim=1))  # (n, r)
    sigma = torch.cat(ss).mean()
    return sigma * (u_all @ v_all.T)
