"""EMA and SWA over an ordered checkpoint sequence, as closed-form weights of one weighted sum.

Folding checkpoints x_0..x_{N-1} one at a time, avg_0 = x_0 and
avg_k = d_k · avg_{k-1} + (1 − d_k) · x_k (what `AveragedModel` with `get_ema_multi_avg_fn`
does when updated once per checkpoint), gives

    w_0 = Π_{j≥1} d_j,        w_k = (1 − d_k) · Π_{j>k} d_j   (k ≥ 1),

which sum to 1; so the whole EMA streams in one pass like any weighted sum.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

from merge.errors import UsageError
from merge.recipe import linear_recipe

STEP_IN_NAME = re.compile(r"(\d+)(?!.*\d)")  # the last integer in a checkpoint's name
BUFFER_NAMES = r"(^|\.)(running_mean|running_var)$"


def weights_from_decays(decays: Sequence[float]) -> list[float]:
    """Closed-form EMA weights; decays[k] is the decay used when checkpoint k is folded in (decays[0] unused)."""
    n = len(decays)
    w = [0.0] * n
    tail = 1.0  # Π_{j>k} d_j
    for k in range(n - 1, 0, -1):
        w[k] = (1.0 - decays[k]) * tail
        tail *= decays[k]
    w[0] = tail
    return w


def ema_weights(n: int, decay: float) -> list[float]:
    """EMA with one update per checkpoint at constant `decay`."""
    _check_decay(decay, "--decay")
    return weights_from_decays([decay] * n)


def swa_weights(n: int) -> list[float]:
    """Stochastic weight averaging: the uniform mean."""
    return [1.0 / n] * n


def step_decays(steps: Sequence[int], step_decay: float) -> list[float]:
    """Per-checkpoint decays from a per-step decay: d_k = d^(s_k − s_{k−1}).

    Exact when the weights were constant between checkpoints; otherwise the best one can do
    from checkpoints alone.
    """
    _check_decay(step_decay, "--step-decay")
    for a, b in pairwise(steps):
        if b <= a:
            raise UsageError(
                f"checkpoint steps must increase: got {a} then {b}; list checkpoints in training order"
            )
    return [1.0] + [step_decay ** (b - a) for a, b in pairwise(steps)]


def warmup_decay(step: float, decay: float, gamma: float, power: float) -> float:
    """timm ModelEmaV3 warm-up: min(decay, 1 − (1 + t/γ)^(−power))."""
    return min(decay, 1.0 - (1.0 + step / gamma) ** (-power))


def steps_from_names(paths: Sequence[str | Path]) -> list[int]:
    """Training steps read from checkpoint names (`ckpt-0100`, `step_200.safetensors`)."""
    out = []
    for p in paths:
        m = STEP_IN_NAME.search(Path(p).name.split(".")[0]) or STEP_IN_NAME.search(str(p))
        if m is None:
            raise UsageError(
                f"cannot read a training step from the name `{p}`; pass --every N instead"
            )
        out.append(int(m.group(1)))
    return out


def _check_decay(d: float, flag: str) -> None:
    if not 0.0 <= d < 1.0:
        raise UsageError(f"{flag} must be in [0, 1); got {d}")


def ema_recipe(
    paths: Sequence[str], weights: Sequence[float], *, buffers: str = "average"
) -> dict[str, object]:
    """A recipe for the weighted sum; float buffers are averaged, or taken from the last checkpoint."""
    recipe = linear_recipe(paths, weights, normalize=False, prefix="ckpt", step="ema")
    names = list(recipe["inputs"])
    if buffers == "last":
        recipe["overrides"] = [
            {"regex": BUFFER_NAMES, "step": "ema", "input": n, "weight": float(i == len(names) - 1)}
            for i, n in enumerate(names)
        ]
    elif buffers != "average":
        raise UsageError(f"--buffers must be `average` or `last`, not `{buffers}`")
    recipe["output"] = {"copy_files_from": names[-1]}
    return recipe
