"""Git Re-Basin weight matching: coordinate ascent over permutations, one LAP per group and step.

Maximises Σ_t ⟨θ_A[t], π(θ_B)[t]⟩ (⇔ minimises ‖θ_A − π(θ_B)‖²) over the spec's tensors. For
each group, in a random order per sweep, the others held fixed:

    C = Σ_{(t, axis) in group} moveaxis(A_t, axis, 0).reshape(n, -1) @ moveaxis(π₋ₚ(B_t), axis, 0).reshape(n, -1)ᵀ
    perm = linear_sum_assignment(C, maximize=True)

where π₋ₚ leaves out only the member being summed (Git Re-Basin's `except_axis`): a group on two
axes of one tensor (a d→d map inside a residual stream) keeps its current permutation on the other
axis. Each step is then the exact maximiser over one permutation, so the objective never decreases,
except for such two-axis groups, whose objective is quadratic in the permutation: a step maximises
its linearisation and may lower it. So every run keeps the best permutations it has seen, and the
result is never worse than the identity (or `init`). A sweep with no strict improvement (> 1e-12)
stops a restart. The best of `restarts` runs is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from merge.align.permute import Perms, identity_perms, permute_tensor
from merge.align.spec import Member, PermutationSpec, SpecError

IMPROVEMENT = 1e-12  # Git Re-Basin's progress threshold
FLOAT64_MAX_ELEMENTS = 10_000_000  # above this, cost matrices in float32 (half the matmul time)


@dataclass
class GroupResult:
    size: int
    members: int
    objective_before: (
        float  # this group's LAP objective at the identity, the others at their final perms
    )
    objective_after: float
    moved: int  # units whose position changed


@dataclass
class MatchReport:
    """What a matching run did; `to_dict()` is the JSON written beside an aligned checkpoint."""

    method: str
    seed: int
    objective_before: float  # Σ⟨A, B⟩ over matched tensors (weights) or Σ correlation (activations)
    objective_after: float
    groups: dict[str, GroupResult]
    sweeps: int = 0
    restarts: list[dict[str, Any]] = field(default_factory=list)
    history: list[float] = field(default_factory=list)  # objective after each sweep, best restart
    distance_before: float | None = None  # ‖θ_A − θ_B‖ over matched tensors
    distance_after: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _segment(t: Tensor, m: Member, n: int) -> Tensor:
    """The member's entries of `t` as an (n, -1) matrix, one row per permuted unit."""
    t = t.movedim(m.axis, 0)[m.offset : m.offset + n * m.block]
    return t.reshape(n, -1)  # (n, block * rest)


def _check_pair(
    spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]
) -> None:
    spec.check(state_a, what="model A's checkpoint")
    spec.check(state_b, what="model B's checkpoint")
    bad = [
        f"{t}: A {tuple(state_a[t].shape)} vs B {tuple(state_b[t].shape)}"
        for t in sorted(spec.tensors())
        if state_a[t].shape != state_b[t].shape
    ]
    if bad:
        raise SpecError("checkpoints A and B differ in shape:\n  " + "\n  ".join(bad))


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    seed: int = 0,
    restarts: int = 3,
    max_sweeps: int = 100,
    init: Mapping[str, np.ndarray] | None = None,
    include_statistics: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Perms, MatchReport]:
    """Permutations of B's units that best match A's weights (Git Re-Basin, Ainsworth et al. 2023).

    Args:
        restarts: independent runs (the first from the identity or `init`, the others from random
            permutations); the one with the highest objective wins. Deterministic under `seed`.
        max_sweeps: cap on sweeps per run (a sweep visits every group once, in random order).
        include_statistics: also match BatchNorm running statistics (off: they are statistics of
            the data, not weights, though they are always permuted with their group).
        dtype, device: how and where the cost matrices are accumulated; by default float64 on
            the CPU, float32 when the matched tensors hold more than `FLOAT64_MAX_ELEMENTS`.
    """
    if restarts < 1 or max_sweeps < 1:
        raise SpecError(f"restarts and max_sweeps must be >= 1, got {restarts} and {max_sweeps}")
    _check_pair(spec, state_a, state_b)
    start = time.perf_counter()
    axes = spec.axes_to_groups()
    matched = sorted(t for t in axes if include_statistics or not spec.is_statistic(t))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        numel = sum(state_a[t].numel() for t in matched)
        dtype = torch.float64 if numel <= FLOAT64_MAX_ELEMENTS else torch.float32
    A = {t: state_a[t].detach().to(dev, dtype) for t in matched}
    B = {t: state_b[t].detach().to(dev, dtype) for t in matched}
    contributions: dict[str, list[tuple[str, Member]]] = {name: [] for name in spec.groups}
    for t in matched:
        for entries in axes[t].values():
            for group, m in entries:
                contributions[group].append((t, m))
    names = [n for n in spec.groups if contributions[n]]
    notes = [
        f"group `{n}` has only statistics members; left as the identity"
        for n in spec.groups
        if not contributions[n]
    ]

    neighbours: dict[str, list[str]] = {}  # groups sharing a matched tensor (itself included)
    for name in names:
        tensors = {t for t, _ in contributions[name]}
        neighbours[name] = sorted(
            {
                g
                for t in tensors
                for entries in axes[t].values()
                for g, _ in entries
                if contributions[g]
            }
        )

    def objective(perms: Perms) -> float:
        return float(sum((A[t] * permute_tensor(B[t], axes[t], perms)).sum() for t in matched))

    def cost(p: str, perms: Perms) -> np.ndarray:
        n = spec.groups[p].size
        C = torch.zeros(n, n, dtype=dtype, device=dev)
        for t, m in contributions[p]:
            b = permute_tensor(B[t], axes[t], perms, skip=m)
            C += _segment(A[t], m, n) @ _segment(b, m, n).T
        return C.cpu().double().numpy()

    best: tuple[float, Perms, list[float], int] | None = None
    runs = []
    for r in range(restarts):
        rng = np.random.default_rng([seed, r])
        if r == 0:
            perms = identity_perms(spec)
            if init is not None:
                perms.update({k: np.asarray(v) for k, v in init.items()})
        else:
            perms = {n: rng.permutation(g.size) for n, g in spec.groups.items()}
        history = [objective(perms)]
        kept = (history[0], {k: v.copy() for k, v in perms.items()}, 0)  # best seen in this run
        sweeps = 0
        # A group's cost matrix depends only on its neighbours' perms: when none changed since
        # its last solve, the LAP would give the same answer, so it is skipped.
        version = dict.fromkeys(names, 0)
        solved_at: dict[str, tuple[int, ...]] = {}
        for _ in range(max_sweeps):
            sweeps += 1
            improved = False
            for p in rng.permutation(len(names)):
                name = names[p]
                stamp = tuple(version[q] for q in neighbours[name])
                if solved_at.get(name) == stamp:
                    continue
                C = cost(name, perms)
                _, cols = linear_sum_assignment(C, maximize=True)
                idx = np.arange(len(cols))
                old, new = C[idx, perms[name]].sum(), C[idx, cols].sum()
                if new > old + IMPROVEMENT:
                    perms[name] = cols
                    version[name] += 1
                    improved = True
                solved_at[name] = tuple(version[q] for q in neighbours[name])
            history.append(objective(perms))
            if history[-1] > kept[0]:
                kept = (history[-1], {k: v.copy() for k, v in perms.items()}, sweeps)
            if not improved:
                break
        if progress:
            progress(f"restart {r + 1}/{restarts}: objective {kept[0]:.6g} after {sweeps} sweeps")
        runs.append({"restart": r, "objective": kept[0], "sweeps": sweeps})
        if best is None or kept[0] > best[0]:
            best = (kept[0], kept[1], history, sweeps)
    assert best is not None
    final_obj, perms, history, sweeps = best
    obj0 = objective(identity_perms(spec))
    if final_obj < obj0:
        # Only reachable from `init` or through two-axis groups: the identity is the better answer.
        notes.append(
            f"every run ended below the identity's objective ({final_obj:.6g} < {obj0:.6g}); "
            "returning the identity"
        )
        final_obj, perms = obj0, identity_perms(spec)

    groups = {}
    for name, g in spec.groups.items():
        if contributions[name]:
            C = cost(name, perms)
            idx = np.arange(g.size)
            before, after = float(np.trace(C)), float(C[idx, perms[name]].sum())
        else:
            before = after = 0.0
        groups[name] = GroupResult(
            g.size, len(g.members), before, after, int((perms[name] != np.arange(g.size)).sum())
        )
    sq_a = float(sum((A[t] ** 2).sum() for t in matched))
    sq_b = float(sum((B[t] ** 2).sum() for t in matched))
    report = MatchReport(
        method="weight",
        seed=seed,
        objective_before=obj0,
        objective_after=final_obj,
        groups=groups,
        sweeps=sweeps,
        restarts=runs,
        history=history,
        distance_before=max(sq_a + sq_b - 2 * obj0, 0.0) ** 0.5,
        distance_after=max(sq_a + sq_b - 2 * final_obj, 0.0) ** 0.5,
        seconds=time.perf_counter() - start,
        notes=notes,
        extra={
            "max_sweeps": max_sweeps,
            "include_statistics": include_statistics,
            "dtype": str(dtype),
        },
    )
    return perms, report
