"""`merge demo`: task arithmetic and alignment at work on models small enough to train in seconds.

Act one, task arithmetic: four synthetic classification tasks share one input; task t's label
depends only on the t-th block of input features (`merge.toy.synthetic_tasks`), and the model
answers every task through its own slice of the output layer. A base model is trained briefly
on all tasks, then one fine-tune per task. The demo merges through the real engine (files on
disk, YAML recipes) and scores every model on every task.

Act two, alignment: two MLPs learn one task from different seeds. The straight line between
them climbs a loss barrier; after permuting the hidden units of one onto the other (Git
Re-Basin weight matching, `merge.align`), the line stays low.

Models, data and training come from `merge.toy`. Each act returns its table as text and
reports progress through `progress` (the CLI prints it).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from merge.errors import PlanError
from merge.evaluate.results import Result
from merge.toy import (
    Batch,
    batches,
    make_mlp,
    synthetic_classification,
    synthetic_tasks,
    train,
)

Progress = Callable[[str], None]

TASKS = 4
CLASSES = 4
BLOCK = 8  # input features per task
HIDDEN = 128
LAMBDA_GRID = (0.4, 0.6, 0.8, 1.0)

# Act two: Git Re-Basin's setting, scaled down.
ACT_IN, ACT_HIDDEN, ACT_CLASSES, ACT_DEPTH = 16, 128, 4, 3
ACT_STEPS = 25  # Git Re-Basin's α grid: linspace(0, 1, 25)
ACT_TRAIN_STEPS = 200


def make_demo_model() -> nn.Module:
    """The task-arithmetic network: 32 inputs -> 2 hidden layers -> 4 tasks x 4 classes."""
    return make_mlp(TASKS * BLOCK, HIDDEN, TASKS * CLASSES, depth=2)


def task_loss(tasks: list[int]) -> Callable[[nn.Module, Batch], Tensor]:
    """Mean cross-entropy over `tasks`, each read from its own slice of the output."""

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        logits = model(x).view(-1, TASKS, CLASSES)  # (B, tasks, classes)
        per_task = [nn.functional.cross_entropy(logits[:, t], y[:, t]) for t in tasks]
        return torch.stack(per_task).mean()

    return loss


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> list[float]:
    """Accuracy (%) on each task."""
    with torch.no_grad():
        pred = model(x).view(-1, TASKS, CLASSES).argmax(-1)  # (n, tasks)
    return [100.0 * float((pred[:, t] == y[:, t]).float().mean()) for t in range(TASKS)]


RECIPE_TEMPLATE = """\
# Task arithmetic on the demo's models. Run it yourself with:
#   merge run {name} -o my-merge/
# and try other coefficients with --var lam=0.5
version: 1
inputs:
{inputs}
vars:
  lam: {lam}
steps:
  merged: {expr}
output:
  copy_files_from: base
"""


def _recipe(workdir: Path, name: str, expr: str, lam: float) -> Path:
    inputs = "\n".join(f"  {n}: ./{n}" for n in ["base", *[f"task{t}" for t in range(TASKS)]])
    path = workdir / name
    path.write_text(RECIPE_TEMPLATE.format(name=path, inputs=inputs, lam=lam, expr=expr))
    return path


def _say(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def run_demo(workdir: Path, *, force: bool = False, progress: Progress | None = None) -> str:
    """Train, save, merge with recipes, run the alignment act; return the tables as text."""
    from merge.api import evaluate_recipe_in_memory, run_recipe
    from merge.io import load_state_dict, save_state_dict

    start = time.perf_counter()
    workdir = Path(workdir)
    if workdir.exists():
        if not force and any(workdir.iterdir()):
            raise PlanError(
                f"demo folder {workdir} already exists; pass --force to replace it, or --workdir elsewhere"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    x_train, y_train = synthetic_tasks(1, 8192, TASKS, CLASSES, BLOCK)
    x_test, y_test = synthetic_tasks(2, 4096, TASKS, CLASSES, BLOCK)
    train_batches = batches(x_train, y_train, 256)

    _say(
        progress, f"training a base model on {TASKS} tasks (briefly) and one fine-tune per task ..."
    )
    base = make_mlp(TASKS * BLOCK, HIDDEN, TASKS * CLASSES, depth=2, seed=0)
    train(base, train_batches, steps=25, lr=3e-3, seed=0, loss_fn=task_loss(list(range(TASKS))))
    save_state_dict(base.state_dict(), workdir / "base")
    for t in range(TASKS):
        ft = make_demo_model()
        ft.load_state_dict(base.state_dict())
        train(ft, train_batches, steps=200, lr=5e-4, seed=10 + t, loss_fn=task_loss([t]))
        save_state_dict(ft.state_dict(), workdir / f"task{t}")

    model = make_demo_model()

    def score(path: Path) -> list[float]:
        model.load_state_dict(load_state_dict(path))
        return accuracy(model, x_test, y_test)

    rows: list[tuple[str, list[float]]] = [("base", score(workdir / "base"))]
    rows += [(f"fine-tune task{t}", score(workdir / f"task{t}")) for t in range(TASKS)]
    tvs = " + ".join(f"(task{t} - base)" for t in range(TASKS))
    recipes = {
        "average": _recipe(
            workdir,
            "average.yaml",
            " + ".join(f"{1 / TASKS:g} * task{t}" for t in range(TASKS)),
            0.0,
        ),
        "task arithmetic": _recipe(workdir, "task-arithmetic.yaml", f"base + lam * ({tvs})", 1.0),
        "negate task0": _recipe(workdir, "negate-task0.yaml", "base - lam * (task0 - base)", 1.0),
    }
    # Choose the task-arithmetic coefficient on held-out data, as the paper does, with in-memory merges.
    x_val, y_val = synthetic_tasks(3, 2048, TASKS, CLASSES, BLOCK)
    best_lam, best_acc = 1.0, -1.0
    for lam in LAMBDA_GRID:
        model.load_state_dict(
            evaluate_recipe_in_memory(recipes["task arithmetic"], vars={"lam": lam})
        )
        val_acc = sum(accuracy(model, x_val, y_val)) / TASKS
        if val_acc > best_acc:
            best_lam, best_acc = lam, val_acc
    _say(
        progress,
        f"task arithmetic: lam = {best_lam} chosen on validation data from {list(LAMBDA_GRID)}",
    )
    _say(progress, "merging with the engine: " + ", ".join(p.name for p in recipes.values()))
    for label, recipe in recipes.items():
        chosen = {"lam": best_lam} if label == "task arithmetic" else None
        out = run_recipe(
            recipe, workdir / f"merged-{recipe.stem}", vars=chosen, quiet=True, force=True
        )
        rows.append((label if chosen is None else f"{label} ({best_lam:g})", score(out)))

    lines = [f"per-task test accuracy (%), {TASKS} synthetic tasks; files in {workdir}/", ""]
    lines.append(
        f"{'model':<22}" + "".join(f"{'task' + str(t):>8}" for t in range(TASKS)) + f"{'mean':>8}"
    )
    for label, acc in rows:
        lines.append(
            f"{label:<22}" + "".join(f"{a:8.1f}" for a in acc) + f"{sum(acc) / len(acc):8.1f}"
        )
    neg = dict(rows)["negate task0"]
    lines.append("")
    lines.append(
        f"task arithmetic vs average: {sum(rows[-2][1]) / TASKS:.1f} vs {sum(dict(rows)['average']) / TASKS:.1f} mean accuracy"
    )
    b = dict(rows)["base"]
    lines.append("")
    lines.append(
        f"negation: task0 {b[0]:.1f} -> {neg[0]:.1f} (forgotten), other tasks {sum(b[1:]) / 3:.1f} -> {sum(neg[1:]) / 3:.1f} (held)"
    )
    lines += ["", alignment_act(workdir / "alignment", progress=progress)]
    lines.append(
        f"done in {time.perf_counter() - start:.1f} s; recipes: {', '.join(p.name for p in recipes.values())}"
    )
    return "\n".join(lines)


def make_act_model() -> nn.Module:
    """Act two's network: 16 inputs -> 3 hidden layers of 128 -> 4 classes."""
    return make_mlp(ACT_IN, ACT_HIDDEN, ACT_CLASSES, ACT_DEPTH)


def alignment_act(workdir: Path, *, progress: Progress | None = None) -> str:
    """Train two seeds, evaluate the naive and the aligned path, write the plot; returns a short table."""
    from merge.evaluate.paths import interpolation_path
    from merge.evaluate.report import write_result

    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _say(
        progress,
        f"alignment: training two {ACT_IN}-{ACT_HIDDEN}x{ACT_DEPTH}-{ACT_CLASSES} MLPs from different seeds ...",
    )
    X, y = synthetic_classification(0, 4096, in_features=ACT_IN, num_classes=ACT_CLASSES)
    train_batches, test_batches = batches(X[:3072], y[:3072], 128), batches(X[3072:], y[3072:], 512)
    a, b = (
        train(
            make_mlp(ACT_IN, ACT_HIDDEN, ACT_CLASSES, ACT_DEPTH, seed=s),
            train_batches,
            steps=ACT_TRAIN_STEPS,
            lr=3e-3,
            seed=s,
        )
        for s in (1, 2)
    )
    _say(progress, "alignment: evaluating the linear path, naive and after weight matching ...")
    result = interpolation_path(
        make_act_model,
        a.state_dict(),
        b.state_dict(),
        data=test_batches,
        steps=ACT_STEPS,
        align="weight",
    )
    write_result(result, workdir, stem="path")
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
    lines.append(f"plot: {plot}  ({seconds:.1f} s)")
    return "\n".join(lines)
