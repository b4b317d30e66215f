"""RegMean: per linear layer, the weights minimising Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², from Gram matrices.

W* satisfies W*ᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ with G_i = X_iᵀX_i the Gram matrix of the layer's
inputs (torch layout: weight is (out, in), G is (in, in)) and G̃ = α·G + (1−α)·diag(G)
(off-diagonals shrunk by α). Tensors without statistics (biases, norms, embeddings) get the
weighted mean. `compute_grams(model, batches)` collects the G_i with forward hooks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from merge.errors import UsageError
from merge.methods._checks import check_fraction
from merge.methods._data_stats import forward_logits, iter_examples
from merge.methods._registry import register


def compute_grams(
    model: nn.Module, batches: Iterable[Any], *, n_examples: int = 256
) -> dict[str, Tensor]:
    """{"<linear>.weight": Σ_x xᵀx} over every position of every example, for each nn.Linear."""
    grams: dict[str, Tensor] = {}
    hooks = []

    def hook_for(name: str, module: nn.Linear) -> Any:
        def hook(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, module.in_features).double()  # (positions, in)
            g = x.T @ x
            key = f"{name}.weight" if name else "weight"
            grams[key] = grams[key] + g if key in grams else g

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook_for(name, module)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for example, _ in iter_examples(batches, n_examples):
                forward_logits(model, example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: v.float() for k, v in grams.items()}


def shrink_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """α·G + (1−α)·diag(G)."""
    return gram * alpha + torch.diag(torch.diagonal(gram)) * (1.0 - alpha)


@register(
    "regmean",
    reference="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights (arXiv:2212.09849)",
    per_model={"weight": 1.0},
    min_models=1,
    properties={"idempotent", "needs_statistics"},
)
def regmean(
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    statistics: Sequence[Tensor] | None = None,
    alpha: float = 0.1,
) -> Tensor:
    """W* = (Σ G̃_i W_iᵀ)ᵀ(Σ G̃_i)⁻ᵀ for a linear weight with Grams; weighted mean otherwise."""
    check_fraction("regmean", "alpha", alpha)
    if isinstance(statistics, str):
        raise UsageError(
            f"method `regmean`: `statistics: {statistics}` names a file, but recipes cannot route "
            "statistics files to a method yet; use `merge data-merge regmean ...` or "
            "merge.methods.data_aware.merge_with_data"
        )
    if statistics is None:
        total = float(sum(weight))
        out = torch.zeros_like(tensors[0])
        for x, w in zip(tensors, weight):
            out.add_(x, alpha=float(w) / total)
        return out
    if len(statistics) != len(tensors):
        raise UsageError(
            f"method `regmean` needs one Gram matrix per model ({len(tensors)} models, "
            f"{len(statistics)} given); compute them with `merge regmean-stats`"
        )
    w0 = tensors[0]
    if w0.dim() != 2 or any(g.shape != (w0.shape[1], w0.shape[1]) for g in statistics):
        raise UsageError(
            f"method `regmean`: a weight of shape {tuple(w0.shape)} needs (in, in) = "
            f"({w0.shape[-1]}, {w0.shape[-1]}) Gram matrices, got "
            f"{[tuple(g.shape) for g in statistics]}"
        )
    g_sum = torch.zeros_like(statistics[0], dtype=torch.float64)
    rhs = torch.zeros(w0.shape[1], w0.shape[0], dtype=torch.float64, device=w0.device)  # (in, out)
    for x, g in zip(tensors, statistics):
        gs = shrink_off_diagonal(g.double(), alpha)
        g_sum += gs
        rhs += gs @ x.double().T
    try:
        wt = torch.linalg.solve(g_sum, rhs)
    except RuntimeError:  # singular Gram sum (too little data): least-squares solution
        wt = torch.linalg.lstsq(g_sum, rhs).solution
    return wt.T.to(w0.dtype).contiguous()
