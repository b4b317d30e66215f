"""Explicit parameter checks shared by the methods: each failure is a UsageError naming the fix."""

from __future__ import annotations

from collections.abc import Sequence

from merge.errors import UsageError, did_you_mean

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
