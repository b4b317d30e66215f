"""Model Stock: interpolate between the base and the mean of ≥ 2 fine-tunes by their angle.

t needs only the pairwise cosines of the task vectors: over the whole tensor a statistics pass
sums their Gram matrix; per row (`filter_wise`) each chunk of whole rows has its own. Then
base·(1 − t) + (t/N)·Σ x_i, chunk by chunk.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from merge.errors import MergeWarning
from merge.methods._checks import check_compat, check_count, check_finite
from merge.methods._fused import NO_BFLOAT16, NO_FLOAT32, as_array, loops, usable
from merge.methods._gram import BlockGram, all_pairs, row_gram
from merge.methods._registry import ROWS, STATISTICS, Compat, register
from merge.methods._stream import GramPass, Kernel, OrderedSum, run_whole

_POLE = 1e-6  # compat mergekit: |1 + (N−1)c| below this keeps the base (as mergekit 0.1.5)


def model_stock_ratio(
    sums: Tensor, n: int, compat: str = "paper", dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """(t, c) per vector from the Gram sums (`all_pairs(n)` order, (P, vectors)) of the N task
    vectors: c the mean pairwise cosine, t = N·c/(1 + (N−1)·c), computed in `dtype` (mergekit's
    arithmetic rounds norms and dot products to the data's dtype).

    Cosines use max(‖a‖‖b‖, 1e−6) and are clamped to [−1, 1], as in mergekit; `paper` then
    clamps c to [0, 1] (the caller warns, see `_warn_negative`), so t ∈ [0, 1]; `mergekit`
    (0.1.5) keeps c < 0 (t < 0) and t = 0 only at the pole |1 + (N−1)c| < 1e−6.
    """
    pairs = all_pairs(n)
    sq = {i: sums[p] for p, (i, j) in enumerate(pairs) if i == j}
    norms = {i: v.clamp(min=0.0).sqrt().to(dtype) for i, v in sq.items()}
    sums = sums.to(dtype)
    total = torch.zeros_like(sums[0])
    count = 0
    for p, (i, j) in enumerate(pairs):
        if i != j:
            total += (sums[p] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
            count += 1
    c = total / count
    if compat == "mergekit":
        den = 1.0 + (n - 1) * c
        pole = den.abs() < _POLE
        t = torch.where(pole, 0.0, n * c / torch.where(pole, 1.0, den))
    else:
        cc = c.clamp(min=0.0)
        t = n * cc / (1.0 + (n - 1) * cc)  # c ∈ [0, 1]: the denominator is ≥ 1
    return t, c


def _warn_negative(c_min: float, n_neg: int, n_all: int, tensor_name: str | None) -> None:
    """c < 0 is clamped to 0 (t = 0, the base): the paper's geometry needs cos φ > 0.

    Model Stock assumes fine-tunes that scatter around a common centre, so their task vectors
    make an acute angle; for c < 0 the formula gives t < 0 (extrapolating away from the
    fine-tunes, t → −∞ at the pole c = −1/(N−1); cos −0.999 gave t ≈ −2000). mergekit 0.1.5
    applies it unclamped.
    """
    where = f"tensor `{tensor_name}`" if tensor_name else "a tensor"
    rows = f" in {n_neg} of {n_all} rows" if n_all > 1 else ""
    warnings.warn(
        f"model_stock: {where} has task vectors pointing apart (mean cosine {c_min:.3g} < 0"
        f"{rows}); Model Stock needs cos > 0, so t is clamped to 0 there and the base is kept",
        MergeWarning,
        stacklevel=4,
    )


class ModelStockKernel(Kernel):
    """Whole tensor: one pass sums the Gram matrix of the task vectors, then
    base·(1 − t) + (t/N)·Σ x_i. `filter_wise` (tensors of ≥ 2 dimensions): chunks of whole
    rows, t per row from the rows' own sums; negative rows are counted over the tensor and
    reported once, with its last chunk."""

    reads_bfloat16 = True

    def __init__(self, shape: Sequence[int], params: Mapping[str, Any]):
        self.compat = str(params.get("compat", "paper"))
        check_compat("model_stock", self.compat)
        self.tensor_name = params.get("tensor_name")
        self.numel = math.prod(int(s) for s in shape)
        self.rows = bool(params.get("filter_wise", False)) and len(shape) > 1
        self.row = max(int(shape[-1]), 1) if self.rows else 1
        self.gram: BlockGram | None = None
        self.t: float | None = None
        self._neg, self._c_min, self._n_rows = 0, math.inf, 0

    def needs_pass(self) -> bool:
        return not self.rows and self.t is None

    def observe(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> None:
        assert base is not None
        check_count("model_stock", len(models), at_least=2)
        if self.gram is None:
            self.gram = BlockGram(len(models))
        if self._looped(models, base):
            self.gram.add_differences(models, base)
            return
        models, base = self._widened(models, base)
        self.gram.add([x - base for x in models])

    def gram_pass(self, models: int, has_base: bool) -> GramPass | None:
        if self.rows or not has_base:
            return None  # per-row sums; without a base the ordinary pass says what is wrong
        check_count("model_stock", models, at_least=2)
        self.gram = BlockGram(models)
        return GramPass(self.gram, tuple(range(models)), minus_base=True)

    def ordered_sum(self, models: int, has_base: bool) -> OrderedSum | None:
        if self.rows or self.t is None or not has_base:
            return None
        keep, share = self._weights(models)
        return OrderedSum((models, *range(models)), (keep, *[share] * models))

    def _weights(self, models: int) -> tuple[float, float]:
        """(1 − t, t/N) as the float32 values the loops multiply by."""
        assert self.t is not None
        return float(np.float32(1.0 - self.t)), float(np.float32(self.t / models))

    def _looped(self, models: Sequence[Tensor], base: Tensor) -> bool:
        """The compiled loops take the chunks: models of one dtype, float32 or (widened)
        bfloat16, on the CPU; whole-tensor, not per row."""
        return (
            not self.rows
            and len({x.dtype for x in models}) == 1
            and usable(base, *models, widen=self.widen_bfloat16)
        )

    def _widened(self, models: Sequence[Tensor], base: Tensor) -> tuple[Sequence[Tensor], Tensor]:
        """float32 copies of bfloat16 chunks the engine handed over as read (torch paths)."""
        if not self.widen_bfloat16:
            return models, base
        return [x.float() for x in models], base.float()

    def end_pass(self) -> None:
        assert self.gram is not None
        n = self.gram.k
        t, c = model_stock_ratio(self.gram.total(), n, self.compat)
        if self.compat != "mergekit" and float(c[0]) < 0:
            _warn_negative(float(c[0]), 1, 1, self.tensor_name)
        self.t = float(t[0])

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        assert base is not None
        check_count("model_stock", len(models), at_least=2)
        n = len(models)
        if not self.rows and self._looped(models, base):
            out = torch.empty(base.shape, dtype=torch.float32)
            self._scaled_sum(models, base, out.numpy(), NO_BFLOAT16)
            return out
        models, base = self._widened(models, base)
        if not self.rows:
            assert self.t is not None
            # base + t·mean_i(x_i − base) = (1 − t)·base + (t/N)·Σ x_i
            out = base * (1.0 - self.t)
            for x in models:
                out.add_(x, alpha=self.t / n)
            return out
        b = base.reshape(-1, self.row)  # (rows, row)
        xs = [x.reshape(-1, self.row) for x in models]
        sums = row_gram([x - b for x in xs], start // self.row)
        if self.compat == "mergekit":  # mergekit's formula, in its arithmetic
            t = model_stock_ratio(sums, n, self.compat, base.dtype)[0].to(base.device)[:, None]
            mean = torch.stack(xs).sum(0) / n
            return (t * mean + (1 - t) * b).reshape(-1)
        t, c = model_stock_ratio(sums, n, self.compat)
        self._count_negative(c, start + base.numel())
        keep = (1.0 - t).to(base.device, base.dtype)[:, None]
        share = (t / n).to(base.device, base.dtype)[:, None]
        out = b * keep
        for x in xs:
            out.add_(x * share)
        return out.reshape(-1)

    def apply_bfloat16(
        self, start: int, models: Sequence[Tensor], base: Tensor | None, out: Tensor
    ) -> bool | None:
        assert base is not None
        if self.rows or not self._looped(models, base):
            return None
        return self._scaled_sum(models, base, NO_FLOAT32, as_array(out))

    def _scaled_sum(
        self, models: Sequence[Tensor], base: Tensor, out: np.ndarray, out16: np.ndarray
    ) -> bool:
        """(1 − t)·base + (t/N)·Σ x_i by the compiled loop, into `out` or rounded into `out16`."""
        check_count("model_stock", len(models), at_least=2)
        keep, share = (np.float32(w) for w in self._weights(len(models)))
        xs = tuple(as_array(x) for x in models)
        return bool(loops().scaled_sum(xs, as_array(base), keep, share, out, out16))

    def _count_negative(self, c: Tensor, stop: int) -> None:
        """Count rows with c < 0 (paper); warn once, when the tensor's last row is done."""
        if self.compat == "mergekit":
            return
        neg = c < 0
        self._neg += int(neg.sum())
        self._n_rows += c.numel()
        if bool(neg.any()):
            self._c_min = min(self._c_min, float(c.min()))
        if stop >= self.numel and self._neg:
            _warn_negative(self._c_min, self._neg, self._n_rows, self.tensor_name)


def _shape(params: Mapping[str, Any]) -> str:
    """Per row (`filter_wise`): whole rows per chunk; else a statistics pass."""
    return ROWS if params.get("filter_wise", False) else STATISTICS


@register(
    "model_stock",
    reference="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
    min_models=2,
    shape=_shape,
    kernel=lambda shape, params, rng: ModelStockKernel(shape, params),
    properties={"idempotent"},
)
def model_stock(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    filter_wise: bool = False,
    compat: Compat = "paper",
    tensor_name: str | None = None,
) -> Tensor:
    """t·mean_i(x_i) + (1−t)·base with t = N cos φ / (1 + (N−1) cos φ), cos φ clamped to ≥ 0."""
    check_count("model_stock", len(tensors), at_least=2)
    check_compat("model_stock", compat)
    check_finite("model_stock", tensors, base, tensor_name=tensor_name)
    params = {"filter_wise": filter_wise, "compat": compat, "tensor_name": tensor_name}
    return run_whole(ModelStockKernel(base.shape, params), tensors, base)
