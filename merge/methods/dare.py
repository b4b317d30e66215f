"""DARE: drop each task-vector entry with probability 1 − density and rescale the rest.

Not `elementwise`: the random mask is drawn for the whole tensor from one seeded generator, so
chunking a tensor would change which entries are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.methods._checks import check_choice, check_compat, check_density
from merge.methods._gta import ELECT_CHOICES, combine, fused_merge
from merge.methods._registry import register
from merge.methods.sparsify import dare_drop

_REF = "Yu et al. 2024, Language Models are Super Mario (DARE, arXiv:2311.03099)"


def _dropped(
    tensors: Sequence[Tensor],
    base: Tensor,
    density: Sequence[float],
    rescale: bool,
    compat: str,
    generator: torch.Generator | None,
) -> list[Tensor]:
    return [
        dare_drop(x - base, float(d), rescale=rescale, compat=compat, generator=generator)
        for x, d in zip(tensors, density)
    ]


@register(
    "dare_linear",
    reference=_REF,
    per_model={"weight": 1.0, "density": 1.0},
    properties={"idempotent"},
)
def dare_linear(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[float],
    rescale: bool = True,
    normalize: bool = False,
    scale: float = 1.0,
    compat: str = "paper",
    generator: torch.Generator | None = None,
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
    properties={"idempotent"},
)
def dare_ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[float],
    elect: str = "sum",
    rescale: bool = True,
    normalize: bool = False,
    scale: float = 1.0,
    compat: str = "paper",
    generator: torch.Generator | None = None,
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
    generator: torch.Generator | None,
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
