"""Model Breadcrumbs: mask both magnitude tails of each task vector, then add them up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from merge.methods._checks import check_compat, check_density, check_fraction
from merge.methods._fused import loops
from merge.methods._gta import combine, row_loop_operands, run_merge_loop
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
    looped = _looped(
        "breadcrumbs", tensors, base, weight, density, gamma, None, normalize, scale, compat
    )
    if looped is not None:
        return looped
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
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[float],
    gamma: Sequence[float],
    elect: str | None,
    normalize: bool,
    scale: float,
    compat: str,
) -> Tensor | None:
    """`breadcrumbs`/`breadcrumbs_ties` (paper) in one compiled loop over rows
    (`_loops.banded_merge`): the same bands, the same float32 operations per element. None when
    the loop cannot take the operands."""
    operands = row_loop_operands(tensors, base, compat)
    if operands is None:
        return None
    flats, flat_b, row = operands
    n_top = [int(float(g) * row) for g in gamma]
    n_keep = [min(int(float(d) * row), row - t) for d, t in zip(density, n_top)]
    sparsify = (row, np.asarray(n_top, dtype=np.int64), np.asarray(n_keep, dtype=np.int64))
    out = run_merge_loop(
        loops().banded_merge, flats, flat_b, sparsify, weight, elect, normalize, scale, name
    )
    return out.reshape(base.shape)


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
    _check_band("breadcrumbs_ties", density, gamma, compat)
    looped = _looped(
        "breadcrumbs_ties", tensors, base, weight, density, gamma, elect, normalize, scale, compat
    )
    if looped is not None:
        return looped
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
