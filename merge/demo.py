"""`merge demo`: task arithmetic at work on a model small enough to train in seconds.

Four synthetic classification tasks share one input; task t's label depends only on the t-th
block of input features (a random linear teacher), and the model answers every task through
its own slice of the output layer. A base model is trained briefly on all tasks, then one
fine-tune per task. The demo then merges through the real engine (files on disk, YAML
recipes) and scores every model on every task.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from merge.errors import PlanError

TASKS = 4
CLASSES = 4
BLOCK = 8  # input features per task
HIDDEN = 128
LAMBDA_GRID = (0.4, 0.6, 0.8, 1.0)


def make_demo_model() -> nn.Module:
    """The demo's network: 32 inputs -> 2 hidden layers -> 4 tasks x 4 classes."""
    return nn.Sequential(
        nn.Linear(TASKS * BLOCK, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, TASKS * CLASSES),
    )


def make_tasks(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Inputs (n, 32) and labels (n, 4): label t = argmax of a fixed teacher on feature block t."""
    teachers = torch.randn(TASKS, CLASSES, BLOCK, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, TASKS * BLOCK, generator=torch.Generator().manual_seed(seed))
    blocks = x.view(n, TASKS, BLOCK)
    y = torch.einsum("tcb,ntb->ntc", teachers, blocks).argmax(-1)
    return x, y


def task_loss(model: nn.Module, x: Tensor, y: Tensor, tasks: list[int]) -> Tensor:
    logits = model(x).view(-1, TASKS, CLASSES)
    return sum(nn.functional.cross_entropy(logits[:, t], y[:, t]) for t in tasks) / len(tasks)  # type: ignore[return-value]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> list[float]:
    """Accuracy (%) on each task."""
    with torch.no_grad():
        pred = model(x).view(-1, TASKS, CLASSES).argmax(-1)
    return [100.0 * float((pred[:, t] == y[:, t]).float().mean()) for t in range(TASKS)]


def train(
    model: nn.Module, x: Tensor, y: Tensor, tasks: list[int], steps: int, lr: float, seed: int
) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (256,), generator=g)
        opt.zero_grad()
        task_loss(model, x[idx], y[idx], tasks).backward()
        opt.step()
    return model


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


def run_demo(workdir: Path, *, force: bool = False, quiet: bool = False) -> str:
    """Train, save, merge with recipes, and return the accuracy table as text."""
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
    torch.manual_seed(0)
    x_train, y_train = make_tasks(8192, seed=1)
    x_test, y_test = make_tasks(4096, seed=2)

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    say(f"training a base model on {TASKS} tasks (briefly) and one fine-tune per task ...")
    base = train(make_demo_model(), x_train, y_train, list(range(TASKS)), steps=25, lr=3e-3, seed=0)
    save_state_dict(base.state_dict(), workdir / "base")
    for t in range(TASKS):
        ft = make_demo_model()
        ft.load_state_dict(base.state_dict())
        train(ft, x_train, y_train, [t], steps=200, lr=5e-4, seed=10 + t)
        save_state_dict(ft.state_dict(), workdir / f"task{t}")

    model = make_demo_model()

    def score(path: Path) -> list[float]:
        model.load_state_dict(load_state_dict(path))
        return accuracy(model, x_test, y_test)

    rows: list[tuple[str, list[float]]] = [("base", score(workdir / "base"))]
    rows += [(f"fine-tune task{t}", score(workdir / f"task{t}")) for t in range(TASKS)]
    tvs = " + ".join(f"(task{t} - base)" for t in range(TASKS))
    recipes: dict[str, tuple[Path, dict[str, float]]] = {
        "average": (
            _recipe(
                workdir,
                "average.yaml",
                " + ".join(f"{1 / TASKS:g} * task{t}" for t in range(TASKS)),
                0.0,
            ),
            {},
        ),
        "task arithmetic": (
            _recipe(workdir, "task-arithmetic.yaml", f"base + lam * ({tvs})", 1.0),
            {},
        ),
        "negate task0": (
            _recipe(workdir, "negate-task0.yaml", "base - lam * (task0 - base)", 1.0),
            {},
        ),
    }
    # Choose the task-arithmetic coefficient on held-out data, as the paper does, with in-memory merges.
    x_val, y_val = make_tasks(2048, seed=3)
    ta_recipe = recipes["task arithmetic"][0]
    best_lam, best_acc = 1.0, -1.0
    for lam in LAMBDA_GRID:
        model.load_state_dict(evaluate_recipe_in_memory(ta_recipe, vars={"lam": lam}))
        val_acc = sum(accuracy(model, x_val, y_val)) / TASKS
        if val_acc > best_acc:
            best_lam, best_acc = lam, val_acc
    say(f"task arithmetic: lam = {best_lam} chosen on validation data from {list(LAMBDA_GRID)}")
    say("merging with the engine: " + ", ".join(str(p.name) for p, _ in recipes.values()))
    for label, (recipe, _) in recipes.items():
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
    try:
        from merge.evaluate.demo import alignment_act
    except ImportError:
        alignment_act = None  # type: ignore[assignment]
    if alignment_act is not None:
        lines += ["", alignment_act(workdir / "alignment", quiet=quiet)]
    lines.append(
        f"done in {time.perf_counter() - start:.1f} s; recipes: {', '.join(p.name for p, _ in recipes.values())}"
    )
    return "\n".join(lines)
