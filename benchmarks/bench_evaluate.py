"""Evaluation benchmark: the cost of a path point against one plain evaluation pass, and executors.

    python benchmarks/bench_evaluate.py                  # both parts (about a minute on 2 cores)
    python benchmarks/bench_evaluate.py --part overhead  # path point vs plain pass only
    python benchmarks/bench_evaluate.py --part executors --points 24 --workers 2

Part 1, overhead. A plain pass is the evaluator on a model whose weights are already loaded.
A path point is what `merge path` does per α: combine A and B into the same model instance in
place (one `torch.lerp` per tensor), then the same evaluation. Overhead = point / plain − 1,
fastest of interleaved repeats, for models from 0.3 M to 13 M parameters and a small transformer LM. The
target is ≤ 10% wherever the evaluation reads a realistic amount of data.

Part 2, executors. A sweep of N points on one model, run sequentially, on the local process
pool and on Ray (when installed), wall time from the call to the last result, worker start-up
included (Ray: the local runtime's start too).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from merge.evaluate.evaluators import ClassificationEvaluator
from merge.evaluate.executors import run_points
from merge.evaluate.report import format_table
from merge.evaluate.runner import Job, Point, Runner
from merge.toy import (
    batches,
    make_mlp,
    make_transformer,
    synthetic_classification,
    synthetic_tokens,
)


class Factory:
    """A picklable `make_model` for the pool and Ray workers."""

    def __init__(self, kind: str, **kwargs: Any):
        self.kind, self.kwargs = kind, kwargs

    def __call__(self) -> nn.Module:
        make = {"mlp": make_mlp, "transformer": make_transformer}[self.kind]
        return make(**self.kwargs)


def _best_times(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Fastest of `repeats` runs of each function, interleaved so that load from other processes
    hits all of them alike (the minimum is the least disturbed run)."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def overhead(repeats: int) -> list[list[Any]]:
    cases: list[tuple[str, Factory, Any]] = []
    X, y = synthetic_classification(0, 4096)
    for hidden in (128, 512, 2048):
        cases.append(
            (
                f"MLP 16-{hidden}x3-4, 4096 examples",
                Factory("mlp", hidden=hidden),
                ClassificationEvaluator(batches(X, y, 512)),
            )
        )
    Xs, ys = X[:256], y[:256]
    cases.append(
        (
            "MLP 16-2048x3-4, 256 examples",
            Factory("mlp", hidden=2048),
            ClassificationEvaluator(batches(Xs, ys, 256)),
        )
    )
    ids, nxt = synthetic_tokens(0, 256, seq_len=64, vocab_size=512)
    lm = Factory("transformer", vocab_size=512, d_model=128, n_layers=4, max_len=64)
    # next-token targets per position: the classification evaluator flattens (B, T, V) logits
    cases.append(
        ("transformer d128x4, 256x64 tokens", lm, ClassificationEvaluator(batches(ids, nxt, 32)))
    )
    rows = []
    for name, factory, ev in cases:
        a, b = factory(), factory()
        torch.manual_seed(1)
        for p in b.parameters():
            p.data.add_(torch.randn_like(p) * 0.01)
        job = Job(factory, {"a": a.state_dict(), "b": b.state_dict()}, ev)
        runner = Runner(job)
        runner.space.apply({"a": 0.5, "b": 0.5})
        point_ = Point("p", {"alpha": 0.5}, {"a": 0.5, "b": 0.5})
        plain, point, write = _best_times(
            [
                functools.partial(ev, runner.model),
                functools.partial(runner.evaluate, point_),
                functools.partial(runner.space.apply, point_.weights),
            ],
            repeats,
        )
        params = sum(p.numel() for p in runner.model.parameters())
        rows.append(
            [
                name,
                f"{params / 1e6:.2f} M",
                1e3 * plain,
                1e3 * point,
                100 * (point / plain - 1),
                1e3 * write,
                100 * write / plain,
            ]
        )
    return rows


def executors(points: int, workers: int) -> list[list[Any]]:
    X, y = synthetic_classification(0, 8192)
    factory = Factory("mlp", hidden=512)
    a, b = factory(), factory()
    job = Job(
        factory,
        {"a": a.state_dict(), "b": b.state_dict()},
        ClassificationEvaluator(batches(X, y, 1024)),
    )
    grid = [
        Point(
            "sweep", {"alpha": i / (points - 1)}, {"a": 1 - i / (points - 1), "b": i / (points - 1)}
        )
        for i in range(points)
    ]
    rows = []
    names = ["sequential", "pool"]
    try:
        import ray  # noqa: F401

        names.append("ray")
    except ImportError:
        print(
            "ray is not installed: its row is skipped (pip install 'mergewright[ray]')",
            file=sys.stderr,
        )
    reference = None
    for name in names:
        t = time.perf_counter()
        results = run_points(job, grid, executor=name, workers=workers)
        wall = time.perf_counter() - t
        if reference is None:
            reference = results
        same = all(
            abs(r["metrics"]["loss"] - s["metrics"]["loss"]) <= 1e-6 * abs(s["metrics"]["loss"])
            for r, s in zip(results, reference)
        )
        busy = sum(r["seconds"] for r in results)
        rows.append(
            [
                name,
                1 if name == "sequential" else workers,
                points,
                wall,
                wall / points * 1e3,
                busy,
                same,
            ]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--part", choices=["all", "overhead", "executors"], default="all")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--points", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of this process (default: torch's)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load:.1f}"
    )
    if args.part in ("all", "overhead"):
        rows = overhead(args.repeats)
        print("\nPath point vs one plain evaluation pass (fastest of interleaved repeats)")
        print(
            format_table(
                [
                    "model and data",
                    "params",
                    "plain ms",
                    "point ms",
                    "overhead %",
                    "weights ms",
                    "weights / plain %",
                ],
                rows,
            )
        )
    if args.part in ("all", "executors"):
        rows = executors(args.points, args.workers)
        print(
            f"\nSweep of {args.points} points (MLP 16-512x3-4, 8192 examples per point), start-up included"
        )
        print(
            format_table(
                ["executor", "workers", "points", "wall s", "ms / point", "busy s", "same results"],
                rows,
            )
        )


if __name__ == "__main__":
    main()
