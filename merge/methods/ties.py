"""TIES-merging: trim each task vector to its top-k magnitudes, elect a sign, disjoint mean."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor

from merge.errors import UsageError
from merge.methods._checks import check_choice, check_compat, check_density
from merge.methods._gta import ELECT_CHOICES, combine, fused_merge
from merge.methods._registry import (
    MATRIX,
    MODEL,
    STATISTICS,
    Compat,
    ComputeDtype,
    Density,
    Elect,
    register,
)
from merge.methods._stream import Kernel, run_whole
from merge.methods.selection import StreamingTopK, keep_count
from merge.methods.sparsify import magnitude_top_k, mergekit_delta


class TiesKernel(Kernel):
    """Statistics passes find each model's exact top-k of |x_i − base| (threshold and tie cut,
    `StreamingTopK`); the apply pass trims, elects and merges chunk by chunk."""

    reads_bfloat16 = True

    def __init__(self, shape: Sequence[int], params: Mapping[str, Any]):
        self.p = dict(params)
        n = 1
        for s in shape:
            n *= int(s)
        self.n = n
        density = [float(d) for d in self.p["density"]]
        self.select: list[StreamingTopK | None] = []
        self.thresholds: list[float | None] = []
        if self.p.get("scope", "tensor") == "model":
            threshold = self.p.get("threshold")
            if threshold is None or any(float(t) < 0 for t in threshold):
                raise UsageError(
                    "method `ties`: `scope: model` needs each model's model-wide `threshold` "
                    "from a first pass over all its tensors (merge.methods.selection."
                    "model_magnitude_threshold); none was given, so use `scope: tensor`"
                )
            self.thresholds = [float(t) for t in threshold]
            return
        for d in density:
            if d >= 1.0:
                self.select.append(None)
                continue
            k = keep_count(n, d)
            if self.p.get("compat") == "mergekit" and n > 0:
                k = max(k, 1)  # mergekit 0.1.5 keeps at least one entry
            self.select.append(StreamingTopK(n, k))

    def needs_pass(self) -> bool:
        return any(s is not None and not s.done for s in self.select)

    def observe(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> None:
        assert base is not None
        for x, s in zip(models, self.select):
            if s is not None and not s.done:
                s.observe_abs_diff(start, x, base, widen=self.widen_bfloat16)

    def end_pass(self) -> None:
        for s in self.select:
            if s is not None:
                s.end_pass()

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        if self.select:
            thresholds = [None if s is None else s.threshold for s in self.select]
            cuts = [self.n if s is None else s.cut for s in self.select]
        else:
            thresholds, cuts = list(self.thresholds), [self.n] * len(models)
        return fused_merge(
            "ties",
            models,
            base,
            self.p["weight"],
            thresholds=thresholds,
            cuts=cuts,
            offset=start,
            elect=self.p.get("elect", "sum"),
            normalize=bool(self.p.get("normalize", True)),
            scale=float(self.p.get("scale", 1.0)),
            compat=self.p.get("compat", "paper"),
            widen=self.widen_bfloat16,
        )


def _shape(params: Mapping[str, Any]) -> str:
    if params.get("scope") == "model":
        return MODEL
    # compat: mergekit reproduces mergekit's whole-tensor sort (its tie order) in its compute
    # dtype, so it holds the tensor as mergekit does; our own TIES streams.
    return MATRIX if params.get("compat") == "mergekit" else STATISTICS


@register(
    "ties",
    reference="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
    per_model={"weight": 1.0, "density": 1.0, "threshold": -1.0},
    shape=_shape,
    kernel=lambda shape, params, rng: TiesKernel(shape, params),
    properties={"idempotent"},
)
def ties(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    weight: Sequence[float],
    density: Sequence[Density],
    threshold: Sequence[float] | None = None,
    elect: Elect = "sum",
    normalize: bool = True,
    scale: float = 1.0,
    scope: Literal["tensor", "model"] = "tensor",
    compat: Compat = "paper",
    compute_dtype: ComputeDtype | None = None,
) -> Tensor:
    """base + λ·dis-mean over sign-agreeing trimmed δ_i (top ⌊density·n⌋ |δ| per tensor).

    Exactly k = ⌊density·n⌋ entries of each task vector survive the trim: entries tied with
    the k-th largest magnitude are kept in index order until there are k. `scope: model` (the
    paper) trims with one threshold per model over all its tensors: a first pass computes it
    (`selection.model_magnitude_threshold`) and passes it as the per-model `threshold` (ties at
    that threshold are all kept); `scope: tensor` (mergekit, the default) uses `density` on
    each tensor.
    """
    params = {
        "weight": weight,
        "density": density,
        "threshold": threshold,
        "elect": elect,
        "normalize": normalize,
        "scale": scale,
        "scope": scope,
        "compat": compat,
    }
    check_density("ties", density)
    check_compat("ties", compat)
    check_choice("ties", "elect", elect, ELECT_CHOICES)
    check_choice("ties", "scope", scope, ("tensor", "model"))
    if compat == "mergekit" and scope == "tensor":
        deltas = [
            magnitude_top_k(mergekit_delta(x, base, compute_dtype), float(d))
            for x, d in zip(tensors, density)
        ]
        return combine(
            "ties",
            base,
            deltas,
            weight,
            elect=elect,
            normalize=normalize,
            scale=scale,
            compat=compat,
        )
    return run_whole(TiesKernel(base.shape, params), tensors, base)
