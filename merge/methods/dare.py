"""DARE: drop each task-vector entry with probability 1 − density and rescale the rest.

Elementwise: the engine draws the mask by element index (`ElementRandom`), so a chunked merge
drops the same entries as a whole-tensor one. mergekit's L1-norm rescale needs the whole
tensor's norms, so `compat: mergekit` with `rescale` is a whole-matrix call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from merge.methods._checks import check_choice, check_compat, check_density
from merge.methods._gta import ELECT_CHOICES, combine, fused_merge
from merge.methods._registry import ELEMENTWISE, MATRIX, Compat, Density, Elect, register
from merge.methods.selection import Random
from merge.methods.sparsify import dare_drop

_REF = "Yu et al. 2024, Language Models are Super Mario (DARE, arXiv:2311.03099)"


def _dropped(
    tensors: Sequence[Tensor],
    base: Tensor,
    density: Sequence[float],
    rescale: bool,
    compat: str,
    generator: Random,
) -> list[Tensor]:
    return [
        dare_drop(x - base, float(d), rescale=rescale, compat=compat, generator=generator, stream=i)
        for i, (x, d) in enumerate(zip(tensors, density))
    ]


def _shape(params: Mapping[str, Any]) -> str:
    """Elementwise, except mergekit's whole-tensor L1 rescale."""
    mergekit_rescale = params.get("compat") == "mergekit" and params.get("rescale", True)
    return MATRIX if mergekit_rescale else ELEMENTWISE


@register(
    "dare_linear",
    reference=_REF,
    per_model={"weight": 1.0, "density": 1.0},
    shape=_shape,
    properties={"idempotent"},
)
def dare_linear(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[Density],
    rescale: bool = True,
    normalize: bool = False,
    scale: float = 1.0,
    compat: Compat = "paper",
    generator: Random = None,
) -> Tensor:
    """base + λ Σ w_i m_i⊙δ_i/d_i, m_i ~ Bernoulli(d_i) (mergekit: L1-norm rescale)."""
    return _dare(
        "dare_linear",
        tensors,
        base,
        weight,
        density,
        None,
        rescale,
        normalize,
        scale,
        compat,
        generator,
    )


@register(
    "dare_ties",
    reference=_REF,
    per_model={"weight": 1.0, "density": 1.0},
    shape=_shape,
    properties={"idempotent"},
)
def dare_ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[Density],
    elect: Elect = "sum",
    rescale: bool = True,
    normalize: bool = False,
    scale: float = 1.0,
    compat: Compat = "paper",
    generator: Random = None,
) -> Tensor:
    """DARE drop-and-rescale, then TIES sign election and disjoint merge (dis-sum by default)."""
    check_choice("dare_ties", "elect", elect, ELECT_CHOICES)
    return _dare(
        "dare_ties",
        tensors,
        base,
        weight,
        density,
        elect,
        rescale,
        normalize,
        scale,
        compat,
        generator,
    )


def _dare(
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[float],
    elect: str | None,
    rescale: bool,
    normalize: bool,
    scale: float,
    compat: str,
    generator: Random,
) -> Tensor:
    """Both DARE variants: the fused kernel for the paper's 1/p rescale, else drop then combine."""
    check_density(name, density)
    check_compat(name, compat)
    if compat == "paper" and rescale:
        return fused_merge(
            name,
            tensors,
            base,
            weight,
            keep_prob=density,
            generator=generator,
            elect=elect,
            normalize=normalize,
            scale=scale,
            compat=compat,
        )
    deltas = _dropped(tensors, base, density, rescale, compat, generator)
    return combine(
        name, base, deltas, weight, elect=elect, normalize=normalize, scale=scale, compat=compat
    )
