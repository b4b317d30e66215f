"""Permutation specs: which (tensor, axis) pairs share each permutation, and which axes stay fixed.

A group of size n is one permutation `perm` (an index array, `new[i] = old[perm[i]]`, as in
Git Re-Basin's `take(w, perm, axis)`). Each member applies it to one tensor axis, possibly to a
*block layout*: entries `offset + c*block + s` for c < n, s < block (a flatten of (C, H, W) into a
Linear's input is `block = H*W`; a concatenation gives later segments an `offset`).

Hand-written specs load from YAML or JSON:

    groups:
      P_0:
        size: 128
        members:
          - [layers.0.weight, 0]
          - [layers.0.bias, 0]
          - {tensor: layers.1.weight, axis: 1}      # block: 1, offset: 0 are the defaults
    buffers: [bn.running_mean]   # optional: permuted, but not part of the weight-matching objective
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from merge.errors import UsageError, did_you_mean

# Buffer names that are statistics, never weights: left out of the weight-matching objective.
_STAT_SUFFIXES = ("running_mean", "running_var")


class SpecError(UsageError):
    """A permutation spec that does not fit its model or checkpoint (all problems listed)."""


@dataclass(frozen=True)
class Member:
    """One axis of one tensor permuted by a group: indices `offset + perm[c]*block + s`."""

    tensor: str
    axis: int
    block: int = 1
    offset: int = 0

    def describe(self) -> str:
        extra = []
        if self.block != 1:
            extra.append(f"block {self.block}")
        if self.offset:
            extra.append(f"offset {self.offset}")
        return f"{self.tensor}[axis {self.axis}{', ' if extra else ''}{', '.join(extra)}]"


@dataclass(frozen=True)
class FixedAxis:
    """A tensor axis that stays unpermuted, with the reason (shown by `merge align --show-spec`)."""

    tensor: str
    axis: int
    reason: str


@dataclass
class Group:
    name: str
    size: int
    members: list[Member]


@dataclass
class PermutationSpec:
    """Permutation groups over a state dict, the axes left fixed, and the statistics buffers.

    `probes` (inferred specs only) lists, per group, the traced graph values whose feature axis
    carries the group; activation matching records them. It is not serialised.
    """

    groups: dict[str, Group]
    fixed: list[FixedAxis] = field(default_factory=list)
    buffers: frozenset[str] = frozenset()
    source: str = "hand-written"
    probes: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict, repr=False)

    # -- views ---------------------------------------------------------------------------------

    def axes_to_groups(self) -> dict[str, dict[int, list[tuple[str, Member]]]]:
        """tensor -> axis -> [(group, member)] (several entries on one axis: concatenated segments)."""
        out: dict[str, dict[int, list[tuple[str, Member]]]] = {}
        for g in self.groups.values():
            for m in g.members:
                out.setdefault(m.tensor, {}).setdefault(m.axis, []).append((g.name, m))
        return out

    def tensors(self) -> set[str]:
        return {m.tensor for g in self.groups.values() for m in g.members}

    def is_statistic(self, name: str) -> bool:
        return name in self.buffers or name.endswith(_STAT_SUFFIXES)

    # -- checking ------------------------------------------------------------------------------

    def check(self, shapes: Mapping[str, Any], *, what: str = "the checkpoint") -> None:
        """Raise `SpecError` listing every member that names a missing tensor or does not fit it.

        `shapes` maps names to tensors or shapes.
        """
        problems: list[str] = []
        names = list(shapes)
        for g in self.groups.values():
            if g.size < 1:
                problems.append(f"group `{g.name}`: size must be positive, got {g.size}")
                continue
            for m in g.members:
                if m.tensor not in shapes:
                    problems.append(
                        f"group `{g.name}`: tensor `{m.tensor}` is not in {what}{did_you_mean(m.tensor, names)}"
                    )
                    continue
                s = shapes[m.tensor]
                shape = tuple(s.shape) if isinstance(s, Tensor) else tuple(s)
                if not -len(shape) <= m.axis < len(shape):
                    problems.append(
                        f"group `{g.name}`: `{m.tensor}` has shape {shape}, no axis {m.axis}"
                    )
                    continue
                need = m.offset + g.size * m.block
                if need > shape[m.axis] or m.block < 1 or m.offset < 0:
                    problems.append(
                        f"group `{g.name}`: `{m.tensor}` axis {m.axis} has {shape[m.axis]} entries, "
                        f"but size {g.size} x block {m.block} + offset {m.offset} needs {need}"
                    )
        spans: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
        for g in self.groups.values():
            for m in g.members:
                spans.setdefault((m.tensor, m.axis), []).append(
                    (m.offset, m.offset + g.size * m.block, g.name)
                )
        for (tensor, axis), intervals in spans.items():
            intervals.sort()
            for (_, end, first), (start, _, second) in itertools.pairwise(intervals):
                if start < end:
                    problems.append(
                        f"`{tensor}` axis {axis} is claimed by both `{first}` and `{second}`"
                    )
        if problems:
            raise SpecError(
                f"the permutation spec ({self.source}) does not fit {what} "
                f"({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  "
                + "\n  ".join(dict.fromkeys(problems))
            )

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        def member(m: Member) -> Any:
            if m.block == 1 and m.offset == 0:
                return [m.tensor, m.axis]
            return {"tensor": m.tensor, "axis": m.axis, "block": m.block, "offset": m.offset}

        return {
            "groups": {
                g.name: {"size": g.size, "members": [member(m) for m in g.members]}
                for g in self.groups.values()
            },
            "buffers": sorted(self.buffers),
            "fixed": [[f.tensor, f.axis, f.reason] for f in self.fixed],
        }

    def save(self, path: str | Path) -> None:
        """Write the spec as YAML (`.yaml`/`.yml`) or JSON (anything else)."""
        path = Path(path)
        data = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            path.write_text(json.dumps(data, indent=1))

    def format(self) -> str:
        """Human-readable listing: groups with sizes and members, then fixed axes by reason."""
        lines = [f"permutation spec ({self.source}): {len(self.groups)} groups"]
        for g in self.groups.values():
            lines.append(f"  {g.name}  size {g.size}, {len(g.members)} members")
            for m in g.members:
                stat = "  (statistic: permuted, not matched)" if self.is_statistic(m.tensor) else ""
                lines.append(f"    {m.describe()}{stat}")
        if self.fixed:
            lines.append(f"fixed axes ({len(self.fixed)}), not permuted:")
            by_reason: dict[str, list[FixedAxis]] = {}
            for f in self.fixed:
                by_reason.setdefault(f.reason, []).append(f)
            for reason, axes in by_reason.items():
                lines.append(f"  {reason}:")
                shown = [f"{f.tensor}[axis {f.axis}]" for f in axes]
                for i in range(0, len(shown), 4):
                    lines.append("    " + ", ".join(shown[i : i + 4]))
        return "\n".join(lines)


def spec_from_dict(data: Mapping[str, Any], *, source: str = "hand-written") -> PermutationSpec:
    """Build a spec from the YAML/JSON layout in this module's docstring; all problems at once."""
    problems: list[str] = []
    if not isinstance(data, Mapping) or "groups" not in data:
        raise SpecError(f"permutation spec {source}: expected a mapping with a `groups:` key")
    unknown = set(data) - {"groups", "buffers", "fixed"}
    if unknown:
        problems.append(
            f"unknown top-level keys: {', '.join(sorted(unknown))} (expected groups, buffers, fixed)"
        )
    groups: dict[str, Group] = {}
    raw_groups = data["groups"]
    if not isinstance(raw_groups, Mapping):
        raise SpecError(
            f"permutation spec {source}: `groups` must map group names to {{size, members}}"
        )
    for name, raw in raw_groups.items():
        where = f"groups.{name}"
        if not isinstance(raw, Mapping) or "members" not in raw or "size" not in raw:
            problems.append(f"{where}: expected a mapping with `size` and `members`")
            continue
        extra = set(raw) - {"size", "members"}
        if extra:
            problems.append(f"{where}: unknown keys {', '.join(sorted(extra))}")
        size = raw["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            problems.append(f"{where}.size: expected a positive integer, got {size!r}")
            continue
        members = []
        for i, m in enumerate(raw["members"] or []):
            try:
                members.append(_member(m))
            except (TypeError, ValueError, KeyError) as e:
                problems.append(f"{where}.members[{i}]: {e}")
        if not members:
            problems.append(f"{where}: no members")
        groups[str(name)] = Group(str(name), size, members)
    buffers = data.get("buffers") or []
    if not isinstance(buffers, list) or not all(isinstance(b, str) for b in buffers):
        problems.append("buffers: expected a list of tensor names")
        buffers = []
    fixed = []
    for i, f in enumerate(data.get("fixed") or []):
        if isinstance(f, list | tuple) and len(f) == 3:
            fixed.append(FixedAxis(str(f[0]), int(f[1]), str(f[2])))
        else:
            problems.append(f"fixed[{i}]: expected [tensor, axis, reason]")
    if problems:
        raise SpecError(
            f"permutation spec {source} is invalid ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  "
            + "\n  ".join(problems)
        )
    return PermutationSpec(groups, fixed, frozenset(buffers), source=source)


def _member(m: Any) -> Member:
    if isinstance(m, list | tuple):
        if len(m) != 2:
            raise ValueError(f"expected [tensor, axis], got {m!r}")
        tensor, axis, block, offset = m[0], m[1], 1, 0
    elif isinstance(m, Mapping):
        extra = set(m) - {"tensor", "axis", "block", "offset"}
        if extra:
            raise ValueError(f"unknown keys {', '.join(sorted(extra))}")
        tensor, axis, block, offset = m["tensor"], m["axis"], m.get("block", 1), m.get("offset", 0)
    else:
        raise TypeError(f"expected [tensor, axis] or {{tensor, axis, block, offset}}, got {m!r}")
    for key, v in (("axis", axis), ("block", block), ("offset", offset)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"`{key}` must be an integer, got {v!r}")
    if not isinstance(tensor, str):
        raise ValueError(f"`tensor` must be a string, got {tensor!r}")
    return Member(tensor, axis, block, offset)


def load_spec(path: str | Path) -> PermutationSpec:
    """Read a hand-written spec from YAML (`.yaml`, `.yml`) or JSON."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"spec file `{path}` does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise SpecError(
            f"permutation spec {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}"
        ) from e
    return spec_from_dict(data, source=str(path))
