"""DELLA: drop task-vector entries with magnitude-ranked probabilities, rescale, then merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from merge.errors import UsageError
from merge.methods._checks import check_compat, check_density
from merge.methods._fused import loops
from merge.methods._gta import combine, row_loop_operands, run_merge_loop
from merge.methods._registry import (
    MATRIX,
    ROWS,
    Compat,
    Density,
    Elect,
    NonNegative,
    register,
)
from merge.methods._stream import ElementRandom
from merge.methods.selection import Random
from merge.methods.sparsify import della_drop

_REF = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"


def _dropped(
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor,
    density: Sequence[float],
    epsilon: Sequence[float],
    rescale: bool,
    compat: str,
    generator: Random,
) -> list[Tensor]:
    _check_della(name, density, epsilon, compat)
    return [
        della_drop(
            x - base,
            float(d),
            float(e),
            rescale=rescale,
            compat=compat,
            generator=generator,
            stream=i,
        )
        for i, (x, d, e) in enumerate(zip(tensors, density, epsilon))
    ]


def _check_della(
    name: str, density: Sequence[float], epsilon: Sequence[float], compat: str
) -> None:
    check_density(name, density)
    check_compat(name, compat)
    for i, (d, e) in enumerate(zip(density, epsilon)):
        d, e = float(d), float(e)
        if d >= 1.0:
            continue
        upper_ok = d + e < 1.0 if compat == "mergekit" else d + e <= 1.0
        if not (e >= 0 and d - e > 0 and upper_ok):
            raise UsageError(
                f"method `{name}`: model {i + 1} has density {d} and epsilon {e}, so the keep "
                f"probabilities span [{d - e:.3g}, {d + e:.3g}], which must lie inside (0, 1]; "
                "lower `epsilon` or move `density` away from 0 and 1"
            )


def _looped(
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[float],
    epsilon: Sequence[float],
    rescale: bool,
    elect: str | None,
    normalize: bool,
    scale: float,
    compat: str,
    generator: Random,
) -> Tensor | None:
    """DELLA (paper) in one compiled loop over rows (`_loops.della_merge`): ranks by a radix
    sort per row, the counter draws of `ElementRandom` (model i on stream i), the same float32
    operations per element. None when the loop cannot take the call (a torch generator, or
    operands it cannot read)."""
    operands = row_loop_operands(tensors, base, compat)
    if operands is None or not isinstance(generator, ElementRandom):
        return None
    _check_della(name, density, epsilon, compat)
    flats, flat_b, row = operands
    sparsify = (
        row,
        np.asarray([float(d) for d in density], dtype=np.float64),
        np.asarray([float(e) for e in epsilon], dtype=np.float64),
        bool(rescale),
        np.asarray([generator.seed(i) for i in range(len(flats))], dtype=np.uint64),
        generator.offset,
    )
    out = run_merge_loop(
        loops().della_merge, flats, flat_b, sparsify, weight, elect, normalize, scale, name
    )
    return out.reshape(base.shape)


def _shape(params: Mapping[str, Any]) -> str:
    """Row-wise (magnitude ranks per row), except mergekit's whole-tensor L1 rescale."""
    mergekit_rescale = params.get("compat") == "mergekit" and params.get("rescale", True)
    return MATRIX if mergekit_rescale else ROWS


@register(
    "della",
    reference=_REF,
    per_model={"weight": 1.0, "density": 1.0, "epsilon": 0.15},
    shape=_shape,
    properties={"idempotent"},
)
def della(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[Density],
    epsilon: Sequence[NonNegative],
    elect: Elect = "sum",
    rescale: bool = True,
    normalize: bool = True,
    scale: float = 1.0,
    compat: Compat = "paper",
    generator: Random = None,
) -> Tensor:
    """MagPrune (p_i from row magnitude ranks, δ_i/p_i), TIES election, disjoint mean, λ."""
    looped = _looped(
        "della", tensors, base, weight, density, epsilon, rescale, elect, normalize, scale,
        compat, generator,
    )  # fmt: skip
    if looped is not None:
        return looped
    deltas = _dropped("della", tensors, base, density, epsilon, rescale, compat, generator)
    return combine(
        "della",
        base,
        deltas,
        weight,
        elect=elect,
        normalize=normalize,
        scale=scale,
        compat=compat,
    )


@register(
    "della_linear",
    reference=_REF,
    per_model={"weight": 1.0, "density": 1.0, "epsilon": 0.15},
    shape=_shape,
    properties={"idempotent"},
)
def della_linear(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[Density],
    epsilon: Sequence[NonNegative],
    rescale: bool = True,
    normalize: bool = False,
    scale: float = 1.0,
    compat: Compat = "paper",
    generator: Random = None,
) -> Tensor:
    """MagPrune then a plain weighted sum of the task vectors (no sign election)."""
    looped = _looped(
        "della_linear", tensors, base, weight, density, epsilon, rescale, None, normalize,
        scale, compat, generator,
    )  # fmt: skip
    if looped is not None:
        return looped
    deltas = _dropped("della_linear", tensors, base, density, epsilon, rescale, compat, generator)
    return combine(
        "della_linear",
        base,
        deltas,
        weight,
        elect=None,
        normalize=normalize,
        scale=scale,
        compat=compat,
    )
