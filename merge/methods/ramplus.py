"""RAM+ (tensor-local): RAM with each model's unique entries boosted by how much it shares.

λ_i needs two counts per model over the whole tensor (its active entries that others share,
and those only it changes): one statistics pass of exact integer counts, then elementwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merge.methods._checks import check_finite, check_positive
from merge.methods._registry import STATISTICS, register
from merge.methods._stream import Kernel, run_whole


def _activity(
    tensors: Sequence[Tensor], base: Tensor, epsilon: float
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """δ_i, a_i = 1{|δ_i| > ε}, and the masks shared (c > 1) and unique (c = 1)."""
    deltas = [x - base for x in tensors]
    active = [d.abs() > epsilon for d in deltas]
    count = torch.zeros_like(base)
    for a in active:
        count.add_(a.to(base.dtype))
    return deltas, active, count > 1, count == 1


class RamPlusKernel(Kernel):
    """One pass counts S_i = #(a_i ∧ shared) and U_i = #(a_i ∧ unique) (integers, so exact in
    any chunking); the apply pass boosts unique entries by λ_i and averages shared ones."""

    def __init__(self, shape: Sequence[int], params: Mapping[str, Any]):
        self.r = float(params.get("r", 0.1))
        self.alpha = float(params.get("alpha", 0.2))
        self.epsilon = float(params.get("epsilon", 1e-5))
        for name, value in (("r", self.r), ("alpha", self.alpha), ("epsilon", self.epsilon)):
            check_positive("ramplus_tl", name, value, allow_zero=True)
        self.shared: list[int] = []
        self.unique: list[int] = []
        self.gains: list[float] | None = None

    def needs_pass(self) -> bool:
        return self.gains is None

    def observe(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> None:
        assert base is not None
        _, active, shared, unique = _activity(models, base, self.epsilon)
        if not self.shared:
            self.shared, self.unique = [0] * len(models), [0] * len(models)
        for i, a in enumerate(active):
            self.shared[i] += int(torch.count_nonzero(a & shared))
            self.unique[i] += int(torch.count_nonzero(a & unique))

    def end_pass(self) -> None:
        eps = self.epsilon
        self.gains = [
            1.0 + self.r * min(max(s / max(u, eps), 0.0), self.alpha)
            for s, u in zip(self.shared, self.unique)
        ]

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None and self.gains is not None
        deltas, active, shared, unique = _activity(models, base, self.epsilon)
        count = torch.zeros_like(base)
        for a in active:
            count.add_(a.to(base.dtype))
        average = 1.0 / count.clamp(min=1.0)  # the RAM mean over the models changing an entry
        out = base.clone()
        for d, a, lam in zip(deltas, active, self.gains):
            gain = torch.where(unique, lam, torch.where(shared, average, 0.0))  # per entry
            out.add_(d * a.to(d.dtype) * gain.to(d.dtype))
        return out


@register(
    "ramplus_tl",
    reference="RAM+, Reinforced Agent Merging (arXiv:2601.13572), tensor-local; as in mergekit",
    min_models=1,
    shape=STATISTICS,
    kernel=lambda shape, params, rng: RamPlusKernel(shape, params),
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
    check_finite("ramplus_tl", tensors, base)
    params = {"r": r, "alpha": alpha, "epsilon": epsilon}
    return run_whole(RamPlusKernel(base.shape, params), tensors, base)
