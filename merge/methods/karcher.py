"""Karcher (Riemannian) mean of the directions of N tensors on the unit sphere, with weights.

The mean direction always lies in the span of the inputs (it starts as their weighted mean and
each step adds a combination of them), so the iteration runs on its coefficient vector with the
Gram matrix of the inputs: one statistics pass, then an elementwise pass Σ γ_i x_i.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merge.errors import UsageError
from merge.methods._checks import check_compat, check_finite
from merge.methods._gram import BlockGram, gram_matrix, span_combination
from merge.methods._registry import STATISTICS, Compat, register
from merge.methods._stream import Kernel, run_whole


def karcher_mean_coefficients(
    gram: Tensor, alpha: Tensor, *, max_iter: int, tol: float, start: Tensor | None = None
) -> Tensor:
    """b with u* = Σ b_i u_i the weighted Fréchet mean of unit vectors u_i whose Gram matrix is
    `gram` (N, N), by Riemannian descent.

    Iterates T = Σ α_i θ_i/sin θ_i (u_i − cos θ_i u) (the log map), u ← exp_u(T), until ‖T‖ < tol,
    with u = Σ b_i u_i: cos θ_i = (G b)_i, ‖v‖² = vᵀGv for any v in the span. `start`: the
    coefficients of a unit starting point (default: the normalised weighted mean).
    """

    def norm(v: Tensor) -> float:
        return math.sqrt(max(float(v @ gram @ v), 0.0))

    b = alpha.clone() if start is None else start.clone()
    un = norm(b)
    if start is not None or un >= tol:
        b = b / un
    else:  # the weighted mean vanishes (antipodal inputs): start at the first direction
        b = torch.zeros_like(alpha)
        b[0] = 1.0
    for _ in range(max_iter):
        cos = (gram @ b).clamp(-1.0, 1.0)  # (N,)
        theta = torch.acos(cos)
        active = theta >= tol
        # θ/sin θ → 1 as θ → 0; inactive terms contribute nothing.
        coef = torch.where(active, alpha * theta / torch.sin(theta).clamp(min=1e-12), 0.0)
        tangent = coef - float(coef @ cos) * b  # Σ coef_i (u_i − cos_i u)
        step = norm(tangent)
        if step < tol:
            break
        b = b * math.cos(step) + tangent * (math.sin(step) / step)
        b = b / norm(b)
    return b


# Coefficients above this (in units of the inputs) mean the span is nearly degenerate (inputs
# within ~1e-3 rad of antipodal): quadratic forms in them lose |b|²·1e-16, so the direction is
# refined once in a basis that holds it (measured at 1e-7 rad from antipodal: 0.2° and a norm
# 1.0016 off without the refinement, exact to 1e-9 with it).
_WELL_CONDITIONED = 1e3


class KarcherKernel(Kernel):
    """One pass sums the Gram matrix of the inputs; the apply pass is Σ γ_i x_i.

    When the mean direction needs large coefficients (nearly antipodal inputs), a second pass
    sums the Gram matrix of [ũ, x_1, …, x_N], ũ the first estimate evaluated elementwise, and
    the iteration restarts from ũ, where every coefficient is O(1).
    """

    def __init__(self, shape: Sequence[int], params: Mapping[str, Any]):
        weight = [float(v) for v in params["weight"]]
        compat = str(params.get("compat", "paper"))
        check_compat("karcher", compat)
        n = len(weight)
        if compat == "mergekit":
            self.alpha = torch.full((n,), 1.0 / n, dtype=torch.float64)
        else:
            w = torch.tensor(weight, dtype=torch.float64)
            if float(w.sum()) <= 0 or bool((w < 0).any()):
                raise UsageError(
                    f"method `karcher`: weights {weight} must be >= 0 with a positive sum"
                )
            self.alpha = w / w.sum()
        self.max_iter = int(params.get("max_iter", 10))
        self.tol = float(params.get("tol", 1e-5))
        self.gram = BlockGram(n)
        self.first: Tensor | None = None  # ũ = Σ first_i x_i, when refining
        self.scale = 0.0
        self.coefs: list[float] | None = None

    def needs_pass(self) -> bool:
        return self.coefs is None

    def observe(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> None:
        if self.first is None:
            self.gram.add(models)
        else:
            self.gram.add([span_combination(models, self.first.tolist(), torch.float64), *models])

    def end_pass(self) -> None:
        n = len(self.alpha)
        refining = int(self.first is not None)  # ũ comes first in the refining pass
        gram = gram_matrix(self.gram.total()[:, 0], n + refining)
        norms = gram.diagonal().clamp(min=0.0).sqrt()
        inputs = norms[refining:]
        if not refining:
            self.scale = float(self.alpha @ inputs)  # Σ α_i‖x_i‖ over every input, zero ones too
        keep = norms > self.tol
        keep[:refining] = True  # ũ, a unit vector
        coefs = torch.zeros(n, dtype=torch.float64)
        if not bool(keep[refining:].any()):
            self.coefs = coefs.tolist()
            return
        k_norms = norms[keep]
        units = gram[keep][:, keep] / (k_norms[:, None] * k_norms[None, :])
        alpha = torch.cat([torch.zeros(refining, dtype=torch.float64), self.alpha])[keep]
        alpha = alpha / alpha.sum()
        start = torch.zeros_like(alpha)
        start[0] = 1.0
        b = karcher_mean_coefficients(
            units,
            alpha,
            max_iter=self.max_iter,
            tol=self.tol,
            start=start if refining else None,
        )
        direction = torch.zeros(n + refining, dtype=torch.float64)
        direction[keep] = b / k_norms  # u_i = x_i/‖x_i‖
        if refining:
            assert self.first is not None
            coefs = direction[0] * self.first + direction[1:]
        elif float(b.abs().max()) > _WELL_CONDITIONED:
            self.first = direction
            self.gram = BlockGram(n + 1)
            return
        else:
            coefs = direction
        self.coefs = (coefs * self.scale).tolist()

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        assert self.coefs is not None
        return span_combination(models, self.coefs)


@register(
    "karcher",
    reference="Karcher 1977 (Riemannian centre of mass); mergekit karcher",
    per_model={"weight": 1.0},
    min_models=1,
    shape=STATISTICS,
    kernel=lambda shape, params, rng: KarcherKernel(shape, params),
    properties={"idempotent"},
)
def karcher(
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    max_iter: int = 10,
    tol: float = 1e-5,
    compat: Compat = "paper",
) -> Tensor:
    """(Σ α_i‖x_i‖)·u*, u* the α-weighted Karcher mean of x_i/‖x_i‖ (α = w/Σw; mergekit: 1/N)."""
    check_compat("karcher", compat)
    check_finite("karcher", tensors)
    params = {"weight": weight, "max_iter": max_iter, "tol": tol, "compat": compat}
    return run_whole(KarcherKernel(tensors[0].shape, params), tensors, None)
