"""PNG and SVG plots of a result (matplotlib's Agg canvas; pyplot and its global state are not used).

One figure per result: 1-D results draw one line per curve for each headline metric; 2-D grids
(planes, two-parameter sweeps, disentanglement) draw one heatmap per metric; negation marks the
chosen λ and the control threshold; linearity probes draw the error ratio against k.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from merge.evaluate.barriers import NOT_METRICS
from merge.evaluate.results import Curve, Result

PREFERRED = ("loss", "accuracy", "perplexity")
MAX_PANELS = 4


def plot_result(result: Result, outdir: Path, stem: str) -> list[Path]:
    """Draw `result` into `<outdir>/<stem>.png` and `.svg`; returns the two paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = headline_metrics(result)
    if result.kind == "linearity":
        fig = Figure(figsize=(6.4, 4.2))
        _linearity(fig, result)
    elif len(result.axes) == 2 and result.kind != "soup":
        fig = Figure(figsize=(4.6 * max(1, len(metrics)), 4.0))
        _heatmaps(fig, result, metrics)
    else:
        fig = Figure(figsize=(4.6 * max(1, len(metrics)), 3.8))
        _lines(fig, result, metrics)
    title = {"path": "interpolation path", "task_vector_path": "task-vector scale"}.get(
        result.kind, result.kind
    )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    paths = []
    for ext in ("png", "svg"):
        p = outdir / f"{stem}.{ext}"
        fig.savefig(p, dpi=120)
        paths.append(p)
    return paths


def headline_metrics(result: Result) -> list[str]:
    names: dict[str, None] = {}
    for c in result.curves:
        names.update(dict.fromkeys(m for m in c.metric_names() if m not in NOT_METRICS))
    ordered = [m for m in names if any(m == p or m.endswith("_" + p) for p in PREFERRED)]
    ordered += [m for m in names if m not in ordered]
    return ordered[:MAX_PANELS] or ["loss"]


def _axis_label(axis: str) -> str:
    return {
        "alpha": "α",
        "lambda": "λ",
        "lambda1": "λ1",
        "lambda2": "λ2",
        "alpha1": "α1",
        "alpha2": "α2",
    }.get(axis, axis)


def _lines(fig: Any, result: Result, metrics: list[str]) -> None:
    axis = result.axes[0] if result.axes else "index"
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for c in result.curves:
            xs = _xs(c, axis)
            ys = c.values(metric)
            if all(math.isnan(y) for y in ys):
                continue
            ax.plot(xs, ys, marker="o", markersize=3, label=c.name)
        if result.kind == "path":
            ax.axvline(0.5, color="0.8", lw=0.8, zorder=0)
        _decorate_selection(ax, result, metric)
        ax.set_xlabel(_axis_label(axis))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if i == 0 and len(result.curves) > 1:
            ax.legend(fontsize=8)


def _xs(c: Curve, axis: str) -> list[float]:
    try:
        return c.coords(axis)
    except (KeyError, TypeError, ValueError):
        return list(range(len(c.points)))


def _decorate_selection(ax: Any, result: Result, metric: str) -> None:
    sel = result.selection
    if result.kind == "negation" and sel.get("lambda") is not None:
        ax.axvline(sel["lambda"], color="C3", ls="--", lw=1, label=f"chosen λ={sel['lambda']:g}")
        if metric == f"control_{sel.get('metric')}" and sel.get("control_limit") is not None:
            ax.axhline(sel["control_limit"], color="C3", ls=":", lw=1)
        rnd = sel.get("random_baseline")
        if rnd and metric in rnd.get("metrics", {}):
            ax.plot(
                [sel["lambda"]],
                [rnd["metrics"][metric]],
                marker="x",
                color="k",
                ms=8,
                ls="",
                label="random vector",
            )
            ax.legend(fontsize=8)
    if result.kind == "sweep" and sel.get("best") and len(result.axes) == 1:
        ax.axvline(sel["best"]["coords"][result.axes[0]], color="C3", ls="--", lw=1)


def _heatmaps(fig: Any, result: Result, metrics: list[str]) -> None:
    import numpy as np

    xa, ya = result.axes
    c = result.curves[0]
    xs = sorted({p["coords"][xa] for p in c.points})
    ys = sorted({p["coords"][ya] for p in c.points})
    for i, metric in enumerate(metrics):
        grid = np.full((len(ys), len(xs)), np.nan)
        for p in c.points:
            v = p["metrics"].get(metric)
            if v is not None:
                grid[ys.index(p["coords"][ya]), xs.index(p["coords"][xa])] = v
        ax = fig.add_subplot(1, len(metrics), i + 1)
        mesh = ax.pcolormesh(_edges(xs), _edges(ys), grid, shading="flat", cmap="viridis")
        fig.colorbar(mesh, ax=ax, shrink=0.85)
        if result.kind == "plane":
            for (px, py), label in (((0, 0), "θ0"), ((1, 0), "θ1"), ((0, 1), "θ2")):
                ax.plot([px], [py], marker="o", color="w", mec="k", ms=6)
                ax.annotate(
                    label,
                    (px, py),
                    textcoords="offset points",
                    xytext=(4, 4),
                    color="w",
                    fontsize=8,
                )
        ax.set_xlabel(_axis_label(xa))
        ax.set_ylabel(_axis_label(ya))
        ax.set_title(metric, fontsize=9)


def _edges(v: list[float]) -> list[float]:
    if len(v) == 1:
        return [v[0] - 0.5, v[0] + 0.5]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(v)]
    return [v[0] - (mids[0] - v[0]), *mids, v[-1] + (v[-1] - mids[-1])]


def _linearity(fig: Any, result: Result) -> None:
    ax = fig.add_subplot(1, 1, 1)
    for i, c in enumerate(result.curves):
        color = f"C{i % 10}"
        hom = [p for p in c.points if p["coords"].get("test") == "homogeneity"]
        add = [p for p in c.points if p["coords"].get("test") == "additivity"]
        if hom:
            ax.plot(
                [p["coords"]["k"] for p in hom],
                [max(p["metrics"]["mean"], 1e-12) for p in hom],
                marker="o",
                color=color,
                label=f"{c.name}: homogeneity",
            )
        for p in add:
            ax.axhline(
                max(p["metrics"]["mean"], 1e-12),
                color=color,
                ls="--",
                lw=1,
                label=f"{c.name}: additivity",
            )
    ax.set_yscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("error / ‖f(x) − f(y)‖ (mean over pairs)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
