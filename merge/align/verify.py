"""Equivalence checks: a permutation spec must leave the model's function unchanged.

1. Random permutations of every group, applied to the weights (eval mode; float64 when the model
   fits in `FLOAT64_LIMIT` bytes, else float32), must leave the outputs unchanged to `rtol`
   relative to the largest output (1e-9 in float64, 1e-5 in float32 or when a float64 model
   computes parts in float32, which is seen from the operators' output dtypes, never guessed
   from the size of the change); repeated for two seeds. On failure each group is tried alone
   and the culprits are named.
2. Negative control: permuting one member of a group alone (the group "broken") must change the
   outputs, which shows the check can see that group at all.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from merge.align.permute import Perms, apply_permutation, permute_tensor, random_perms
from merge.align.spec import Member, PermutationSpec
from merge.align.trace import Args, call_with_state, cast_floats, eval_mode, without_cache
from merge.errors import MergeError

FLOAT64_LIMIT = 2 * 2**30  # bytes of float64 parameters under which the check runs in float64
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}


class VerificationError(MergeError):
    """A permutation changed the model's outputs; nothing was written."""


@dataclass
class VerifyReport:
    dtype: str
    rtol: float
    max_change: list[
        float
    ]  # relative output change under random permutations of all groups, per seed
    broken_change: dict[str, float] = field(default_factory=dict)  # negative control per group
    unchecked: list[str] = field(default_factory=list)  # groups the negative control cannot break
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _outputs(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _outputs(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _outputs(v)]
    if hasattr(obj, "to_tuple"):  # transformers ModelOutput
        return _outputs(obj.to_tuple())
    return []


def relative_change(a: list[Tensor], b: list[Tensor]) -> float:
    """max |a − b| / max |a| over all output tensors (inf when their structure differs)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    scale = max((float(x.abs().max()) for x in a if x.numel()), default=0.0)
    diff = max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    if diff != diff:  # NaN
        return float("inf")
    return diff / max(scale, 1e-30)


class _LowPrecision(TorchDispatchMode):
    """Records the operators whose floating-point outputs are not float64."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(
            isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
            for t in tree_leaves(out)
        ):
            self.ops.add(str(func.overloadpacket.__name__))
        return out


class Checker:
    """Runs the model (a private float64/float32 copy, eval mode) with state dicts swapped in."""

    def __init__(self, model: nn.Module, args: Args, *, dtype: torch.dtype | None = None):
        nbytes = sum(p.numel() for p in model.parameters()) * 8
        self.dtype = dtype or (torch.float64 if nbytes <= FLOAT64_LIMIT else torch.float32)
        self.model = copy.deepcopy(model).to(self.dtype)
        self.args = cast_floats(without_cache(model, args), self.dtype)
        self.rtol = RTOL[self.dtype]

    @torch.no_grad()
    def low_precision_ops(self, state: Mapping[str, Tensor]) -> list[str]:
        """Operators that return a float tensor narrower than float64 in a float64 run: the
        model's float32 islands (an RMSNorm that upcasts to float32, an explicit `.float()`)."""
        if self.dtype != torch.float64:
            return []
        with eval_mode(self.model), _LowPrecision() as seen:
            call_with_state(self.model, state, self.args)
        return sorted(seen.ops)

    def cast(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}

    @torch.no_grad()
    def outputs(self, state: Mapping[str, Tensor]) -> list[Tensor]:
        with eval_mode(self.model):
            return _outputs(call_with_state(self.model, state, self.args))


def _breakable(spec: PermutationSpec, name: str, state: Mapping[str, Tensor]) -> Member | None:
    """The member to permute alone: the largest weight whose slices along the axis differ."""
    best = None
    for m in spec.groups[name].members:
        t = state[m.tensor]
        if spec.is_statistic(m.tensor) or not t.is_floating_point():
            continue
        rows = t.movedim(m.axis, 0)
        if bool((rows == rows[:1]).all()):
            continue  # every unit identical (e.g. a fresh BatchNorm weight): a permutation is invisible
        if best is None or t.numel() > state[best.tensor].numel():
            best = m
    return best


def _break(
    spec: PermutationSpec, name: str, member: Member, state: Mapping[str, Tensor], seed: int
) -> dict[str, Tensor]:
    size = spec.groups[name].size
    rng = np.random.default_rng(seed)
    perm = rng.permutation(size)
    while size > 1 and np.array_equal(perm, np.arange(size)):
        perm = rng.permutation(size)
    out = dict(state)
    out[member.tensor] = permute_tensor(
        state[member.tensor], {member.axis: [(name, member)]}, {name: perm}
    )
    return out


def verify_spec(
    model: nn.Module,
    spec: PermutationSpec,
    args: Args,
    state: Mapping[str, Tensor] | None = None,
    *,
    seeds: tuple[int, ...] = (0, 1),
    negative_control: bool = True,
    checker: Checker | None = None,
) -> VerifyReport:
    """Check that every group of `spec` is a symmetry of `model` at weights `state`.

    Raises VerificationError naming the groups that change the outputs, or the groups whose
    breaking does not (the check would be blind to them).
    """
    checker = checker or Checker(model, args)
    base_state = checker.cast(state if state is not None else model.state_dict())
    spec.check(base_state, what="the model")
    base = checker.outputs(base_state)
    if not base:
        raise VerificationError(
            "the model returned no floating-point tensors; cannot verify the permutation spec"
        )
    report = VerifyReport(str(checker.dtype).replace("torch.", ""), checker.rtol, [])
    for seed in seeds:
        perms = random_perms(spec, seed)
        change = relative_change(base, checker.outputs(apply_permutation(spec, perms, base_state)))
        report.max_change.append(change)
        if checker.rtol < change <= RTOL[torch.float32] and checker.dtype == torch.float64:
            # float32 islands inside a float64 run (e.g. an RMSNorm that upcasts to float32) round
            # at float32's precision, so the float32 tolerance applies; but only when such ops
            # are seen, for a small change in a pure float64 run is a real one (a missed bias).
            islands = checker.low_precision_ops(base_state)
            if islands:
                checker.rtol = report.rtol = RTOL[torch.float32]
                report.notes.append(
                    f"the model computes parts in float32 ({', '.join(islands[:5])}; change "
                    f"{change:.2g}); tolerance {checker.rtol:g}"
                )
        if change > checker.rtol:
            culprits = _culprits(checker, spec, base_state, base, perms)
            raise VerificationError(_failure_message(spec, culprits, change, checker.rtol))
    if negative_control:
        blind = []
        for i, name in enumerate(spec.groups):
            member = _breakable(spec, name, base_state)
            if member is None or len(spec.groups[name].members) < 2:
                report.unchecked.append(name)
                continue
            change = relative_change(
                base, checker.outputs(_break(spec, name, member, base_state, seeds[0] + i))
            )
            report.broken_change[name] = change
            if change <= 10 * checker.rtol:
                blind.append(
                    f"`{name}` (permuting {member.describe()} alone changed the outputs by {change:.2g})"
                )
        if blind:
            raise VerificationError(
                "the equivalence check has no power on "
                + ", ".join(blind)
                + ": the example input does not reach these units, or the spec lists the wrong tensors; "
                "use an input that exercises the whole model (--data)"
            )
    return report


def _culprits(
    checker: Checker,
    spec: PermutationSpec,
    state: dict[str, Tensor],
    base: list[Tensor],
    perms: Perms,
) -> list[tuple[str, float]]:
    out = []
    for name in spec.groups:
        change = relative_change(
            base, checker.outputs(apply_permutation(spec, {name: perms[name]}, state))
        )
        if change > checker.rtol:
            out.append((name, change))
    return out


def _failure_message(
    spec: PermutationSpec, culprits: list[tuple[str, float]], change: float, rtol: float
) -> str:
    if not culprits:
        return (
            f"permuting all groups together changes the model's outputs (relative change {change:.3g} > {rtol:g}), "
            "though no group does alone; the spec is not a symmetry of this model"
        )
    lines = [
        f"permutation group `{name}` is not a symmetry of the model: permuting it changes the outputs "
        f"(relative change {c:.3g} > {rtol:g}); members: "
        + ", ".join(m.describe() for m in spec.groups[name].members[:6])
        + (" ..." if len(spec.groups[name].members) > 6 else "")
        for name, c in culprits
    ]
    return (
        "\n".join(lines) + "\nnothing was written; fix the spec (or leave these tensors out of it)"
    )
