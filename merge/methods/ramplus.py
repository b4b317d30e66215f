"""RAM+ (tensor-local): RAM with each model's unique entries boosted by how much it shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.methods._checks import check_positive
from merge.methods._registry import register


@register(
    "ramplus_tl",
    reference="RAM+, Reinforced Agent Merging (arXiv:2601.13572), tensor-local; as in mergekit",
    min_models=1,
    properties={"idempotent"},
)
def ramplus_tl(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> Tensor:
    """base + Σ_i δ_i a_i (λ_i·1{c=1} + 1{c>1}/c), λ_i = 1 + r·clip(S_i/max(U_i, ε), 0, α).

    a_i = 1{|δ_i| > ε} marks model i's active entries and c = Σ_i a_i how many models change
    an entry; S_i and U_i count model i's active entries that others share (c > 1) and that
    only it changes (c = 1), over this tensor. Unique entries are summed, boosted by λ_i;
    shared ones are averaged, as in RAM.
    """
    check_positive("ramplus_tl", "r", r, allow_zero=True)
    check_positive("ramplus_tl", "alpha", alpha, allow_zero=True)
    check_positive("ramplus_tl", "epsilon", epsilon, allow_zero=True)
    deltas = [x - base for x in tensors]
    active = [d.abs() > epsilon for d in deltas]  # a_i
    count = torch.zeros_like(base)
    for a in active:
        count.add_(a.to(base.dtype))
    shared = count > 1
    unique = count == 1
    average = 1.0 / count.clamp(min=1.0)  # the RAM mean over the models changing an entry
    out = base.clone()
    for d, a in zip(deltas, active):
        s_i = float((a & shared).sum())
        u_i = float((a & unique).sum())
        lam = 1.0 + r * min(max(s_i / max(u_i, epsilon), 0.0), alpha)
        gain = torch.where(unique, lam, torch.where(shared, average, 0.0))  # per entry
        out.add_(d * a.to(d.dtype) * gain.to(d.dtype))
    return out
