"""`merge inspect`: what a checkpoint holds, and how fine-tunes differ from their base."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from merge.dtypes import dtype_name
from merge.errors import PlanError
from merge.io.detect import open_checkpoint
from merge.lora.source import describe as describe_adapter
from merge.lora.source import looks_like_lora
from merge.progress import counted


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def describe_checkpoint(path: str, *, limit: int = 40, unsafe_pickle: bool = False) -> str:
    """Format, files, tensors with dtype/shape/bytes/shard, and totals by dtype (headers only)."""
    if looks_like_lora(path):
        return describe_adapter(path)
    src = open_checkpoint(path, unsafe_pickle=unsafe_pickle)
    try:
        keys = src.keys()
        files = src.files()
        by_dtype: Counter[str] = Counter()
        params: Counter[str] = Counter()
        rows = []
        for k in keys:
            m = src.meta(k)
            d = dtype_name(m.dtype)
            by_dtype[d] += m.nbytes
            params[d] += m.numel
            rows.append(
                (
                    k,
                    d,
                    "x".join(map(str, m.shape)) or "scalar",
                    _fmt_bytes(m.nbytes),
                    Path(m.file).name if m.file else "",
                )
            )
        lines = [
            f"{src.path}: {type(src).__name__.replace('Source', '')}, {len(keys)} tensors in {max(len(files), 1)} file(s), "
            f"{sum(params.values()):,} elements, {_fmt_bytes(sum(by_dtype.values()))}"
        ]
        lines += [
            f"  {d}: {params[d]:,} elements, {_fmt_bytes(b)}" for d, b in by_dtype.most_common()
        ]
        if src.metadata if hasattr(src, "metadata") else False:
            meta = src.metadata  # type: ignore[attr-defined]
            if "merge_recipe" in meta:
                lines.append(
                    f"  made by merge {meta.get('merge_version', '?')}: recipe {meta['merge_recipe'][:200]}"
                )
        shown = rows if limit == 0 else rows[:limit]
        width = max((len(r[0]) for r in shown), default=4)
        lines.append(f"  {'tensor':<{width}}  {'dtype':<8}  {'shape':<16}  {'bytes':>10}  file")
        lines += [f"  {r[0]:<{width}}  {r[1]:<8}  {r[2]:<16}  {r[3]:>10}  {r[4]}" for r in shown]
        if len(rows) > len(shown):
            lines.append(f"  ... {len(rows) - len(shown)} more (--limit 0 for all)")
        return "\n".join(lines)
    finally:
        src.close()


def describe_task_vectors(
    base: str,
    models: list[str],
    *,
    limit: int = 40,
    unsafe_pickle: bool = False,
    quiet: bool = True,
) -> str:
    """Per-tensor ‖τ‖ and ‖τ‖/‖base‖ for each model, and cosines between task vectors τ_i = x_i − base.

    Streams one tensor at a time: each input is read once.
    """
    b = open_checkpoint(base, unsafe_pickle=unsafe_pickle)
    srcs = [open_checkpoint(m, unsafe_pickle=unsafe_pickle) for m in models]
    try:
        names = [k for k in b.keys() if b.meta(k).is_float and all(k in s.keys() for s in srcs)]
        if not names:
            raise PlanError(f"no floating-point tensor is shared by {base} and {', '.join(models)}")
        n = len(srcs)
        dots = torch.zeros(n, n, dtype=torch.float64)
        base_sq = 0.0
        rows = []
        for k in counted(names, "inspecting", quiet=quiet):
            bt = b.read(k).to(torch.float64)
            taus = []
            for s in srcs:
                t = s.read(k)
                if t.shape != bt.shape:
                    raise PlanError(
                        f"`{k}` has shape {list(t.shape)} in {s.path} but {list(bt.shape)} in {base}"
                    )
                taus.append((t.to(torch.float64) - bt).reshape(-1))
            T = torch.stack(taus)  # (n, numel)
            d = T @ T.T
            dots += d
            bn = float(bt.norm())
            base_sq += bn * bn
            rows.append((k, [float(x) for x in d.diagonal().sqrt()], bn))
        lines = [f"task vectors against {base} ({len(names)} float tensors)"]
        total = dots.diagonal().sqrt()
        for i, m in enumerate(models):
            lines.append(
                f"  {m}: ‖τ‖ = {total[i]:.6g}, ‖τ‖/‖base‖ = {total[i] / math.sqrt(base_sq) if base_sq else float('nan'):.4g}"
            )
        if n > 1:
            lines.append("  cosine(τ_i, τ_j) over the whole model:")
            for i in range(n):
                cos = [
                    dots[i, j] / (total[i] * total[j]) if total[i] * total[j] > 0 else float("nan")
                    for j in range(n)
                ]
                lines.append(
                    "    " + "  ".join(f"{float(c):+.4f}" for c in cos) + f"   {models[i]}"
                )
        rows.sort(key=lambda r: -max(r[1]))
        shown = rows if limit == 0 else rows[:limit]
        width = max((len(r[0]) for r in shown), default=6)
        header = "  ".join(f"‖τ{i}‖ (rel)".rjust(18) for i in range(n))
        lines.append(f"  {'tensor':<{width}}  {header}   (largest first)")
        for k, norms, bn in shown:
            lines.append(
                f"  {k:<{width}}  "
                + "  ".join(
                    f"{x:10.4g} ({x / bn if bn else float('nan'):.3g})".rjust(18) for x in norms
                )
            )
        if len(rows) > len(shown):
            lines.append(f"  ... {len(rows) - len(shown)} more (--limit 0 for all)")
        return "\n".join(lines)
    finally:
        b.close()
        for s in srcs:
            s.close()
