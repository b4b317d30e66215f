"""Karcher (Riemannian) mean of the directions of N tensors on the unit sphere, with weights."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from merge.errors import UsageError
from merge.methods._checks import check_compat, check_finite
from merge.methods._registry import register


def karcher_mean_direction(units: Tensor, alpha: Tensor, *, max_iter: int, tol: float) -> Tensor:
    """The weighted Fréchet mean of unit rows `units` (N, n) on the sphere, by Riemannian descent.

    Iterates T = Σ α_i θ_i/sin θ_i (u_i − cos θ_i u) (the log map), u ← exp_u(T), until ‖T‖ < tol.
    """
    u = (alpha[:, None] * units).sum(0)
    un = float(torch.linalg.vector_norm(u))
    u = u / un if un >= tol else units[0].clone()
    for _ in range(max_iter):
        cos = (units @ u).clamp(-1.0, 1.0)  # (N,)
        theta = torch.acos(cos)
        active = theta >= tol
        # θ/sin θ → 1 as θ → 0; inactive terms contribute nothing.
        coef = torch.where(active, alpha * theta / torch.sin(theta).clamp(min=1e-12), 0.0)
        tangent = (coef[:, None] * (units - cos[:, None] * u[None, :])).sum(0)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        u = u * math.cos(step) + tangent * (math.sin(step) / step)
        u = u / torch.linalg.vector_norm(u)
    return u


@register(
    "karcher",
    reference="Karcher 1977 (Riemannian centre of mass); mergekit karcher",
    per_model={"weight": 1.0},
    min_models=1,
    properties={"idempotent"},
)
def karcher(
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    max_iter: int = 10,
    tol: float = 1e-5,
    compat: str = "paper",
) -> Tensor:
    """(Σ α_i‖x_i‖)·u*, u* the α-weighted Karcher mean of x_i/‖x_i‖ (α = w/Σw; mergekit: 1/N)."""
    check_compat("karcher", compat)
    check_finite("karcher", tensors)
    n = len(tensors)
    if compat == "mergekit":
        alpha_all = torch.full((n,), 1.0 / n, dtype=torch.float64)
    else:
        w = torch.tensor([float(v) for v in weight], dtype=torch.float64)
        if float(w.sum()) <= 0 or bool((w < 0).any()):
            raise UsageError(
                f"method `karcher`: weights {list(weight)} must be >= 0 with a positive sum"
            )
        alpha_all = w / w.sum()
    shape = tensors[0].shape
    xs = torch.stack([x.reshape(-1) for x in tensors]).double()  # (N, n)
    norms = torch.linalg.vector_norm(xs, dim=1)
    scale = float((alpha_all * norms).sum())
    keep = norms > tol
    if not bool(keep.any()):
        return torch.zeros(shape, dtype=tensors[0].dtype, device=tensors[0].device)
    units = xs[keep] / norms[keep][:, None]
    alpha = alpha_all[keep] / alpha_all[keep].sum()
    u = karcher_mean_direction(units, alpha, max_iter=max_iter, tol=tol)
    return (u * scale).to(tensors[0].dtype).reshape(shape)
