"""Post-hoc EMA (Karras et al. 2024, EDM2): any σ_rel from stored power-function EMA snapshots.

A power-function EMA tracked to time t averages the training weights with the profile
p_t(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]; its relative width is σ_rel = sqrt((γ+1)/((γ+2)²(γ+3))).
Given snapshots i = (t_i, γ_i) of such EMAs, the average for a new (t_out, γ_out) is
Σ_i x_i θ̂_i, where x solves the least-squares fit of p_out by the p_i in L2, i.e. the normal
equations A x = b with A_ij = ⟨p_i, p_j⟩ and b_i = ⟨p_i, p_out⟩, then x ← x / Σx. When the target
equals a stored profile, x is that snapshot's unit vector (exact).

`checkpoint_power_weights` is the simpler case: plain (non-EMA) checkpoints θ(t_i); the power EMA
over them gives checkpoint i the profile's mass on (t_{i−1}, t_i]: (t_i/T)^(γ+1) − (t_{i−1}/T)^(γ+1).

Everything here is pure and returns per-snapshot weights; `write_posthoc_ema` (behind
`merge ema SNAPSHOT... --sigma-rel 0.05,0.1 -o out/`) streams each weighted sum with the engine
(`merge.ema.write_ema`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merge.errors import UsageError

SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)  # γ = 0 (uniform average): σ_rel = 0.288675...


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))) (EDM2 eq. 123)."""
    if gamma <= -1.0:
        raise UsageError(f"power-EMA exponent γ = {gamma} must be > -1")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ: the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0 (EDM2 eq. 126)."""
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise UsageError(
            f"σ_rel = {sigma_rel} is outside (0, {SIGMA_REL_MAX:.4f}); the widest power-EMA "
            "profile (γ = 0, a uniform average) has σ_rel = 0.2887. Typical values are 0.05 to 0.2"
        )
    inv = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    real = roots[np.abs(roots.imag) < 1e-9 * max(1.0, float(np.abs(roots).max()))].real
    return float(real.max())


def profile_inner_products(
    t_a: np.ndarray | float,
    g_a: np.ndarray | float,
    t_b: np.ndarray | float,
    g_b: np.ndarray | float,
) -> np.ndarray:
    """⟨p_a, p_b⟩ = (γa+1)(γb+1)/(γa+γb+1) · (t_a/t_b)^γb / t_b for t_a ≤ t_b (symmetric), broadcast."""
    ta, ga, tb, gb = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    ta, ga, tb, gb = np.broadcast_arrays(ta, ga, tb, gb)
    swap = ta > tb  # put the earlier profile first
    t1, g1 = np.where(swap, tb, ta), np.where(swap, gb, ga)
    t2, g2 = np.where(swap, ta, tb), np.where(swap, ga, gb)
    return (g1 + 1.0) * (g2 + 1.0) / (g1 + g2 + 1.0) * (t1 / t2) ** g2 / t2


def posthoc_weights(
    times: Sequence[float],
    sigma_rels: Sequence[float],
    sigma_rel_out: float,
    t_out: float | None = None,
) -> np.ndarray:
    """Weights x (Σx = 1) of the snapshots (t_i, σ_rel_i) whose sum best matches (t_out, σ_rel_out)."""
    if len(times) != len(sigma_rels) or not times:
        raise UsageError("post-hoc EMA needs at least one snapshot, each with a time and a σ_rel")
    t = np.asarray(times, dtype=np.float64)
    if (t <= 0).any():
        raise UsageError(f"snapshot times must be > 0 (steps or images seen), got {list(times)}")
    g = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels])
    t_target = float(t.max() if t_out is None else t_out)
    g_target = sigma_rel_to_gamma(sigma_rel_out)
    a = profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])  # (N, N)
    b = profile_inner_products(t, g, t_target, g_target)  # (N,)
    # A is badly conditioned (~1e4 for two EMAs × 16 snapshots): float64 least squares.
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    total = x.sum()
    if abs(total) < 1e-12:
        raise UsageError("the post-hoc EMA weights sum to zero; add snapshots closer to the target")
    return np.asarray(x / total)


def checkpoint_power_weights(
    times: Sequence[float], sigma_rel: float, t_out: float | None = None
) -> np.ndarray:
    """Power-EMA weights of plain checkpoints θ(t_i): F(t_i) − F(t_{i−1}), F(τ) = (τ/T)^(γ+1).

    The time before the first checkpoint is credited to it (t_0 = 0); T = t_out or the last t_i.
    """
    t = np.asarray(times, dtype=np.float64)
    if len(t) == 0 or (np.diff(t) <= 0).any() or t[0] <= 0:
        raise UsageError(f"checkpoint times must be positive and increasing, got {list(times)}")
    big_t = float(t[-1] if t_out is None else t_out)
    t = np.minimum(t, big_t)
    g = sigma_rel_to_gamma(sigma_rel)
    cdf = (t / big_t) ** (g + 1.0)
    return np.asarray(np.diff(np.concatenate([[0.0], cdf])))


# ---- snapshots on disk ---------------------------------------------------------------------------

_STEP_KEYS = ("step", "t", "nimg", "kimg")
_SIGMA_KEYS = ("sigma_rel", "ema_std", "std")


def snapshot_info(paths: Sequence[str]) -> list[tuple[str, float, float]]:
    """(path, time, σ_rel) for each snapshot, from a manifest or the safetensors metadata.

    A `.json` path is a manifest `{"snapshots": [{"path", "step", "sigma_rel"}, ...]}` (paths
    relative to it); otherwise each safetensors file (or the first shard of a folder) must carry
    metadata `step` (or `t`, `nimg`, `kimg`) and `sigma_rel` (or `ema_std`, `std`).
    """
    out: list[tuple[str, float, float]] = []
    for p in paths:
        path = Path(p)
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            for i, s in enumerate(data.get("snapshots", [])):
                try:
                    out.append(
                        (
                            str(path.parent / s["path"]),
                            float(_first(s, _STEP_KEYS)),
                            float(_first(s, _SIGMA_KEYS)),
                        )
                    )
                except (KeyError, TypeError, ValueError) as e:
                    raise UsageError(
                        f"{path}: snapshots[{i}] needs `path`, `step` and `sigma_rel` ({e})"
                    ) from None
            continue
        meta = _safetensors_metadata(path)
        try:
            out.append(
                (str(path), float(_first(meta, _STEP_KEYS)), float(_first(meta, _SIGMA_KEYS)))
            )
        except (KeyError, ValueError):
            raise UsageError(
                f"{path}: its metadata has no `step` and `sigma_rel` (found: "
                f"{', '.join(sorted(meta)) or 'no metadata'}); save them when training, or list "
                "the snapshots in a manifest.json with `path`, `step` and `sigma_rel`"
            ) from None
    return out


def _first(d: dict[str, Any], keys: Sequence[str]) -> float:
    for k in keys:
        if k in d:
            return float(d[k]) * (1000.0 if k == "kimg" else 1.0)
    raise KeyError(keys[0])


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{path}: no safetensors file to read the snapshot's step and σ_rel from")
    with safe_open(str(files[0]), framework="pt") as f:
        return dict(f.metadata() or {})


@dataclass(frozen=True)
class PosthocTarget:
    """One σ_rel's average: the snapshots' weights and the folder it goes to."""

    sigma_rel: float
    paths: list[str]
    weights: list[float]
    output: Path


def posthoc_targets(
    snapshots: Sequence[str], sigma_rels: Sequence[float], output: str | Path
) -> list[PosthocTarget]:
    """For each σ_rel, the weights of the snapshots (`snapshot_info`) and `output/sigma_0.050/`."""
    info = snapshot_info(snapshots)
    paths = [p for p, _, _ in info]
    times, sigmas = [t for _, t, _ in info], [sr for _, _, sr in info]
    return [
        PosthocTarget(
            s,
            paths,
            [float(w) for w in posthoc_weights(times, sigmas, s)],
            Path(output) / f"sigma_{s:.3f}",
        )
        for s in sigma_rels
    ]


def write_posthoc_ema(
    snapshots: Sequence[str], sigma_rels: Sequence[float], output: str | Path, **run: Any
) -> list[Path]:
    """Write each σ_rel's average (`posthoc_targets`) with `merge.ema.write_ema`; returns the folders."""
    from merge.ema import write_ema

    return [
        write_ema(t.paths, t.weights, t.output, **run)
        for t in posthoc_targets(snapshots, sigma_rels, output)
    ]
