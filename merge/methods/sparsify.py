"""Sparsifiers for task vectors δ = x − base: magnitude trim, DARE drop, breadcrumbs band, DELLA.

Each takes one task vector and returns a tensor of the same shape. `compat="mergekit"` switches
the rescaling of the random drops to mergekit's whole-tensor L1-norm matching (‖δ‖₁/‖m⊙δ‖₁)
instead of the papers' unbiased 1/p, and breadcrumbs to mergekit's per-tensor band.
"""

from __future__ import annotations

import torch
from torch import Tensor

from merge.methods.selection import Random, bernoulli_mask, trim

__all__ = ["breadcrumbs_band", "dare_drop", "della_drop", "l1_rescale", "trim"]

_L1_EPS = 1e-7  # mergekit skips the L1 rescale when either norm is below this


def l1_rescale(pruned: Tensor, original: Tensor) -> Tensor:
    """pruned · ‖original‖₁ / ‖pruned‖₁ (mergekit's rescale); unchanged when either norm < 1e-7."""
    before = original.abs().sum()
    after = pruned.abs().sum()
    if float(before) < _L1_EPS or float(after) < _L1_EPS:
        return pruned
    return pruned * (before / after)


def dare_drop(
    delta: Tensor,
    density: float,
    *,
    rescale: bool,
    compat: str,
    generator: Random,
    stream: int = 0,
) -> Tensor:
    """Keep each entry with probability `density` (m ~ Bernoulli(d)); paper rescale m⊙δ/d.

    `stream`: which of an `ElementRandom`'s streams to draw from (one per model)."""
    if density >= 1.0:
        return delta
    pruned = delta * bernoulli_mask(delta.shape, density, generator, delta.device, stream=stream)
    if not rescale:
        return pruned
    if compat == "mergekit":
        return l1_rescale(pruned, delta)
    return pruned.div_(density)


def breadcrumbs_band(delta: Tensor, density: float, gamma: float, *, compat: str) -> Tensor:
    """Drop the top-γ magnitudes and keep the next `density` fraction (Davari & Belilovsky).

    paper: per row along the last dimension (1-D tensors are one row), n_top = ⌊γn⌋ largest
    removed, then the next ⌊density·n⌋ kept. mergekit (0.1.5): per tensor, keep the ascending
    magnitude ranks [n_bot, n_bot + ⌊density·N⌋) with n_bot = max(0, N − ⌊density·N⌋ − ⌊γN⌋),
    a no-op at density ≥ 1 (so fewer outliers are dropped when density + γ > 1). mergekit 0.1.4
    zeroed the whole tensor when ⌊γN⌋ = 0; 0.1.5 keeps the top ⌊density·N⌋ instead, as we do.
    """
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    if compat == "mergekit":
        if density >= 1.0:
            return delta
        n = delta.numel()
        target = int(density * n)
        if target == 0:
            return torch.zeros_like(delta)
        n_bot = max(0, n - target - int(gamma * n))
        a = delta.abs().reshape(-1)
        # Keep ascending magnitude ranks [n_bot, n_bot + target) (mergekit 0.1.5).
        lo = a.kthvalue(n_bot + 1).values if n_bot > 0 else a.new_tensor(-1.0)
        hi = a.kthvalue(n_bot + target).values
        keep = (a >= lo) & (a <= hi)
        return torch.where(keep.reshape(delta.shape), delta, zero)
    if delta.dim() == 0:
        return delta  # one entry has no magnitude ranks to band: left as it is
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(-1, delta.shape[-1])
    n = rows.shape[-1]  # rows: (R, n)
    n_top = int(gamma * n)
    n_keep = min(int(density * n), n - n_top)
    if n_keep <= 0:
        return torch.zeros_like(delta)
    a = rows.abs()
    # Keep descending magnitude ranks [n_top, n_top + n_keep) of each row, ties ranked by index,
    # so exactly n_keep entries survive even where magnitudes repeat (bf16 task vectors).
    lo = a.kthvalue(n - n_top - n_keep + 1, dim=-1, keepdim=True).values  # smallest kept
    keep = a > lo
    if n_top > 0:
        hi = a.kthvalue(n - n_top, dim=-1, keepdim=True).values  # largest kept
        keep &= a < hi
        bounds = [lo, hi]
    else:
        bounds = [lo]
    for v in bounds:
        eq = a == v
        rank = (a > v).sum(dim=-1, keepdim=True) + eq.cumsum(dim=-1) - 1  # descending, by index
        keep |= eq & (rank >= n_top) & (rank < n_top + n_keep)
    return torch.where(keep, rows, zero).reshape(delta.shape)


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """Per-row keep probabilities p = d − ε + 2ε·(r − 1)/(n − 1), r = magnitude rank (1 = smallest)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(-1, delta.shape[-1])
    n = rows.shape[-1]  # rows: (R, n)
    if n == 1:
        return torch.full_like(delta, density)
    order = rows.abs().argsort(dim=-1)  # one sort per row; the rank is its inverse permutation
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n, device=delta.device).expand_as(order))
    p = (density - epsilon) + (2.0 * epsilon / (n - 1)) * ranks.to(delta.dtype)
    return p.reshape(delta.shape)


def della_drop(
    delta: Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool,
    compat: str,
    generator: Random,
    stream: int = 0,
) -> Tensor:
    """Keep entry i with probability p_i (magnitude-ranked); paper rescale m_i δ_i / p_i."""
    if density >= 1.0:
        return delta
    p = della_probabilities(delta, density, epsilon)
    keep = bernoulli_mask(delta.shape, p, generator, delta.device, stream=stream)
    pruned = delta * keep
    if not rescale:
        return pruned
    if compat == "mergekit":
        return l1_rescale(pruned, delta)
    return pruned.div_(p)
