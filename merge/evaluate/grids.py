"""Coefficient grids: the α grid of a path and `name=start:stop:num` ranges (inclusive)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from merge.errors import UsageError


def linspace(start: float, stop: float, num: int) -> list[float]:
    """`num` evenly spaced values from `start` to `stop`, both included and exact."""
    if num < 1:
        raise UsageError(f"a grid needs at least one point, got {num}")
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    values = [start + i * step for i in range(num)]
    values[-1] = float(stop)
    return [round(v, 12) + 0.0 for v in values]  # 0.30000000000000004 -> 0.3; -0.0 -> 0.0


def alpha_grid(steps: int = 25, alphas: Sequence[float] | None = None) -> list[float]:
    """An increasing α grid from 0 to 1 that always contains ½ (the midpoint barrier needs it)."""
    if alphas is not None:
        grid = sorted({float(a) for a in alphas} | {0.0, 0.5, 1.0})
    else:
        if steps < 2:
            raise UsageError(f"--steps must be at least 2 (the two endpoints), got {steps}")
        grid = sorted(set(linspace(0.0, 1.0, steps)) | {0.5})
    if grid[0] < 0.0 or grid[-1] > 1.0:
        raise UsageError("path α values must lie in [0, 1]; use a task-vector path to extrapolate")
    return grid


def parse_range(text: str, *, what: str = "--param") -> tuple[str, list[float]]:
    """`name=start:stop:num` (inclusive, `num` points) or `name=v1,v2,...` -> (name, values)."""
    name, eq, spec = text.partition("=")
    name = name.strip()
    if not eq or not name or not spec.strip():
        raise UsageError(
            f"{what} `{text}` must look like `name=start:stop:num` (e.g. vars.lam=0:1.5:16) or `name=v1,v2,...`"
        )
    return name, parse_values(spec, what=f"{what} `{text}`")


def parse_values(spec: str, *, what: str = "a range") -> list[float]:
    """`start:stop:num` (inclusive) or `v1,v2,...` -> the values."""
    try:
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, num_text = float(parts[0]), float(parts[1]), parts[2]
            num = int(num_text)
            if float(num_text) != num or num < 1:
                raise ValueError
            return linspace(start, stop, num)
        values = [float(v) for v in spec.split(",") if v.strip()]
        if not values:
            raise ValueError
        return values
    except ValueError:
        raise UsageError(
            f"{what}: `{spec}` is not `start:stop:num` (num a positive integer) or a comma-separated list of numbers"
        ) from None


def product(ranges: Sequence[tuple[str, list[float]]]) -> list[dict[str, float]]:
    """Every combination of the ranges, the last one varying fastest."""
    names = [n for n, _ in ranges]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"--param `{sorted(dup)[0]}` is given more than once")
    return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in ranges))]
