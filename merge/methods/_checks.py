"""Explicit parameter checks shared by the methods: each failure is a UsageError naming the fix."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.errors import ExecutionError, UsageError, did_you_mean

COMPAT_CHOICES = ("paper", "mergekit")


def check_choice(method: str, param: str, value: str, choices: Sequence[str]) -> None:
    """`value` must be one of `choices`."""
    if value not in choices:
        raise UsageError(
            f"method `{method}`: `{param}: {value}` is not one of {', '.join(choices)}"
            f"{did_you_mean(str(value), choices)}"
        )


def check_compat(method: str, compat: str) -> None:
    check_choice(method, "compat", compat, COMPAT_CHOICES)


def check_density(method: str, density: Sequence[float]) -> None:
    """Every per-model density must lie in (0, 1]."""
    for i, d in enumerate(density):
        if not 0.0 < float(d) <= 1.0:
            raise UsageError(
                f"method `{method}`: `density` of model {i + 1} is {d}, outside (0, 1]; "
                "density is the fraction of each task vector kept (e.g. 0.5); use 1 to keep all"
            )


def check_count(method: str, n: int, *, at_least: int = 1, at_most: int | None = None) -> None:
    """The number of (non-base) models must lie in [at_least, at_most]."""
    if n < at_least or (at_most is not None and n > at_most):
        if at_most == at_least:
            want = f"exactly {at_least}"
        elif at_most is None:
            want = f"at least {at_least}"
        else:
            want = f"between {at_least} and {at_most}"
        raise UsageError(
            f"method `{method}` takes {want} model{'s' if (at_most or 2) != 1 else ''} "
            f"besides the base, got {n}; list {want} under `models:`"
        )


def check_positive(method: str, param: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UsageError(f"method `{method}`: `{param}` is {value}, it must be {bound}")


def check_fraction(method: str, param: str, value: float, *, closed_low: bool = True) -> None:
    """`value` must lie in [0, 1] (or (0, 1] when not `closed_low`)."""
    low_ok = value >= 0 if closed_low else value > 0
    if not (low_ok and value <= 1):
        interval = "[0, 1]" if closed_low else "(0, 1]"
        raise UsageError(f"method `{method}`: `{param}` is {value}, outside {interval}")


def is_finite(x: Tensor) -> bool:
    """No NaN or ±inf in x (True for integer and empty tensors)."""
    # aminmax propagates NaN and shows ±inf: one pass, no boolean mask the size of x.
    if x.numel() == 0 or not x.is_floating_point():
        return True
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(
    method: str,
    tensors: Sequence[Tensor],
    base: Tensor | None = None,
    *,
    tensor_name: str | None = None,
) -> None:
    """Refuse NaN or ±inf in any input: every method would spread or silently drop them.

    One shared rule for every method (the engine may call it with the tensor's name before a
    method runs; the methods call it without). Raises ExecutionError naming the input, how many
    values are NaN and inf, and the tensor when `tensor_name` is given.
    """
    named = [("the base", base)] if base is not None else []
    named += [(f"model {i + 1}", x) for i, x in enumerate(tensors)]
    for who, x in named:
        if x is None or is_finite(x):
            continue
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        where = f" in tensor `{tensor_name}`" if tensor_name else ""
        raise ExecutionError(
            f"method `{method}`: {who} has {n_nan} NaN and {n_inf} inf value"
            f"{'s' if n_nan + n_inf != 1 else ''}{where}; merging non-finite weights gives "
            "meaningless output, so it is refused: repair or drop that checkpoint"
        )
