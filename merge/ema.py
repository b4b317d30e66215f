"""EMA and SWA over an ordered checkpoint sequence, as closed-form weights of one weighted sum.

Folding checkpoints x_0..x_{N-1} one at a time, avg_0 = x_0 and
avg_k = d_k · avg_{k-1} + (1 − d_k) · x_k (what `AveragedModel` with `get_ema_multi_avg_fn`
does when updated once per checkpoint), gives

    w_0 = Π_{j≥1} d_j,        w_k = (1 − d_k) · Π_{j>k} d_j   (k ≥ 1),

which sum to 1; so the whole EMA streams in one pass like any weighted sum.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from merge.errors import UsageError
from merge.recipe import linear_recipe

BUFFER_NAMES = r"(^|\.)(running_mean|running_var)$"
PREFIX = "ckpt"  # the recipe names checkpoint k `ckpt{k}`


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


def step_decays(
    steps: Sequence[int],
    step_decay: float,
    *,
    warmup_gamma: float | None = None,
    warmup_power: float = 0.75,
) -> list[float]:
    """Per-checkpoint decays from one EMA update per training step: D_k = Π_{s_{k−1} < j ≤ s_k} d_j.

    d_j is timm's `ModelEmaV3.get_decay(j)` (update j follows optimiser step j, so the checkpoint
    at step s has seen s updates): the constant `step_decay` without warm-up, else
    min(d, warm(j − 1)), 0 at j = 1 (the first update copies). The product runs over every step,
    as the training loop applied it, not once per checkpoint. Exact when the weights were constant
    between checkpoints (each checkpoint stands for the steps since the previous one); otherwise
    the best one can do from checkpoints alone.
    """
    _check_decay(step_decay, "--step-decay")
    for a, b in pairwise(steps):
        if b <= a:
            raise UsageError(
                f"checkpoint steps must increase: got {a} then {b}; list checkpoints in training order"
            )
    if warmup_gamma is None:
        return [1.0] + [step_decay ** (b - a) for a, b in pairwise(steps)]
    _check_warmup(warmup_gamma, warmup_power)
    return [1.0] + [
        _warmup_product(a, b, step_decay, warmup_gamma, warmup_power) for a, b in pairwise(steps)
    ]


def checkpoint_decays(
    n: int, decay: float, *, warmup_gamma: float | None = None, warmup_power: float = 0.75
) -> list[float]:
    """Decays for one EMA update per checkpoint: checkpoint k is update k (timm's rule, as above)."""
    _check_decay(decay, "--decay")
    if warmup_gamma is None:
        return [decay] * n
    _check_warmup(warmup_gamma, warmup_power)
    return [1.0] + [timm_decay(k, decay, warmup_gamma, warmup_power) for k in range(1, n)]


def warmup_decay(step: float, decay: float, gamma: float, power: float) -> float:
    """timm ModelEmaV3 warm-up at t steps: min(decay, 1 − (1 + t/γ)^(−power))."""
    return min(decay, 1.0 - (1.0 + step / gamma) ** (-power))


def timm_decay(update: int, decay: float, gamma: float, power: float) -> float:
    """`ModelEmaV3(use_warmup=True, update_after_step=0).get_decay(update)`: t = update − 1, 0 if t ≤ 0."""
    t = max(0, update - 1)
    return 0.0 if t <= 0 else warmup_decay(t, decay, gamma, power)


def _warmup_product(a: int, b: int, decay: float, gamma: float, power: float) -> float:
    """Π_{a < j ≤ b} timm_decay(j): factor by factor while the warm-up is below `decay`, then d^count."""
    if decay == 0.0 or a < 1 <= b:
        return 0.0  # update 1 copies (decay 0), and so does every update when decay is 0
    # warm(t) ≥ decay  ⇔  t ≥ γ((1 − d)^(−1/p) − 1); update j uses t = j − 1.
    last_warm = min(b, math.ceil(gamma * ((1.0 - decay) ** (-1.0 / power) - 1.0)) + 1)
    log_product = 0.0
    for lo in range(a + 1, last_warm + 1, 1_000_000):  # chunks bound the memory for long warm-ups
        t = np.arange(lo - 1, min(lo + 1_000_000, last_warm + 1) - 1, dtype=np.float64)
        factors = np.minimum(decay, 1.0 - (1.0 + t / gamma) ** (-power))
        log_product += float(np.log(factors).sum())
    rest = b - max(a, last_warm)
    return math.exp(log_product) * decay**rest


def _check_warmup(gamma: float, power: float) -> None:
    if not gamma > 0 or not power > 0:
        raise UsageError(f"--warmup-gamma and --warmup-power must be > 0; got {gamma} and {power}")


# A step-like token: ckpt-0100, checkpoint-100, step_100, step100, global_step100, iter_100,
# epoch=3-step=100 (the last such token wins), snapshot-000100; or a name that is only digits.
STEP_TOKEN = re.compile(
    r"(?:^|[^a-z])(?:global_step|steps?|ckpt|checkpoint|iter(?:ation)?|it|snapshot)[-_=]?(\d+)(?![\d])",
    re.IGNORECASE,
)
ONLY_DIGITS = re.compile(r"^\d+$")


def step_from_name(path: str | Path) -> int | None:
    """The training step a checkpoint's path names: its name, else its folder's (`checkpoint-100/model.safetensors`)."""
    parts = Path(path).parts
    for part in reversed(parts[-2:]):
        stem = part.split(".")[0] if not ONLY_DIGITS.match(part) else part
        found = STEP_TOKEN.findall(part) or STEP_TOKEN.findall(stem)
        if found:
            return int(found[-1])
        if ONLY_DIGITS.match(stem):
            return int(stem)
    return None


def steps_from_names(paths: Sequence[str | Path]) -> list[int]:
    """Training steps read from checkpoint names (`ckpt-0100`, `step_200.safetensors`, `checkpoint-300/`).

    Only a step-like token counts (see `STEP_TOKEN`): `ft1` or `model-v2` name no step.
    """
    out, missing = [], []
    for p in paths:
        step = step_from_name(p)
        if step is None:
            missing.append(str(p))
        else:
            out.append(step)
    if missing:
        raise UsageError(
            "cannot read a training step from "
            + ", ".join(f"`{m}`" for m in missing)
            + " (names like checkpoint-100, step_100, ckpt-0100 or epoch=3-step=100 carry one);"
            " pass --every N for evenly spaced checkpoints, or rename them"
        )
    return out


def _check_decay(d: float, flag: str) -> None:
    if not 0.0 <= d < 1.0:
        raise UsageError(f"{flag} must be in [0, 1); got {d}")


def ema_recipe(
    paths: Sequence[str], weights: Sequence[float], *, buffers: str = "average"
) -> dict[str, object]:
    """A recipe for the weighted sum; float buffers are averaged, or taken from the last checkpoint."""
    recipe = linear_recipe(paths, weights, normalize=False, prefix=PREFIX, step="ema")
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


@dataclass(frozen=True)
class SequenceWeights:
    """The weights of an ordered checkpoint sequence, and the training steps read from the
    checkpoints' names when the rule needed them (None otherwise), for the caller to show."""

    weights: list[float]
    steps_from_names: list[int] | None = None


def sequence_weights(
    checkpoints: Sequence[str | Path],
    *,
    decay: float | None = None,
    step_decay: float | None = None,
    every: int | None = None,
    swa: bool = False,
    warmup_gamma: float | None = None,
    warmup_power: float = 0.75,
) -> SequenceWeights:
    """Weights under exactly one rule: `decay` per checkpoint, `step_decay` per training step
    (steps `every` apart, else read from the names), or `swa` (uniform); see the module doc."""
    chosen = [x for x in (decay is not None, step_decay is not None, swa) if x]
    if len(chosen) != 1:
        raise UsageError("choose exactly one of --decay, --step-decay or --swa")
    n = len(checkpoints)
    if swa:
        return SequenceWeights(swa_weights(n))
    if step_decay is None:
        assert decay is not None
        decays = checkpoint_decays(n, decay, warmup_gamma=warmup_gamma, warmup_power=warmup_power)
        return SequenceWeights(weights_from_decays(decays))
    read = None if every else steps_from_names(checkpoints)
    steps = read if read is not None else [i * (every or 0) for i in range(n)]
    decays = step_decays(steps, step_decay, warmup_gamma=warmup_gamma, warmup_power=warmup_power)
    return SequenceWeights(weights_from_decays(decays), read)


def write_ema(
    paths: Sequence[str],
    weights: Sequence[float],
    output: str | Path,
    *,
    buffers: str = "average",
    **run: Any,
) -> Path:
    """Stream Σ w_k·checkpoint_k into `output` (`ema_recipe`); tensors that are not averaged
    (integer buffers) and the files beside the weights come from the last checkpoint. `run`:
    `merge.api.run_recipe`'s options (force, dtype, shard_size, device, quiet, ...)."""
    from merge.api import run_recipe

    recipe = ema_recipe(paths, weights, buffers=buffers)
    return run_recipe(recipe, output, passthrough_from=f"{PREFIX}{len(paths) - 1}", **run)
