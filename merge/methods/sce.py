"""SCE (FuseChat): select high-variance entries, weight by task-vector energy, erase conflicts.

Streamed: the selection is an exact top-k of the per-element variance over the models
(`StreamingTopK`, k = ⌊select_topk · #nonzero variances⌋, counted in its first pass); the
energies mean(δ̃_i²) of the selected task vectors take one more pass of float64 sums; sign
election and the weighted disjoint mean are elementwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merge.methods._checks import check_finite, check_fraction
from merge.methods._gram import BlockGram
from merge.methods._gta import elect_sign
from merge.methods._registry import MATRIX, STATISTICS, ComputeDtype, Fraction, register
from merge.methods._stream import Kernel, run_whole
from merge.methods.selection import StreamingTopK, keep_top
from merge.methods.sparsify import COMPUTE_DTYPES, mergekit_delta


def model_variance(deltas: Sequence[Tensor]) -> Tensor:
    """Per element, the population variance over the models (Welford in float64, rounded to
    the deltas' dtype: what `torch.var(dim=0, unbiased=False)` computes, bit for bit)."""
    mean = deltas[0].double()
    m2 = torch.zeros_like(mean)
    for i, d in enumerate(deltas[1:], start=2):
        x = d.double()
        step = x - mean
        mean.add_(step / i)
        m2.add_(step * (x - mean))
    return m2.div_(len(deltas)).to(deltas[0].dtype)


def energy_weights(energy: Sequence[float]) -> list[float]:
    """w_i = e_i / Σ e (uniform when Σ e < 1e-6, as mergekit)."""
    total = sum(energy)
    if abs(total) < 1e-6:
        return [1.0 / len(energy)] * len(energy)
    return [e / total for e in energy]


def sce_merge(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """base + Σ w_i m_i δ_i / Σ w_i m_i, m_i = 1 where sgn δ_i is the elected sign (zeros not)."""
    sign = elect_sign(list(deltas), "sum")
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for d, wi in zip(deltas, weights):
        agree = (d * sign).clamp(min=0.0).sign_()  # 1 where sgn d = elected sign, zeros excluded
        num.add_(d * agree, alpha=wi)
        den.add_(agree, alpha=wi)
    return base + num / den.clamp_(min=1e-6)


class SceKernel(Kernel):
    """Selection passes (select_topk < 1): count the nonzero variances and find the exact top-k
    (ties at the threshold kept in index order); an energy pass: Σ δ̃_i² per model; apply."""

    def __init__(self, shape: Sequence[int], params: Mapping[str, Any]):
        self.numel = math.prod(int(s) for s in shape)
        self.topk = float(params.get("select_topk", 1.0))
        check_fraction("sce", "select_topk", self.topk)
        self.compute_dtype = params.get("compute_dtype")
        self.select = StreamingTopK(self.numel, None) if self.topk < 1.0 else None
        self.nonzero = 0
        self.counted = False
        self.energy: BlockGram | None = None
        self.weights: list[float] | None = None

    def _deltas(self, models: Sequence[Tensor], base: Tensor | None) -> list[Tensor]:
        assert base is not None
        return [mergekit_delta(x, base, self.compute_dtype) for x in models]

    def _selecting(self) -> bool:
        return self.select is not None and not self.select.done

    def _selected(self, start: int, deltas: list[Tensor]) -> list[Tensor]:
        """The task vectors with the unselected entries zeroed."""
        if self.select is None:
            return deltas
        var = model_variance(deltas)
        # kept variances are > 0 (k ≤ #nonzero), so a kept entry is a nonzero one
        keep = keep_top(var, start, self.select.threshold, self.select.cut).ne_(0.0)
        return [d * keep for d in deltas]

    def needs_pass(self) -> bool:
        return self._selecting() or self.weights is None

    def observe(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> None:
        deltas = self._deltas(models, base)
        if self._selecting():
            assert self.select is not None
            var = model_variance(deltas)
            if not self.counted:
                self.nonzero += int(torch.count_nonzero(var))
            self.select.observe(start, var)  # var ≥ 0: its own magnitude
            return
        if self.energy is None:
            self.energy = BlockGram(len(deltas), pairs=[(i, i) for i in range(len(deltas))])
        self.energy.add(self._selected(start, deltas))

    def end_pass(self) -> None:
        if self._selecting():
            assert self.select is not None
            if not self.counted:
                self.select.set_k(int(self.nonzero * self.topk))  # mergekit's k
                self.counted = True
            self.select.end_pass()
            return
        assert self.energy is not None
        sums = self.energy.total()[:, 0]
        self.weights = energy_weights((sums / max(self.numel, 1)).tolist())

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None and self.weights is not None
        return sce_merge(base, self._selected(start, self._deltas(models, base)), self.weights)


def _shape(params: Mapping[str, Any]) -> str:
    """With a mergekit compute dtype, selection reproduces `torch.topk`'s tie order on the
    whole tensor, so it holds the tensor as mergekit does; otherwise it streams."""
    topk = params.get("select_topk", 1.0)
    values = topk if isinstance(topk, (list, tuple)) else [topk]
    selecting = any(isinstance(v, (int, float)) and v < 1.0 for v in values)
    return MATRIX if params.get("compute_dtype") and selecting else STATISTICS


@register(
    "sce",
    reference="Wan et al. 2024, FuseChat (SCE merging, arXiv:2408.07990)",
    min_models=1,
    shape=_shape,
    kernel=lambda shape, params, rng: SceKernel(shape, params),
    properties={"idempotent"},
)
def sce(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    select_topk: Fraction = 1.0,
    compute_dtype: ComputeDtype | None = None,
) -> Tensor:
    """base + Σ w_i m_i δ_i / Σ w_i m_i, w_i ∝ mean(δ_i²), m_i TIES sign agreement, top-var select.

    Exactly k = ⌊select_topk · #nonzero variances⌋ entries are selected, ties at the k-th
    largest variance kept in index order. With `compute_dtype` (a mergekit config's `dtype`),
    task vectors are rounded to it and the variances computed in it, and the k entries chosen
    with `torch.topk`'s tie-breaking, as mergekit does (rounding makes many sums and variances
    tie).
    """
    check_fraction("sce", "select_topk", select_topk)
    check_finite("sce", tensors, base)
    params = {"select_topk": select_topk, "compute_dtype": compute_dtype}
    if _shape(params) == STATISTICS:
        return run_whole(SceKernel(base.shape, params), tensors, base)
    deltas = torch.stack([mergekit_delta(x, base, compute_dtype) for x in tensors])  # (N, *shape)
    assert compute_dtype is not None
    var = deltas.to(COMPUTE_DTYPES[compute_dtype]).var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    if k == 0:
        deltas.zero_()
    else:
        keep = torch.zeros(var.numel(), dtype=deltas.dtype, device=deltas.device)
        keep[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1
        deltas.mul_(keep.reshape(var.shape))
    energy = deltas.reshape(len(tensors), -1).square().mean(dim=1)  # (N,)
    return sce_merge(base, list(deltas), energy_weights(energy.tolist()))
