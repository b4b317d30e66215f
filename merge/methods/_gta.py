"""Shared last step of the task-vector family: sign election and (disjoint) weighted merge.

Given sparsified task vectors δ̃_i and weights w_i:

- no election:  mixed = Σ w_i δ̃_i, divided by Σ w_i when `normalize` (Σ w ≈ 0 → no division).
- election (TIES), `compat="paper"` (Yadav et al.; peft's `ties`): the sign
  s = sgn(Σ_i δ̃_i) ("sum") or sgn(Σ_i sgn δ̃_i) ("count") on the *unweighted* trimmed vectors,
  s = +1 where the total is 0; agreeing set A = {i : sgn δ̃_i = s} (zeros never agree);
  mixed = Σ_{i∈A} w_i δ̃_i / max(|A|, 1) (dis-mean) when `normalize`, else the dis-sum.
- election, `compat="mergekit"`: the same on ω_i = w_i δ̃_i, and the dis-mean divides by
  Σ_{i∈A} w_i (1 where that is 0).

The result is base + λ·mixed with λ = `scale`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.methods._checks import check_choice

ELECT_CHOICES = ("sum", "count")


def elect_sign(vectors: Sequence[Tensor], elect: str) -> Tensor:
    """+1/−1 per entry: the sign of Σ v_i ("sum") or of Σ sgn(v_i) ("count"); 0 counts as +1."""
    total = torch.zeros_like(vectors[0])
    for v in vectors:
        total.add_(v if elect == "sum" else v.sign())
    return torch.where(total >= 0, 1.0, -1.0).to(vectors[0].dtype)


def combine(
    method: str,
    base: Tensor,
    deltas: Sequence[Tensor],
    weight: Sequence[float],
    *,
    elect: str | None,
    normalize: bool,
    scale: float,
    compat: str,
) -> Tensor:
    """base + scale · merge(δ̃_i, w_i), with or without TIES sign election (see module doc)."""
    if elect is None:
        mixed = torch.zeros_like(base)
        for d, w in zip(deltas, weight):
            mixed.add_(d, alpha=float(w))
        total = float(sum(weight))
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
        return mixed.mul_(scale).add_(base)
    check_choice(method, "elect", elect, ELECT_CHOICES)
    if compat == "mergekit":
        weighted = [d * float(w) for d, w in zip(deltas, weight)]
        sign = elect_sign(weighted, elect)
        mixed = torch.zeros_like(base)
        div = torch.zeros_like(base)
        for v, w in zip(weighted, weight):
            agree = v.sign() == sign
            mixed.add_(torch.where(agree, v, 0.0))
            div.add_(agree.to(base.dtype), alpha=float(w))
        if normalize:
            mixed.div_(torch.where(div == 0, 1.0, div))
        return mixed.mul_(scale).add_(base)
    sign = elect_sign(deltas, elect)
    mixed = torch.zeros_like(base)
    count = torch.zeros_like(base)
    for d, w in zip(deltas, weight):
        agree = d.sign() == sign
        mixed.add_(torch.where(agree, d, 0.0), alpha=float(w))
        count.add_(agree.to(base.dtype))
    if normalize:
        mixed.div_(count.clamp_(min=1.0))
    return mixed.mul_(scale).add_(base)
