"""Applying permutations to state dicts: `new = take(old, index, axis)` for every spec member."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from merge.align.spec import Member, PermutationSpec, SpecError

Perms = dict[str, np.ndarray]


def axis_index(length: int, entries: list[tuple[Member, np.ndarray]]) -> Tensor:
    """The gather index for one axis of `length`: identity outside members, block-expanded inside."""
    index = np.arange(length)
    for m, perm in entries:
        n = len(perm)
        # entry offset + c*block + s  <-  offset + perm[c]*block + s
        src = (perm[:, None] * m.block + np.arange(m.block)[None, :]).reshape(-1) + m.offset
        index[m.offset : m.offset + n * m.block] = src
    return torch.from_numpy(index)


def permute_tensor(
    t: Tensor,
    axes: Mapping[int, list[tuple[str, Member]]],
    perms: Mapping[str, np.ndarray],
    *,
    skip: Member | None = None,
) -> Tensor:
    """Gather `t` along every axis listed in `axes` with the groups' perms (member `skip` left out).

    Leaving out one member, not its whole group, is Git Re-Basin's `except_axis`: a group that
    sits on two axes of one tensor (a d→d map inside a residual stream) keeps its current
    permutation on the other axis while it is solved on this one.
    """
    for axis, entries in axes.items():
        chosen = [(m, np.asarray(perms[g])) for g, m in entries if m != skip and g in perms]
        if chosen:
            t = t.index_select(axis % t.dim(), axis_index(t.shape[axis], chosen).to(t.device))
    return t


def apply_permutation(
    spec: PermutationSpec, perms: Mapping[str, np.ndarray], state: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """π(state): every member axis gathered by its group's permutation; other tensors as they are.

    `perms[g][i]` is the index of the unit of `state` that lands at position i (Git Re-Basin's
    convention), so weight matching's output maps B onto A's ordering.
    """
    unknown = sorted(set(perms) - set(spec.groups))
    if unknown:
        raise SpecError(f"permutations given for groups not in the spec: {', '.join(unknown)}")
    for name, p in perms.items():
        size = spec.groups[name].size
        p = np.asarray(p)
        if p.shape != (size,) or not np.array_equal(np.sort(p), np.arange(size)):
            raise SpecError(
                f"the permutation for group `{name}` is not a permutation of range({size})"
            )
    spec.check(state)
    out = dict(state)
    for tensor, axes in spec.axes_to_groups().items():
        out[tensor] = permute_tensor(state[tensor], axes, perms)
    return out


def random_perms(spec: PermutationSpec, seed: int) -> Perms:
    """One uniformly random permutation per group, from `numpy.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    return {name: rng.permutation(g.size) for name, g in spec.groups.items()}


def identity_perms(spec: PermutationSpec) -> Perms:
    return {name: np.arange(g.size) for name, g in spec.groups.items()}


def invert(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv
