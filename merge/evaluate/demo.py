"""`merge demo`'s alignment act: two networks from different seeds, the naive and aligned paths.

Two MLPs learn the same synthetic task from different initialisations and batch orders. The
straight line between them climbs a loss barrier; after permuting the hidden units of one onto
the other (Git Re-Basin weight matching, `merge.align`), the line stays low. The act prints
the barrier numbers and writes the plot (and the JSON/CSV of every point).
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from merge.evaluate.results import Result

IN, HIDDEN, CLASSES, DEPTH = 16, 128, 4, 3
STEPS = 25  # Git Re-Basin's α grid: linspace(0, 1, 25)
TRAIN_STEPS = 200


def make_act_model() -> nn.Module:
    from merge.toy import make_mlp

    return make_mlp(IN, HIDDEN, CLASSES, DEPTH)


def alignment_act(workdir: Path, *, quiet: bool = False) -> str:
    """Train two seeds, evaluate the naive and the aligned path, write the plot; returns a short table."""
    from merge.evaluate.paths import interpolation_path
    from merge.toy import batches, make_mlp, synthetic_classification, train

    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    say(f"alignment: training two {IN}-{HIDDEN}x{DEPTH}-{CLASSES} MLPs from different seeds ...")
    X, y = synthetic_classification(0, 4096, in_features=IN, num_classes=CLASSES)
    train_batches, test_batches = batches(X[:3072], y[:3072], 128), batches(X[3072:], y[3072:], 512)
    a, b = (
        train(
            make_mlp(IN, HIDDEN, CLASSES, DEPTH, seed=s),
            train_batches,
            steps=TRAIN_STEPS,
            lr=3e-3,
            seed=s,
        )
        for s in (1, 2)
    )
    try:
        import merge.align  # noqa: F401

        align: str | None = "weight"
    except ImportError:
        align = None
    say(
        "alignment: evaluating the linear path, naive"
        + (" and after weight matching ..." if align else " ...")
    )
    result = interpolation_path(
        make_act_model, a.state_dict(), b.state_dict(), data=test_batches, steps=STEPS, align=align
    )
    result.write(workdir, stem="path")
    return act_table(result, workdir / "path.png", time.perf_counter() - start)


def act_table(result: Result, plot: Path, seconds: float) -> str:
    lines = [
        f"linear mode connectivity: two MLPs from different seeds, {len(result.settings['alphas'])}-point path, test data",
        f"{'path':<10}{'loss barrier':>14}{'midpoint acc':>14}{'endpoint acc':>14}",
    ]
    for c in result.curves:
        barrier = (c.barriers or {}).get("loss", {}).get("max_minus_mean") or {}
        by_alpha = {p["coords"]["alpha"]: p["metrics"] for p in c.points}
        ends = (by_alpha[0.0]["accuracy"] + by_alpha[1.0]["accuracy"]) / 2
        lines.append(
            f"{c.name:<10}{barrier.get('value', float('nan')):14.3f}"
            f"{100 * by_alpha[0.5]['accuracy']:13.1f}%{100 * ends:13.1f}%"
        )
    red = result.selection.get("aligned", {}).get("loss", {}).get("reduction_vs_naive")
    if red is not None:
        lines.append(
            f"weight matching removes {100 * red:.0f}% of the loss barrier (max − mean of endpoints)"
        )
    else:
        lines.append("(merge.align is not installed: naive path only)")
    lines.append(f"plot: {plot}  ({seconds:.1f} s)")
    return "\n".join(lines)
