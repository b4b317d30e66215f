"""Barrier heights along an interpolation path, under every definition in use.

With θ(α) = (1−α)θ_A + αθ_B evaluated on a grid containing 0 and 1, and a metric m where
lower is better (a loss), the definitions are (for a metric where higher is better, such as
accuracy, every difference is taken the other way round, so a positive barrier is always a bump
of *badness*):

- `max_minus_mean`  (Frankle et al. 2020; Git Re-Basin):  max_α m(α) − ½(m(0) + m(1))
- `max_minus_linear` (Entezari et al. 2022):              max_α [m(α) − ((1−α)m(0) + αm(1))]
- `midpoint` (REPAIR; Entezari's code):                   m(½) − ½(m(0) + m(1))

Each comes with the α where it is reached. A negative value is possible (the path is better
than its endpoints) and is reported as it is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from merge.errors import UsageError

DEFINITIONS = ("max_minus_mean", "max_minus_linear", "midpoint")

# Directions of common metric names, by exact name (after `val_`/`eval_`/`test_`/`target_`/
# `control_` prefixes): True when larger is better. An evaluator's declared `higher_is_better`
# and the CLI's --higher-is-better/--lower-is-better come first; a name in neither is not guessed.
KNOWN_DIRECTIONS: dict[str, bool] = {
    **dict.fromkeys(
        (
            "accuracy",
            "acc",
            "top1",
            "top5",
            "top1_accuracy",
            "top5_accuracy",
            "balanced_accuracy",
            "f1",
            "macro_f1",
            "micro_f1",
            "auc",
            "roc_auc",
            "precision",
            "recall",
            "exact_match",
            "bleu",
            "sacrebleu",
            "chrf",
            "rouge1",
            "rouge2",
            "rougel",
            "rougelsum",
            "meteor",
            "matthews_correlation",
            "mcc",
            "pearson",
            "pearsonr",
            "spearman",
            "spearmanr",
            "miou",
            "mean_iou",
            "iou",
            "dice",
            "map",
            "psnr",
            "ssim",
            "r2",
        ),
        True,
    ),
    **dict.fromkeys(
        (
            "loss",
            "nll",
            "perplexity",
            "ppl",
            "error",
            "top1_error",
            "top5_error",
            "error_rate",
            "wer",
            "cer",
            "mse",
            "mae",
            "rmse",
            "fid",
            "lpips",
            "bpb",
            "bits_per_byte",
        ),
        False,
    ),
}
_PREFIXES = ("val_", "valid_", "validation_", "eval_", "test_", "target_", "control_")


def metric_direction(metric: str, declared: Mapping[str, bool] | None = None) -> bool | None:
    """True if larger `metric` is better, False if smaller, None if neither declared nor known.

    `declared` (the evaluator's `higher_is_better` and the CLI's overrides) is looked up first,
    by the full name and then without a prefix; then `KNOWN_DIRECTIONS`; `*_loss`/`*_error`
    are lower-is-better, `*_accuracy` higher. Nothing else is guessed.
    """
    names = [metric]
    low = metric.lower()
    for pre in _PREFIXES:
        if low.startswith(pre):
            names.append(metric[len(pre) :])
    for n in names:
        if declared and n in declared:
            return bool(declared[n])
    for n in names:
        key = n.lower()
        if key in KNOWN_DIRECTIONS:
            return KNOWN_DIRECTIONS[key]
        if key.endswith(("_loss", "_error", "_perplexity")):
            return False
        if key.endswith("_accuracy"):
            return True
    return None


def higher_is_better(metric: str, declared: Mapping[str, bool] | None = None) -> bool:
    """`metric_direction`, refusing a metric whose direction is unknown."""
    d = metric_direction(metric, declared)
    if d is None:
        raise UsageError(
            f"cannot tell whether larger `{metric}` is better: declare it in the evaluator "
            f'(`evaluate.higher_is_better = {{"{metric}": True}}`) or pass '
            f"--higher-is-better {metric} (or --lower-is-better {metric})"
        )
    return d


def _check(alphas: Sequence[float], values: Sequence[float]) -> tuple[list[float], list[float]]:
    a = [float(x) for x in alphas]
    v = [float(x) for x in values]
    if len(a) != len(v):
        raise UsageError(f"barrier: {len(a)} α values but {len(v)} metric values")
    if len(a) < 2 or a[0] != 0.0 or a[-1] != 1.0:
        raise UsageError("barrier: the α grid must start at 0 and end at 1 (the two endpoints)")
    if any(y <= x for x, y in itertools.pairwise(a)):
        raise UsageError("barrier: the α grid must be strictly increasing")
    return a, v


def _badness(values: list[float], higher: bool) -> list[float]:
    return [-x for x in values] if higher else values


def max_minus_mean(
    alphas: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False
) -> tuple[float, float]:
    """(max_α m(α) − ½(m(0)+m(1)), argmax α), in badness units (Frankle / Git Re-Basin)."""
    a, v = _check(alphas, values)
    b = _badness(v, higher_is_better)
    i = max(range(len(b)), key=lambda j: b[j])
    return b[i] - 0.5 * (b[0] + b[-1]), a[i]


def max_minus_linear(
    alphas: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False
) -> tuple[float, float]:
    """(max_α [m(α) − ((1−α)m(0) + αm(1))], argmax α), in badness units (Entezari et al.)."""
    a, v = _check(alphas, values)
    b = _badness(v, higher_is_better)
    gaps = [bi - ((1.0 - ai) * b[0] + ai * b[-1]) for ai, bi in zip(a, b)]
    i = max(range(len(gaps)), key=lambda j: gaps[j])
    return gaps[i], a[i]


def midpoint(
    alphas: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False
) -> tuple[float, float]:
    """(m(½) − ½(m(0)+m(1)), 0.5), in badness units (REPAIR); the grid must contain α = ½."""
    a, v = _check(alphas, values)
    b = _badness(v, higher_is_better)
    for ai, bi in zip(a, b):
        if math.isclose(ai, 0.5, abs_tol=1e-12):
            return bi - 0.5 * (b[0] + b[-1]), 0.5
    raise UsageError(
        "barrier: the midpoint barrier needs α = 0.5 in the grid; use an odd number of steps"
    )


def barriers(
    alphas: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False
) -> dict[str, Any]:
    """Every definition at once: {definition: {"value", "alpha"}, "direction", "endpoints", "alphas"}."""
    out: dict[str, Any] = {
        "direction": "higher_is_better" if higher_is_better else "lower_is_better",
        "endpoints": [float(values[0]), float(values[-1])],
    }
    for name, fn in (
        ("max_minus_mean", max_minus_mean),
        ("max_minus_linear", max_minus_linear),
        ("midpoint", midpoint),
    ):
        try:
            value, where = fn(alphas, values, higher_is_better=higher_is_better)
        except UsageError:
            if name != "midpoint":
                raise
            out[name] = None
            continue
        out[name] = {"value": value, "alpha": where}
    return out


# Numbers an evaluator may return that count things rather than score the model.
NOT_METRICS = frozenset({"n", "examples", "tokens", "batches", "seconds"})


def curve_barriers(
    alphas: Sequence[float],
    points: Sequence[Mapping[str, float]],
    directions: Mapping[str, bool] | None = None,
    unknown: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """`barriers` for every finite metric that all points of a curve have, keyed by metric name.

    A metric whose direction is neither declared nor known gets no barrier; its name is appended
    to `unknown` (for a note), never guessed.
    """
    if not points:
        return {}
    names = [
        k
        for k, x in points[0].items()
        if k not in NOT_METRICS and isinstance(x, int | float) and not isinstance(x, bool)
    ]
    out = {}
    for m in names:
        vals = [p.get(m) for p in points]
        if any(not isinstance(x, int | float) or not math.isfinite(float(x)) for x in vals):
            continue
        higher = metric_direction(m, directions)
        if higher is None:
            if unknown is not None and m not in unknown:
                unknown.append(m)
            continue
        out[m] = barriers(alphas, [float(x) for x in vals], higher_is_better=higher)  # type: ignore[arg-type]
    return out
