"""Model Breadcrumbs: mask both magnitude tails of each task vector, then add them up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from merge.methods._checks import check_compat, check_density, check_fraction
from merge.methods._fused import loops, usable
from merge.methods._gta import combine
from merge.methods._registry import (
    MATRIX,
    ROWS,
    Compat,
    ComputeDtype,
    Density,
    Elect,
    Fraction,
    register,
)
from merge.methods._stream import RowsFnKernel
from merge.methods.sparsify import breadcrumbs_band, mergekit_delta

_REF = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)"


def _check_band(name: str, density: Sequence[float], gamma: Sequence[float], compat: str) -> None:
    check_density(name, density)
    check_compat(name, compat)
    for g in gamma:
        check_fraction(name, "gamma", float(g))


def _banded(
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor,
    density: Sequence[float],
    gamma: Sequence[float],
    compat: str,
    compute_dtype: str | None,
) -> list[Tensor]:
    _check_band(name, density, gamma, compat)
    return [
        breadcrumbs_band(
            mergekit_delta(x, base, compute_dtype) if compat == "mergekit" else x - base,
            float(d),
            float(g),
            compat=compat,
        )
        for x, d, g in zip(tensors, density, gamma)
    ]


def _shape(params: Mapping[str, Any]) -> str:
    """Row-wise bands (paper); mergekit's band is over the whole tensor."""
    return MATRIX if params.get("compat") == "mergekit" else ROWS


@register(
    "breadcrumbs",
    reference=_REF,
    per_model={"weight": 1.0, "density": 1.0, "gamma": 0.01},
    shape=_shape,
    kernel=lambda shape, params, rng: RowsFnKernel(breadcrumbs, shape, params, rng),
    properties={"idempotent"},
)
def breadcrumbs(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[Density],
    gamma: Sequence[Fraction],
    normalize: bool = False,
    scale: float = 1.0,
    compat: Compat = "paper",
    compute_dtype: ComputeDtype | None = None,
) -> Tensor:
    """base + λ Σ w_i m_i⊙δ_i, m_i keeps magnitude ranks (γ, γ+density] of each row of δ_i."""
    _check_band("breadcrumbs", density, gamma, compat)
    flats, flat_b = [x.reshape(-1) for x in tensors], base.reshape(-1)
    if (
        compat == "paper"
        and base.dim() > 0
        and all(x.shape == base.shape for x in tensors)
        and flat_b.numel()
        and usable(flat_b, *flats)
    ):
        out = _looped(flats, flat_b, base.shape, weight, density, gamma, normalize, scale)
        return out.reshape(base.shape)
    deltas = _banded("breadcrumbs", tensors, base, density, gamma, compat, compute_dtype)
    return combine(
        "breadcrumbs",
        base,
        deltas,
        weight,
        elect=None,
        normalize=normalize,
        scale=scale,
        compat=compat,
    )


def _looped(
    flats: Sequence[Tensor],
    flat_b: Tensor,
    shape: Sequence[int],
    weight: Sequence[float],
    density: Sequence[float],
    gamma: Sequence[float],
    normalize: bool,
    scale: float,
) -> Tensor:
    """`breadcrumbs` (paper) in one compiled loop over rows (`_loops.banded_merge`): the same
    bands, the same float32 operations per element."""
    row = int(shape[-1]) if len(shape) > 1 else flat_b.numel()
    n_top = [int(float(g) * row) for g in gamma]
    n_keep = [min(int(float(d) * row), row - t) for d, t in zip(density, n_top)]
    total = float(sum(float(w) for w in weight))
    out = torch.empty(flat_b.numel(), dtype=torch.float32)
    loops().banded_merge(
        tuple(x.numpy() for x in flats),
        flat_b.numpy(),
        row,
        np.asarray(n_top, dtype=np.int64),
        np.asarray(n_keep, dtype=np.int64),
        np.asarray([float(w) for w in weight], dtype=np.float32),
        bool(normalize and abs(total) >= 1e-8),
        np.float32(total),
        np.float32(scale),
        out.numpy(),
    )
    return out


@register(
    "breadcrumbs_ties",
    reference=_REF,
    per_model={"weight": 1.0, "density": 1.0, "gamma": 0.01},
    shape=_shape,
    kernel=lambda shape, params, rng: RowsFnKernel(breadcrumbs_ties, shape, params, rng),
    properties={"idempotent"},
)
def breadcrumbs_ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[Density],
    gamma: Sequence[Fraction],
    elect: Elect = "sum",
    normalize: bool = False,
    scale: float = 1.0,
    compat: Compat = "paper",
    compute_dtype: ComputeDtype | None = None,
) -> Tensor:
    """Breadcrumbs masks, then TIES sign election and disjoint merge."""
    deltas = _banded("breadcrumbs_ties", tensors, base, density, gamma, compat, compute_dtype)
    return combine(
        "breadcrumbs_ties",
        base,
        deltas,
        weight,
        elect=elect,
        normalize=normalize,
        scale=scale,
        compat=compat,
    )
