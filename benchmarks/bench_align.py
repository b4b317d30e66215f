"""Weight-matching time and sweeps against width: MLP 784-h-h-h-10 and ResNet-20 (×w), CPU.

    python benchmarks/bench_align.py                 # MLP 512..2048, ResNet-20 ×1..×4 (a few minutes)
    python benchmarks/bench_align.py --mlp 512 1024 2048 4096 --resnet 1 2 4 8   # the full table

Each row aligns two independently initialised models (the same shapes a real pair has; trained
pairs can need more sweeps) with one restart of Git Re-Basin weight matching, seed 0, and reports
the spec inference time, the matching time, the sweeps until no sweep improves, the time per
sweep and the cost-matrix dtype (float32 above 1e7 matched weights). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from merge.align import infer_spec, weight_matching
from merge.align.weight_matching import FLOAT64_MAX_ELEMENTS
from merge.toy import make_mlp, make_resnet


def bench(name: str, make: object, example: torch.Tensor, restarts: int) -> dict[str, object]:
    a, b = make(0), make(1)  # type: ignore[operator]
    t0 = time.perf_counter()
    spec = infer_spec(a, example)
    t1 = time.perf_counter()
    _, report = weight_matching(spec, a.state_dict(), b.state_dict(), seed=0, restarts=restarts)
    t2 = time.perf_counter()
    params = sum(p.numel() for p in a.parameters())
    matched = sum(a.state_dict()[t].numel() for t in spec.tensors() if not spec.is_statistic(t))
    return {
        "model": name,
        "params": f"{params / 1e6:.2f}M",
        "groups": len(spec.groups),
        "largest": max(g.size for g in spec.groups.values()),
        "infer s": f"{t1 - t0:.2f}",
        "match s": f"{t2 - t1:.1f}",
        "sweeps": report.sweeps,
        "s/sweep": f"{(t2 - t1) / max(1, sum(r['sweeps'] for r in report.restarts)):.2f}",
        "dtype": "float64" if matched <= FLOAT64_MAX_ELEMENTS else "float32",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--mlp", type=int, nargs="*", default=[512, 1024, 2048], help="MLP hidden widths"
    )
    ap.add_argument(
        "--resnet", type=int, nargs="*", default=[1, 2, 4], help="ResNet-20 width multipliers"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--restarts", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for h in args.mlp:
        rows.append(
            bench(
                f"MLP 784-{h}x3-10",
                lambda s, h=h: make_mlp(784, h, 10, 3, seed=s),
                torch.randn(2, 784),
                args.restarts,
            )
        )
        print(rows[-1], flush=True)
    for w in args.resnet:
        rows.append(
            bench(
                f"ResNet-20 x{w}",
                lambda s, w=w: make_resnet(20, w, 10, seed=s),
                torch.randn(2, 3, 32, 32),
                args.restarts,
            )
        )
        print(rows[-1], flush=True)
    print(
        f"\n{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, restarts {args.restarts}\n"
    )
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
