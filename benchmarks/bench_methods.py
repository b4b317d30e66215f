"""Method kernels: exact magnitude selection and per-tensor merges, timed on this machine.

    python benchmarks/bench_methods.py                  # selection at 1e7 and 1e8, merges at 1e7
    python benchmarks/bench_methods.py --sizes 1e7      # quicker
    python benchmarks/bench_methods.py --argsort-1e8    # also time argsort on 1e8 (about 11 s)
    python benchmarks/bench_methods.py --e2e /tmp/bench-data/1GB   # TIES/DARE/stock vs linear
    python benchmarks/bench_methods.py --sizes "" --merge-size 0 --sweep 2,4,8   # TA vs TIES

Selection: the k-th largest |x| (k = 0.2 n, randn fp32) by a full `argsort` (what mergekit's
`magnitude()` does), `kthvalue`, `topk`, and ours (sample bracket then count; exact).
Merges: one tensor of n fp32 elements, base + 3 models, in-memory; the ratio is to `linear`.
`--e2e DIR` runs whole recipes through the engine on a set built by bench_core.py
(DIR/base, DIR/ft1..ft3) and reports wall time and peak RSS of each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from merge.methods.dare import dare_ties
from merge.methods.linear import linear
from merge.methods.model_stock import model_stock
from merge.methods.selection import kth_largest_abs
from merge.methods.task_arithmetic import task_arithmetic
from merge.methods.ties import ties


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def argsort_threshold(x: torch.Tensor, k: int) -> float:
    """mergekit's magnitude(): full argsort of |x|, then the k-th largest."""
    idx = torch.argsort(x.abs().reshape(-1), descending=True)
    return float(x.reshape(-1)[idx[k - 1]].abs())


def bench_selection(n: int, repeat: int, with_argsort: bool) -> list[tuple[str, float]]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    k = int(0.2 * n)
    rows = []
    want = kth_largest_abs(x, k, method="kthvalue")
    if with_argsort:
        assert argsort_threshold(x, k) == want
        rows.append(("argsort (mergekit)", best_of(lambda: argsort_threshold(x, k), 1)))
    rows.append(("kthvalue", best_of(lambda: kth_largest_abs(x, k, method="kthvalue"), repeat)))
    rows.append(("topk(sorted=False)", best_of(lambda: x.abs().topk(k, sorted=False), repeat)))
    assert kth_largest_abs(x, k, method="bracket") == want  # exact
    rows.append(
        ("bracket+count (ours)", best_of(lambda: kth_largest_abs(x, k, method="bracket"), repeat))
    )
    return rows


def bench_merges(n: int, repeat: int) -> list[tuple[str, float]]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n, generator=g)
    xs = [base + 0.01 * torch.randn(n, generator=g) for _ in range(3)]
    w, d = [1.0, 0.8, 0.6], [0.2] * 3
    gen = torch.Generator()
    cases: list[tuple[str, Callable[[], object]]] = [
        ("linear (3 models)", lambda: linear(xs, weight=w)),
        ("task_arithmetic", lambda: task_arithmetic(xs, base=base, weight=w)),
        ("ties density 0.2", lambda: ties(xs, base=base, weight=w, density=d)),
        (
            "dare_ties density 0.2",
            lambda: dare_ties(xs, base=base, weight=w, density=d, generator=gen.manual_seed(0)),
        ),
        ("model_stock", lambda: model_stock(xs, base=base)),
    ]
    try:  # mergekit's own TIES kernel on the same tensors, when importable
        from mergekit.merge_methods import registry
        from mergekit.merge_methods.base import TensorGroup

        mk = registry.get("ties")
        group = TensorGroup.from_tensors([base, *xs], base_index=0)
        params = {
            "weight": dict(enumerate(w, 1)),
            "density": dict(enumerate(d, 1)),
            "normalize": True,
            "rescale": False,
            "lambda": 1.0,
            "int8_mask": False,
        }
        cases.append(("mergekit 0.1.5 ties (argsort)", lambda: mk.merge_group(group, **params)))
    except ImportError:
        pass
    return [(name, best_of(fn, repeat)) for name, fn in cases]


def _sweep_one(n_tasks: int, seed: int) -> tuple[float, float, float]:
    """(averaging, task arithmetic, TIES) mean test accuracy for one task count and seed."""
    import torch.nn.functional as F
    from torch import nn

    block, classes = 8, 4
    dim = n_tasks * block
    torch.manual_seed(seed)

    def data(t: int, n: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 * seed + t)
        centres = torch.randn(classes * 3, block, generator=g) * 1.5
        labels = torch.arange(classes).repeat_interleave(3)
        g = torch.Generator().manual_seed(s)
        pick = torch.randint(0, len(centres), (n,), generator=g)
        x = torch.zeros(n, dim)
        noise = 0.5 * torch.randn(n, block, generator=g)
        x[:, t * block : (t + 1) * block] = centres[pick] + noise
        return x, labels[pick]

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, classes))

    def fit(m: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(steps):
            i = torch.randint(0, len(x), (64,))
            loss = F.cross_entropy(m(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    xp = torch.randn(2000, dim)
    yp = (xp[:, ::8].sum(1) > 0).long() + 2 * (xp[:, 1::8].sum(1) > 0).long()
    base = fit(mlp(), xp, yp, 200)
    tuned = []
    for t in range(n_tasks):
        m = mlp()
        m.load_state_dict(base)
        tuned.append(fit(m, *data(t, 1000, 1), 150))
    ev = mlp()
    val = [data(t, 300, 2) for t in range(n_tasks)]
    test = [data(t, 1000, 3) for t in range(n_tasks)]
    ones = [1.0] * n_tasks

    def acc(state: dict[str, torch.Tensor], dd: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        ev.load_state_dict(state)
        with torch.no_grad():
            return sum(float((ev(x).argmax(-1) == y).float().mean()) for x, y in dd) / len(dd)

    def ta(lam: float) -> dict[str, torch.Tensor]:
        return {
            k: task_arithmetic([s[k] for s in tuned], base=base[k], weight=ones, scale=lam)
            for k in base
        }

    def ti(lam: float) -> dict[str, torch.Tensor]:
        d = [0.2] * n_tasks
        return {
            k: ties([s[k] for s in tuned], base=base[k], weight=ones, density=d, scale=lam)
            for k in base
        }

    avg = acc({k: linear([s[k] for s in tuned], weight=ones) for k in base}, test)
    lam_ta = max((0.1, 0.2, 0.3, 0.5, 0.7, 1.0), key=lambda v: acc(ta(v), val))
    lam_ti = max((0.6, 0.8, 1.0, 1.5, 2.0), key=lambda v: acc(ti(v), val))
    return avg, acc(ta(lam_ta), test), acc(ti(lam_ti), test)


def task_sweep(counts: list[int], seeds: list[int]) -> list[tuple[int, float, float, float]]:
    """Mean test accuracy of averaging, task arithmetic and TIES (λ picked on validation) as
    the number of tasks grows; tiny MLPs fine-tuned from one base on synthetic block tasks."""
    rows = []
    for n_tasks in counts:
        runs = [_sweep_one(n_tasks, seed) for seed in seeds]
        rows.append((n_tasks, *(sum(r[i] for r in runs) / len(runs) for i in range(3))))
    return rows


E2E_SCRIPT = r"""
import sys, json, resource, time
from merge.api import run_recipe
t0 = time.perf_counter()
run_recipe(json.loads(sys.argv[1]), sys.argv[2], force=True, quiet=True)
print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "wall": time.perf_counter() - t0}))
"""


def bench_e2e(data: Path, out: Path, only: list[str]) -> list[tuple[str, float, float]]:
    inputs = {"base": str(data / "base"), **{f"m{i}": str(data / f"ft{i + 1}") for i in range(3)}}
    models = {f"m{i}": {"weight": 1.0, "density": 0.2} for i in range(3)}
    steps = {
        "linear": {"method": "linear", "models": {f"m{i}": {"weight": 1.0} for i in range(3)}},
        "ties": {"method": "ties", "base": "base", "models": models},
        "dare_ties": {"method": "dare_ties", "base": "base", "models": models},
        "model_stock": {"method": "model_stock", "base": "base", "models": list(models)},
    }
    rows = []
    for name, step in steps.items():
        if name not in only:
            continue
        recipe = {"version": 1, "inputs": inputs, "steps": {"out": step}}
        res = subprocess.run(
            [sys.executable, "-c", E2E_SCRIPT, json.dumps(recipe), str(out)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append((name, r["wall"], r["rss"] / 2**30))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e7,1e8")
    ap.add_argument("--merge-size", default="1e7")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--argsort-1e8", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--e2e", type=Path, default=None)
    ap.add_argument("--e2e-methods", default="linear,ties,dare_ties,model_stock")
    ap.add_argument("--sweep", default="", help="task counts for the TA-vs-TIES sweep, e.g. 2,4,8")
    ap.add_argument("--sweep-seeds", default="0,1,2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| selection (k = 0.2 n) | n | time | vs kthvalue |\n| --- | ---: | ---: | ---: |")
    for s in filter(None, args.sizes.split(",")):
        n = int(float(s))
        rows = bench_selection(n, args.repeat, with_argsort=n <= 10**7 or args.argsort_1e8)
        ref = dict(rows)["kthvalue"]
        for name, t in rows:
            print(f"| {name} | {s} | {t * 1000:.0f} ms | {ref / t:.2f}x |")
    n = int(float(args.merge_size))
    rows = bench_merges(n, args.repeat) if n > 0 else [("linear (3 models)", 1.0)]
    ref = dict(rows)["linear (3 models)"]
    print(
        f"\n| merge of one tensor, n = {args.merge_size} fp32 | time | / linear |\n| --- | ---: | ---: |"
    )
    for name, t in rows:
        print(f"| {name} | {t * 1000:.0f} ms | {t / ref:.1f}x |")
    if args.sweep:
        counts = [int(c) for c in args.sweep.split(",")]
        seeds = [int(c) for c in args.sweep_seeds.split(",")]
        print(
            f"\n| tasks | averaging | task arithmetic | TIES | TIES − TA |  (mean over seeds {seeds})"
        )
        print("| ---: | ---: | ---: | ---: | ---: |")
        for n_tasks, a, ta, ti in task_sweep(counts, seeds):
            print(f"| {n_tasks} | {a:.3f} | {ta:.3f} | {ti:.3f} | {ti - ta:+.3f} |")
    if args.e2e:
        rows3 = bench_e2e(args.e2e, Path("/tmp/bench_methods_out"), args.e2e_methods.split(","))
        ref = rows3[0][1]
        print(
            f"\n| recipe on {args.e2e} (base + 3) | wall | / linear | peak RSS |\n| --- | ---: | ---: | ---: |"
        )
        for name, t, rss in rows3:
            print(f"| {name} | {t:.1f} s | {t / ref:.1f}x | {rss:.2f} GiB |")


if __name__ == "__main__":
    main()
