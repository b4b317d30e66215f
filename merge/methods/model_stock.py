"""Model Stock: interpolate between the base and the mean of ≥ 2 fine-tunes by their angle."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from merge.errors import MergeWarning
from merge.methods._checks import check_compat, check_count, check_finite
from merge.methods._registry import register
from merge.threads import one_thread


def model_stock_ratio(
    deltas: Tensor, *, filter_wise: bool, compat: str = "paper", tensor_name: str | None = None
) -> Tensor:
    """t = N·c/(1 + (N−1)·c), c the mean pairwise cosine of the task vectors `deltas` (N, ...).

    Flattened per tensor, or per row (last dimension) when `filter_wise`; returns t broadcastable
    against one tensor. Cosines use max(‖a‖‖b‖, 1e−6) and are clamped to [−1, 1], as in mergekit;
    `paper` then clamps the mean c to [0, 1] with a warning (see `_warn_negative`), so t ∈ [0, 1];
    `mergekit` (0.1.5) keeps c < 0 (t < 0) and t = 0 only at the pole |1 + (N−1)c| < 1e−6.
    """
    n = deltas.shape[0]
    if filter_wise and deltas.dim() > 2:
        vecs = deltas.reshape(n, -1, deltas.shape[-1])  # (N, rows, cols)
    else:
        vecs = deltas.reshape(n, 1, -1)  # (N, 1, numel)
    norms = torch.linalg.vector_norm(vecs, dim=-1)  # (N, rows)
    total = torch.zeros(vecs.shape[1], dtype=deltas.dtype, device=deltas.device)
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            dot = (vecs[i] * vecs[j]).sum(-1)
            total += (dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
            pairs += 1
    c = total / pairs
    if compat == "mergekit":
        den = 1.0 + (n - 1) * c
        pole = den.abs() < _POLE
        t = torch.where(pole, 0.0, n * c / torch.where(pole, 1.0, den))
    else:
        negative = int((c < 0).sum())
        if negative:
            _warn_negative(float(c.min()), negative, c.numel(), tensor_name)
        c = c.clamp(min=0.0)
        t = n * c / (1.0 + (n - 1) * c)  # c ∈ [0, 1]: the denominator is ≥ 1
    if filter_wise and deltas.dim() > 2:
        return t.reshape(*deltas.shape[1:-1], 1)
    return t.reshape([1] * (deltas.dim() - 1))


@register(
    "model_stock",
    reference="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
    min_models=2,
    properties={"idempotent"},
)
def model_stock(
    tensors: Sequence[Tensor],
    *,
    base: Tensor,
    filter_wise: bool = False,
    compat: str = "paper",
    tensor_name: str | None = None,
) -> Tensor:
    """t·mean_i(x_i) + (1−t)·base with t = N cos φ / (1 + (N−1) cos φ), cos φ clamped to ≥ 0."""
    check_count("model_stock", len(tensors), at_least=2)
    check_compat("model_stock", compat)
    check_finite("model_stock", tensors, base, tensor_name=tensor_name)
    if filter_wise and base.dim() > 1:
        deltas = torch.stack([x - base for x in tensors])  # (N, *shape)
        t = model_stock_ratio(deltas, filter_wise=True, compat=compat, tensor_name=tensor_name)
        return base + t * deltas.mean(0)
    with one_thread():
        return _model_stock_flat(tensors, base, compat, tensor_name)


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
        stacklevel=3,
    )


_CHUNK = 1 << 18  # fused chunk: the task vectors never exist as full-size tensors
_POLE = 1e-6  # compat mergekit: |1 + (N−1)c| below this keeps the base (as mergekit 0.1.5)


def _model_stock_flat(
    tensors: Sequence[Tensor], base: Tensor, compat: str, tensor_name: str | None = None
) -> Tensor:
    """Two chunked passes: Gram entries of the task vectors, then base + t·mean_i δ_i."""
    n_models = len(tensors)
    flat_b = base.reshape(-1)
    flats = [x.reshape(-1) for x in tensors]
    n = flat_b.numel()
    gram = torch.zeros(n_models, n_models, dtype=torch.float64, device=base.device)
    bufs = [torch.empty(min(n, _CHUNK), dtype=base.dtype, device=base.device) for _ in tensors]
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        ds = [
            torch.sub(x[start:stop], flat_b[start:stop], out=b[: stop - start])
            for x, b in zip(flats, bufs)
        ]
        for i in range(n_models):
            for j in range(i, n_models):
                gram[i, j] += torch.dot(ds[i], ds[j])  # stays on the device: no sync per chunk
    gram = gram.cpu()  # one host sync per tensor
    norms = gram.diagonal().sqrt()
    cos = [
        max(-1.0, min(1.0, float(gram[i, j]) / max(float(norms[i] * norms[j]), 1e-6)))
        for i in range(n_models)
        for j in range(i + 1, n_models)
    ]
    c = sum(cos) / len(cos)
    if compat == "mergekit":
        den = 1.0 + (n_models - 1) * c
        t = 0.0 if abs(den) < _POLE else n_models * c / den
    else:
        if c < 0:
            _warn_negative(c, 1, 1, tensor_name)
            c = 0.0
        t = n_models * c / (1.0 + (n_models - 1) * c)
    # base + t·mean_i(x_i − base) = (1 − t)·base + (t/N)·Σ x_i
    out = flat_b * (1.0 - t)
    for x in flats:
        out.add_(x, alpha=t / n_models)
    return out.reshape(base.shape)
