"""Fisher merging: a per-element average of the models weighted by their diagonal Fisher.

Statistics come from `compute_fisher(model, batches)` (the model already holds one input's
weights; run it once per model and save the dict with the same tensor names), or from files the
user made elsewhere. The registered method takes them as `statistics`, one tensor per model, the
same shape as the weight; see docs/methods.md for how a recipe names them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merge.errors import UsageError
from merge.methods._checks import check_choice, check_finite
from merge.methods._data_stats import forward_logits, iter_examples
from merge.methods._registry import register

FISHER_KINDS = ("exact", "sampled", "empirical")


def compute_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    n_examples: int = 256,
    kind: str = "exact",
    normalize: bool = False,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Diagonal Fisher F = mean_s E_y[(∇_θ log p_θ(y|x_s))²] over samples s = (example, position).

    Every output position of an example (each token of a sequence) is a sample: its gradient is
    squared on its own, never summed with the other positions' first (issue 14.4: squaring the
    sum was off by a factor 3.1 at two positions). Positions whose label is -100 (`empirical`) or
    whose `attention_mask` is 0 are skipped. kind: `exact` sums over all classes weighted by
    p(y|x) (one backward per position and class; for classifiers), `sampled` draws y ~ p(y|x)
    once per position, `empirical` uses the data's labels. `normalize` divides each Fisher by
    its global L2 norm over the whole model (FusionBench's `normalize_fisher_weight`).
    """
    check_choice("fisher", "kind", kind, FISHER_KINDS)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training

    def add_squared(out: Tensor, weight: float = 1.0) -> None:
        grads = torch.autograd.grad(
            out, list(params.values()), retain_graph=True, allow_unused=True
        )
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[n].add_(g.float().square(), alpha=weight)

    model.eval()
    count = 0
    try:
        for example, target in iter_examples(batches, n_examples):
            logits = forward_logits(model, example)
            logp = F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])  # (P, C)
            keep = _live_positions(example, logp.shape[0])
            if kind == "exact":
                probs = logp.exp().detach()
                for pos in keep:
                    for c in range(logp.shape[-1]):
                        add_squared(logp[pos, c], float(probs[pos, c]))
            else:
                if kind == "empirical":
                    if target is None:
                        raise UsageError(
                            "Fisher `kind: empirical` needs labels in the data batches; "
                            "use `kind: exact` or `sampled`"
                        )
                    y = target.reshape(-1)
                else:
                    y = torch.multinomial(logp.exp().detach(), 1, generator=gen).reshape(-1)
                keep = [pos for pos in keep if int(y[pos]) != -100]
                for pos in keep:
                    add_squared(logp[pos, y[pos]])
            count += len(keep)
    finally:
        model.train(was_training)
    if count == 0:
        raise UsageError(
            "the data for the Fisher gave no examples (or no labelled positions); check --data"
        )
    for f in fisher.values():
        f.div_(count)
    if normalize:
        norm = math.sqrt(sum(float(f.square().sum()) for f in fisher.values()))
        if norm > 0:
            for f in fisher.values():
                f.div_(norm)
    return fisher


def _live_positions(example: Any, n_positions: int) -> list[int]:
    """Output positions that count: all, or those whose `attention_mask` is 1 (padding skipped)."""
    mask = example.get("attention_mask") if isinstance(example, Mapping) else None
    if isinstance(mask, Tensor) and mask.numel() == n_positions:
        return [i for i, m in enumerate(mask.reshape(-1).tolist()) if m]
    return list(range(n_positions))


@register(
    "fisher",
    reference="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832)",
    per_model={"weight": 1.0},
    min_models=1,
    elementwise=True,
    properties={"idempotent", "needs_statistics"},
)
def fisher(
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    statistics: Sequence[Tensor] | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Σ_i w_i F_i⊙θ_i / Σ_i w_i F_i, with each Fisher F_i floored at `eps`."""
    check_finite("fisher", tensors)
    if isinstance(statistics, str):
        raise UsageError(
            f"method `fisher`: `statistics: {statistics}` names a file, but recipes cannot route "
            "statistics files to a method yet; use `merge data-merge fisher ...` or "
            "merge.methods.data_aware.merge_with_data"
        )
    if statistics is None or len(statistics) != len(tensors):
        got = "none" if statistics is None else str(len(statistics))
        raise UsageError(
            f"method `fisher` needs one Fisher tensor per model as `statistics` "
            f"({len(tensors)} models, {got} given); compute them with `merge fisher-stats`"
        )
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for x, f, w in zip(tensors, statistics, weight):
        fw = f.to(x.dtype).clamp(min=eps) * float(w)
        num.addcmul_(fw, x)
        den.add_(fw)
    return num.div_(den)
