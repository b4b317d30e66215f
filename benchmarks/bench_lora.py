"""LoRA benchmark: extraction (randomized vs full SVD) and bake time against a plain copy.

    python benchmarks/bench_lora.py                    # ~150 MB fp32 models (shared-machine size)
    python benchmarks/bench_lora.py --layers 48 --dim 2048   # ~800 MB per model

Synthetic "fine-tune": base W (Gaussian) and tuned W + Δ with Δ = U·diag(σ)·Vᵀ, σ_i = exp(−i/24)
(a decaying spectrum, as real fine-tune deltas have) plus 1e-3 noise, per square matrix.
- extract: `merge lora extract --rank 64` with --svd full, randomized (2 power iterations) and
  auto (power iterations until converged, the default); time and the
  relative Frobenius error ‖Δ − BA‖/‖Δ‖ averaged over matrices (equal for an exact method);
- bake: a rank-16 LoRA on every matrix baked into the base (`merge lora bake`), against the
  core's copy bound (`merge_expression("base")`: the same read + write with no math).
Prints a Markdown table (docs/lora.md holds one).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def build(root: Path, layers: int, dim: int, seed: int = 0) -> tuple[Path, Path, Path]:
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    tuned: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    sig = torch.exp(-torch.arange(dim, dtype=torch.float32) / 24.0)
    for i in range(layers):
        k = f"model.layers.{i}.proj.weight"
        w = torch.randn(dim, dim, generator=g) * 0.02
        u, _ = torch.linalg.qr(torch.randn(dim, 96, generator=g))
        v, _ = torch.linalg.qr(torch.randn(dim, 96, generator=g))
        d = (u * sig[:96]) @ v.T * 0.05 + 1e-3 * 0.05 * torch.randn(dim, dim, generator=g)
        base[k], tuned[k] = w, w + d
        p = f"base_model.model.model.layers.{i}.proj"
        lora[f"{p}.lora_A.weight"] = torch.randn(16, dim, generator=g) * 0.01
        lora[f"{p}.lora_B.weight"] = torch.randn(dim, 16, generator=g) * 0.01
    (root / "base").mkdir()
    (root / "tuned").mkdir()
    (root / "lora").mkdir()
    save_file(base, root / "base" / "model.safetensors")
    save_file(tuned, root / "tuned" / "model.safetensors")
    save_file(lora, root / "lora" / "adapter_model.safetensors")
    import json

    (root / "lora" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["proj"]})
    )
    return root / "base", root / "tuned", root / "lora"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument(
        "--skip-extract", action="store_true", help="time only the bake and the copy bound"
    )
    ap.add_argument("--data", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(args.data or tempfile.mkdtemp(prefix="bench_lora_"))
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("base", "tuned", "lora"):
        shutil.rmtree(root / sub, ignore_errors=True)
    base, tuned, lora = build(root, args.layers, args.dim)
    size_mb = (base / "model.safetensors").stat().st_size / 1e6

    from safetensors.torch import load_file

    from merge.api import merge_expression
    from merge.lora.bake import bake
    from merge.lora.extract import extract

    b, t = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    rows = []
    for method in () if args.skip_extract else ("full", "randomized", "auto"):
        t0 = time.perf_counter()
        report, factors = extract(base, tuned, None, rank=args.rank, svd=method)
        dt = time.perf_counter() - t0
        errs = []
        for (_, p), f in factors.items():
            d = t[p + ".weight"] - b[p + ".weight"]
            errs.append(float((d - f.delta()).norm() / d.norm()))
        rows.append(
            (
                f"extract rank {args.rank}, {method} SVD",
                dt,
                f"rel. error {sum(errs) / len(errs):.5f}, energy {report.overall_energy:.5%}",
            )
        )
    for name, fn in (
        (
            "copy bound (merge_expression('base'))",
            lambda out: merge_expression("base", {"base": str(base)}, out, force=True),
        ),
        (
            "bake rank-16 LoRA (merge lora bake)",
            lambda out: bake(base, [(lora, 1.0)], out, force=True),
        ),
    ):
        fn(root / "warm")  # warm the page cache and imports
        times = []
        for _ in range(3):  # best of 3: the machine is shared
            t0 = time.perf_counter()
            fn(root / "out")
            times.append(time.perf_counter() - t0)
        rows.append((name, min(times), f"best of 3; {size_mb / min(times):.0f} MB/s of output"))
    print(
        f"\n{args.layers} matrices {args.dim}x{args.dim} fp32, {size_mb:.0f} MB per model, torch threads {torch.get_num_threads()}\n"
    )
    print("| operation | time (s) | notes |\n| --- | ---: | --- |")
    for name, dt, note in rows:
        print(f"| {name} | {dt:.2f} | {note} |")
    if args.data is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
