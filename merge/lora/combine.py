"""Combine adapters: exact by default (ranks concatenated, each adapter's weight and scale folded
into its A, so B·A = Σ w_i·s_i·B_i·A_i), or re-factorised by SVD to `--rank r` / `--energy e`
(the best rank-r approximation of that sum, Eckart–Young), with the retained energy
Σ kept σ² / Σ σ² reported per module and overall. Factor-wise mixing (peft's `linear`) is
available as an approximation and needs equal ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge.errors import PlanError, UsageError
from merge.io.detect import open_checkpoint
from merge.io.sources import TensorSource
from merge.lora.canon import place
from merge.lora.factor import Factored, concat, factor_module, factorwise_linear, truncate
from merge.lora.read import Adapter, read_adapter
from merge.lora.write import OutModule, check_output, write_adapter


@dataclass
class CombineReport:
    modules: int = 0
    rank_out: dict[str, int] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)  # retained fraction per module (SVD)
    kept: float = 0.0
    total: float = 0.0
    exact: bool = True
    output: Path | None = None
    unmatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def overall_energy(self) -> float:
        return self.kept / self.total if self.total > 0 else 1.0

    def summary(self) -> str:
        ranks = sorted(set(self.rank_out.values()))
        r = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}..{ranks[-1]}"
        if self.exact:
            return f"combined {self.modules} modules exactly ({r}: the weighted sum of the deltas) -> {self.output}"
        worst = min(self.energy.items(), key=lambda kv: kv[1]) if self.energy else ("-", 1.0)
        return (
            f"combined {self.modules} modules by SVD ({r}); retained energy {self.overall_energy:.4%} overall, "
            f"lowest {worst[1]:.4%} at {worst[0]} -> {self.output}"
        )


def default_format(adapters: Sequence[Adapter], output: Path) -> str:
    """kohya for kohya/LyCORIS inputs written to a file; diffusers for pipeline (component)
    adapters or diffusers inputs; else PEFT (a folder: `check_output` refuses a file name)."""
    comps = {m.component for a in adapters for m in a.modules.values()}
    if output.suffix == ".safetensors" and adapters[0].format in ("kohya", "lycoris"):
        return "kohya"
    if comps - {""} or adapters[0].format == "diffusers":
        return "diffusers"
    return "peft"


def combine(
    adapters: Sequence[str | Path | Adapter],
    weights: Sequence[float] | None,
    output: str | Path | None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    fmt: str | None = None,
    base: str | Path | TensorSource | None = None,
    factorwise: bool = False,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> tuple[CombineReport, dict[tuple[str, str], Factored]]:
    """Σ w_i·ΔW_i as one adapter. Returns the report and the factors (component, path) -> Factored."""
    ads = [a if isinstance(a, Adapter) else read_adapter(a) for a in adapters]
    if output is not None:
        fmt_given = fmt is not None
        fmt = fmt or default_format(ads, Path(output))
        check_output(fmt, Path(output), given=fmt_given)
    w = list(weights) if weights is not None else [1.0] * len(ads)
    if len(w) != len(ads):
        raise UsageError(
            f"--weights has {len(w)} values for {len(ads)} adapters; give one weight per adapter"
        )
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy must be in (0, 1], got {energy}")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    base_src = (
        open_checkpoint(base) if base is not None and not isinstance(base, TensorSource) else base
    )
    placed = [place(a, base_src) for a in ads]
    report = CombineReport(exact=rank is None and energy is None and not factorwise)
    for a, p in zip(ads, placed):
        report.unmatched += [f"{a.path}: {u}" for u in p.unmatched]
        report.dropped += [
            f"{a.path}: {k} (modules_to_save: a full tensor, not a LoRA factor pair)"
            for k in a.full
        ]
        if p.unresolved_kohya and (fmt or "") != "kohya":
            bad = [m.name for m in p.modules.values() if not m.dotted][:3]
            raise UsageError(
                f"{a.path}: kohya module names such as {', '.join(bad)} are not in the built-in SD1.x/SDXL tables; "
                "pass --base (the model the LoRA was trained on) to name them"
            )
    keys: list[tuple[str, str]] = []
    for p in placed:
        keys += [k for k in p.modules if k not in keys]
    result: dict[tuple[str, str], Factored] = {}
    for key in keys:
        parts: list[tuple[Factored, float, str]] = []
        shape = next((p.shapes[key] for p in placed if key in p.shapes), None)
        for a, p, wi in zip(ads, placed, w):
            mod = p.modules.get(key)
            if mod is not None:
                parts.append((factor_module(mod, a.tensor, shape), wi, a.path))
        name = f"{key[0]}/{key[1]}" if key[0] else key[1]
        if factorwise:
            f = factorwise_linear(parts, name)
        else:
            try:
                f = concat([(pf, wi) for pf, wi, _ in parts])
            except PlanError as e:
                raise PlanError(f"`{name}`: {e}") from None
        if rank is not None or energy is not None:
            f, kept, total = truncate(f, rank, energy)
            report.energy[name] = kept / total if total > 0 else 1.0
            report.kept += kept
            report.total += total
        result[key] = f
        report.rank_out[name] = f.rank
    report.modules = len(result)
    if output is not None:
        out = Path(output)
        fmt = fmt or default_format(ads, out)
        mods: list[OutModule] = [f.to_out(c, p) for (c, p), f in result.items()]
        report.output = write_adapter(fmt, out, mods, dtype=dtype, force=force)
    return report, result
