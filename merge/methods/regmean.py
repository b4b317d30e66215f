"""RegMean: per linear layer, the weights minimising Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², from Gram matrices.

W* satisfies W*ᵀ = (Σ_i w_i G̃_i)⁻¹ Σ_i w_i G̃_i W_iᵀ with G_i = X_iᵀX_i / n_i the Gram matrix
of the layer's inputs averaged over its n_i input rows (positions), as FusionBench and MergeLM do
(torch layout: weight is (out, in), G is (in, in)), and G̃ = α·G + (1−α)·diag(G) (off-diagonals
shrunk by α). Tensors without statistics (biases, norms, embeddings) get the weighted mean.
`compute_grams(model, batches)` collects the G_i with forward hooks.

Input directions no model's data ever excites (always-zero inputs, dead units upstream) leave
the Gram sum singular and W* undetermined there: those directions keep the weighted mean
(W* = W̄ + Δ, Δ the minimum-norm solution of (Σ w_i G̃_i)Δᵀ = Σ w_i G̃_i (W_i − W̄)ᵀ).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from merge.errors import MergeWarning, UsageError
from merge.methods._checks import check_finite, check_fraction
from merge.methods._data_stats import forward_logits, iter_examples
from merge.methods._registry import register


def compute_grams(
    model: nn.Module, batches: Iterable[Any], *, n_examples: int = 256
) -> dict[str, Tensor]:
    """{"<linear>.weight": mean_rows xᵀx} over every position of every example, per nn.Linear.

    The mean over input rows (positions) follows FusionBench and MergeLM, so a model whose data
    has more tokens does not weigh more in the merge (`weight` says how much each counts).
    Linear layers whose forward never runs (nn.MultiheadAttention's `out_proj`, whose weight
    the attention function uses directly) get no Gram and a MergeWarning naming them: RegMean
    gives them the weighted mean.
    """
    grams: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []
    linears: dict[str, str] = {}

    def hook_for(key: str, module: nn.Linear) -> Any:
        def hook(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, module.in_features).double()  # (positions, in)
            g = x.T @ x
            grams[key] = grams[key] + g if key in grams else g
            rows[key] = rows.get(key, 0) + x.shape[0]

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            key = f"{name}.weight" if name else "weight"
            linears[key] = name
            hooks.append(module.register_forward_pre_hook(hook_for(key, module)))
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
    missed = [k for k in linears if k not in grams]
    if grams and missed:
        warnings.warn(
            f"RegMean: {len(missed)} linear layer{'s' if len(missed) != 1 else ''} never ran "
            f"their forward ({', '.join(f'`{linears[k]}`' for k in missed[:5])}"
            f"{', ...' if len(missed) > 5 else ''}; nn.MultiheadAttention uses `out_proj.weight` "
            "directly), so they have no Gram matrix and get the weighted mean",
            MergeWarning,
            stacklevel=2,
        )
    return {k: (v / max(rows[k], 1)).float() for k, v in grams.items()}


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
    """W* = (Σ w_i G̃_i W_iᵀ)ᵀ(Σ w_i G̃_i)⁻ᵀ for a linear weight with Grams; weighted mean otherwise."""
    check_fraction("regmean", "alpha", alpha)
    if any(float(w) < 0 for w in weight) or float(sum(weight)) <= 0:
        raise UsageError(
            f"method `regmean`: weights {list(weight)} must be >= 0 with a positive sum "
            "(they scale each model's Gram matrix)"
        )
    check_finite("regmean", tensors)
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
    check_finite("regmean", statistics)
    total = float(sum(weight))
    mean_t = torch.zeros(w0.shape[1], w0.shape[0], dtype=torch.float64, device=w0.device)
    for x, w in zip(tensors, weight):
        mean_t += x.double().T * (float(w) / total)  # W̄ᵀ, (in, out)
    g_sum = torch.zeros_like(statistics[0], dtype=torch.float64)
    rhs = torch.zeros(w0.shape[1], w0.shape[0], dtype=torch.float64, device=w0.device)  # (in, out)
    for x, g, w in zip(tensors, statistics, weight):
        gs = shrink_off_diagonal(g.double(), alpha) * float(w)
        g_sum += gs
        rhs += gs @ (x.double().T - mean_t)
    try:
        delta = torch.linalg.solve(g_sum, rhs)
        if not bool(torch.isfinite(delta).all()):
            raise RuntimeError("non-finite solution")
    except RuntimeError:  # singular Gram sum: minimum-norm Δ, so unexcited directions keep W̄
        delta = torch.linalg.pinv(g_sum, hermitian=True) @ rhs
    return (mean_t + delta).T.to(w0.dtype).contiguous()


def dead_inputs(statistics: Sequence[Tensor]) -> int:
    """How many input features are zero in every Gram (on the diagonal): no data reached them."""
    diag = torch.zeros(statistics[0].shape[0], dtype=torch.float64)
    for g in statistics:
        diag += torch.diagonal(g.double()).abs().cpu()
    return int((diag == 0).sum())
