"""TALL masks and Consensus merging: keep the weights that at least k tasks find important."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from merge.errors import UsageError
from merge.methods._checks import check_choice, check_finite, check_positive
from merge.methods._gta import combine
from merge.methods._registry import ELEMENTWISE, STATISTICS, register
from merge.methods._stream import Kernel, run_whole
from merge.methods.selection import StreamingTopK, trim_below

_REF = "Wang et al. 2024, Localizing Task Information (TALL masks, Consensus; arXiv:2405.07813)"


TIES_TOP = 0.2  # tall_masks' `ties_merging(..., reset_thresh=20, merge_func="dis-sum")`


def ties_trim(delta: Tensor, top: float = TIES_TOP) -> Tensor:
    """δ where |δ| ≥ the (n − ⌊top·n⌋)-th smallest |δ|, else 0 (tall_masks' `topk_values_mask`).

    As the reference, this keeps the ⌊top·n⌋ + 1 largest entries and every entry tied with the
    last of them (per tensor here; the reference flattens the whole model).
    """
    flat = delta.abs().reshape(-1)
    n = flat.numel()
    if n == 0:
        return delta.clone()
    kth = torch.kthvalue(flat, n - int(n * top)).values
    return torch.where(delta.abs() >= kth, delta, 0.0)


def ties_keep_count(numel: int, top: float = TIES_TOP) -> int:
    """`ties_trim` keeps every |δ| ≥ the k-th largest, k = ⌊top·n⌋ + 1 (at most n)."""
    return min(numel, int(numel * top) + 1)


def multitask_vector(
    base: Tensor,
    deltas: Sequence[Tensor],
    weight: Sequence[float],
    aggregate: str,
    thresholds: Sequence[float] | None = None,
) -> Tensor:
    """τ_MTL = Σ w_t τ_t ("sum", task arithmetic) or TIES on the τ_t ("ties"): top-20% trim,
    sign elected by the sum of the trimmed τ_t, disjoint sum (the TALL-masks reference).

    `thresholds`: each τ_t's trim threshold over its whole tensor, when `deltas` are a chunk.
    """
    check_choice("consensus", "aggregate", aggregate, ("sum", "ties"))
    zero = torch.zeros_like(base)
    if aggregate == "ties" and thresholds is not None:
        deltas = [trim_below(d, t) for d, t in zip(deltas, thresholds)]
    elif aggregate == "ties":
        deltas = [ties_trim(d) for d in deltas]
    return combine(
        "consensus",
        zero,
        deltas,
        weight,
        elect="sum" if aggregate == "ties" else None,
        normalize=False,
        scale=1.0,
        compat="paper",
    )


def tall_masks(deltas: Sequence[Tensor], mtl: Tensor, tall_lambda: Sequence[float]) -> list[Tensor]:
    """m_t = 1{|τ_t| > λ_t·|τ_MTL − τ_t|}: where task t dominates the rest of the merge."""
    for lam in tall_lambda:
        check_positive("consensus", "tall_lambda", float(lam), allow_zero=True)
    return [d.abs() > float(lam) * (mtl - d).abs() for d, lam in zip(deltas, tall_lambda)]


class TiesTrimKernel(Kernel):
    """`aggregate: ties` trims each task vector at its (⌊0.2·n⌋ + 1)-th largest |τ_t| over the
    whole tensor: statistics passes find those thresholds exactly (`StreamingTopK`), then the
    rest is elementwise (`finish` on each chunk with the thresholds)."""

    def __init__(
        self,
        shape: Sequence[int],
        params: Mapping[str, Any],
        finish: Callable[..., Tensor],
    ):
        n = math.prod(int(s) for s in shape)
        self.params, self.finish = dict(params), finish
        self.select = [StreamingTopK(n, ties_keep_count(n)) for _ in params["weight"]]

    def needs_pass(self) -> bool:
        return any(not s.done for s in self.select)

    def observe(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> None:
        assert base is not None
        for x, s in zip(models, self.select):
            s.observe_abs_diff(start, x, base)

    def end_pass(self) -> None:
        for s in self.select:
            s.end_pass()

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        thresholds = [s.threshold for s in self.select]  # every tie kept: no index cut
        return self.finish(models, base=base, thresholds=thresholds, **self.params)


def _shape(params: Mapping[str, Any]) -> str:
    """`aggregate: ties` needs each task vector's trim threshold: a statistics pass."""
    return STATISTICS if params.get("aggregate", "sum") == "ties" else ELEMENTWISE


def _kernel(finish: Callable[..., Tensor]) -> Callable[..., Kernel | None]:
    def make(shape: Sequence[int], params: Mapping[str, Any], rng: object) -> Kernel | None:
        if params.get("aggregate", "sum") != "ties":
            return None  # elementwise: the function on each chunk
        return TiesTrimKernel(shape, params, finish)

    return make


def _consensus(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    tall_lambda: Sequence[float],
    k: int = 2,
    aggregate: str = "sum",
    scale: float = 1.0,
    thresholds: Sequence[float] | None = None,
) -> Tensor:
    if int(k) != k or k < 0:
        raise UsageError(f"method `consensus`: `k` is {k}; it must be a whole number >= 0")
    deltas = [x - base for x in tensors]
    mtl = multitask_vector(base, deltas, weight, aggregate, thresholds)
    votes = torch.zeros_like(base)
    for m in tall_masks(deltas, mtl, tall_lambda):
        votes.add_(m.to(base.dtype))
    kept = torch.where(votes >= int(k), mtl, 0.0)
    return kept.mul_(scale).add_(base)


@register(
    "consensus",
    reference=_REF,
    per_model={"weight": 1.0, "tall_lambda": 0.6},
    shape=_shape,
    kernel=_kernel(_consensus),
    properties={"idempotent"},
)
def consensus(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    tall_lambda: Sequence[float],
    k: int = 2,
    aggregate: Literal["sum", "ties"] = "sum",
    scale: float = 1.0,
) -> Tensor:
    """base + α·1{Σ_t m_t ≥ k}⊙τ_MTL (k = 0: plain task arithmetic; k > T: the base)."""
    if int(k) != k or k < 0:
        raise UsageError(f"method `consensus`: `k` is {k}; it must be a whole number >= 0")
    check_finite("consensus", tensors, base)
    params: dict[str, Any] = {"weight": weight, "tall_lambda": tall_lambda, "k": k}
    params |= {"aggregate": aggregate, "scale": scale}
    if aggregate == "ties":
        return run_whole(TiesTrimKernel(base.shape, params, _consensus), tensors, base)
    return _consensus(tensors, base=base, **params)


def _tall_mask(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    tall_lambda: Sequence[float],
    task: int = 0,
    aggregate: str = "sum",
    thresholds: Sequence[float] | None = None,
) -> Tensor:
    if int(task) != task or not 0 <= task < len(tensors):
        raise UsageError(
            f"method `tall_mask`: `task` is {task}; it must index one of the {len(tensors)} "
            f"models (0 to {len(tensors) - 1})"
        )
    deltas = [x - base for x in tensors]
    mtl = multitask_vector(base, deltas, weight, aggregate, thresholds)
    m = tall_masks(deltas, mtl, tall_lambda)[int(task)]
    return torch.where(m, mtl, 0.0).add_(base)


@register(
    "tall_mask",
    reference=_REF,
    per_model={"weight": 1.0, "tall_lambda": 0.6},
    shape=_shape,
    kernel=_kernel(_tall_mask),
    properties={"idempotent"},
)
def tall_mask(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    tall_lambda: Sequence[float],
    task: int = 0,
    aggregate: Literal["sum", "ties"] = "sum",
) -> Tensor:
    """θ_task ≈ base + m_task⊙τ_MTL: the TALL-mask reconstruction of one task's model."""
    if int(task) != task or not 0 <= task < len(tensors):
        raise UsageError(
            f"method `tall_mask`: `task` is {task}; it must index one of the {len(tensors)} "
            f"models (0 to {len(tensors) - 1})"
        )
    check_finite("tall_mask", tensors, base)
    params: dict[str, Any] = {"weight": weight, "tall_lambda": tall_lambda, "task": task}
    params["aggregate"] = aggregate
    if aggregate == "ties":
        return run_whole(TiesTrimKernel(base.shape, params, _tall_mask), tensors, base)
    return _tall_mask(tensors, base=base, **params)
