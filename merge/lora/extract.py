"""Extract a LoRA from a fine-tune: per module, the truncated SVD of ΔW = W_tuned − W_base.

Fixed rank (capped by the matrix) or an energy threshold (smallest k with Σ kept σ² ≥ e·Σ σ²).
For a fixed rank on a matrix much larger than the rank, a randomized SVD (range finder with
q = rank + 10 columns and power iterations until one more gains less than 0.01% of ‖ΔW‖², at
most 8, else the full SVD); its reported energy is exact for the factors it returns (they are an
orthogonal projection of ΔW). Output: `--to`, else from the base: a PEFT adapter folder for a
model folder (with `rank_pattern` when ranks differ), a kohya file for a single-file SD checkpoint,
a diffusers LoRA for a pipeline; an `-o` that the format cannot be (a PEFT adapter named
`x.safetensors`, a kohya folder) is refused before any SVD. GPT-2-style `Conv1D` projections
(weights stored `[in, out]`) are written with `fan_in_fan_out: true`, as peft expects.
1-D deltas: biases of adapted modules are dropped and listed; other changed modules (norms)
go to `modules_to_save` in a PEFT adapter, else they are listed as dropped. Embeddings use
peft's embedding LoRA (PEFT and diffusers); kohya files have none, so there they are dropped
and listed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from merge.errors import PlanError, UsageError
from merge.io.detect import open_checkpoint
from merge.io.sources import TensorSource
from merge.lora.factor import Factored, choose_rank
from merge.lora.names import BaseIndex
from merge.lora.write import OutModule, check_output, write_adapter

EMBEDDING = re.compile(
    r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_embedding|position_embedding|embed_positions|shared|tok_embeddings)$"
)
# transformers models whose projections are `Conv1D` (weight stored [in, out], so ΔW = (B·A)ᵀ and
# peft needs fan_in_fan_out): model_type -> module leaf names (transformers 5: gpt2, openai,
# imagegpt, decision_transformer modeling files)
CONV1D_MODULES = {
    t: ("c_attn", "q_attn", "c_proj", "c_fc")
    for t in ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
}
OVERSAMPLE = 10  # extra columns for the randomized range finder
POWER_ITERS = 2  # for --svd randomized
MAX_POWER_ITERS = 8  # for --svd auto, before falling back to the full SVD
RANDOMIZED_TOL = 1e-4  # converged: one more power iteration gains < 0.01% of ‖ΔW‖²


@dataclass
class ExtractReport:
    modules: dict[str, tuple[int, float]] = field(
        default_factory=dict
    )  # name -> (rank, retained energy)
    kept: float = 0.0
    total: float = 0.0
    dropped: list[str] = field(default_factory=list)
    saved_full: list[str] = field(default_factory=list)
    randomized: int = 0
    output: Path | None = None

    @property
    def overall_energy(self) -> float:
        return self.kept / self.total if self.total > 0 else 1.0

    def summary(self) -> str:
        ranks = sorted({r for r, _ in self.modules.values()})
        worst = (
            min(self.modules.items(), key=lambda kv: kv[1][1]) if self.modules else ("-", (0, 1.0))
        )
        lines = [
            f"extracted {len(self.modules)} modules (ranks {ranks[0] if ranks else 0}..{ranks[-1] if ranks else 0}, "
            f"{self.randomized} by randomized SVD); retained energy {self.overall_energy:.4%} overall, "
            f"lowest {worst[1][1]:.4%} at {worst[0]} -> {self.output}"
        ]
        if self.saved_full:
            lines.append(
                f"modules_to_save: {', '.join(self.saved_full[:8])}"
                + (" ..." if len(self.saved_full) > 8 else "")
            )
        if self.dropped:
            lines.append(
                f"dropped (not representable): {', '.join(self.dropped[:8])}"
                + (" ..." if len(self.dropped) > 8 else "")
            )
        return "\n".join(lines)


def randomized_svd(
    m: Tensor, k: int, *, power_iters: int, tol: float | None, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, int] | None:
    """Top-k SVD of m by a randomized range finder (Halko et al.) with q = k + OVERSAMPLE columns.

    Power iterations run until one more gains less than `tol`·‖m‖² of kept energy (at most
    `power_iters`); None if that never happens (the caller then uses the full SVD). With
    `tol=None`, exactly `power_iters` iterations. Returns (U_k, S_k, Vh_k, iterations).
    Deterministic: the test matrix comes from a generator seeded with `seed`.
    """
    q = min(k + OVERSAMPLE, *m.shape)
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(m.shape[1], q, generator=g, dtype=m.dtype)
    basis, _ = torch.linalg.qr(m @ omega)  # [out, q], orthonormal
    total = float(m.double().pow(2).sum())
    prev: float | None = None
    for it in range(power_iters + 1):
        ub, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)  # [q, n] = U S Vh
        kept = float(s[:k].double().pow(2).sum())
        done = it == power_iters if tol is None else prev is not None and kept - prev <= tol * total
        if done:
            return basis @ ub[:, :k], s[:k], vh[:k], it
        prev = kept
        z, _ = torch.linalg.qr(m.T @ basis)  # one power iteration: (m mᵀ) on the basis
        basis, _ = torch.linalg.qr(m @ z)
    return None


def low_rank(
    m: Tensor, rank: int | None, energy: float | None, method: str = "auto"
) -> tuple[Tensor, Tensor, float, float, bool]:
    """(B, A, kept Σσ², total Σσ², randomized?) with B@A the truncated SVD of m.

    `auto`: for a fixed rank on a matrix whose smaller side is ≥ 4·(rank + 10), the randomized
    SVD, run until an extra power iteration gains less than RANDOMIZED_TOL of ‖m‖² (at most
    MAX_POWER_ITERS), else the full SVD. `randomized`: POWER_ITERS iterations, no check.
    """
    total = float(m.double().pow(2).sum())
    small = min(m.shape)
    k = min(rank or small, small)
    if method == "randomized" or (
        method == "auto"
        and energy is None
        and rank is not None
        and small >= 4 * (rank + OVERSAMPLE)
    ):
        if method == "randomized":
            res = randomized_svd(m, k, power_iters=POWER_ITERS, tol=None)
        else:
            res = randomized_svd(m, k, power_iters=MAX_POWER_ITERS, tol=RANDOMIZED_TOL)
        if res is not None:
            u, s, vh, _ = res
            return u * s, vh, float(s.double().pow(2).sum()), total, True
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = choose_rank(s, rank, energy)
    kept = float(s[:k].double().pow(2).sum())
    return u[:, :k] * s[:k], vh[:k], kept, total, False


def extract(
    base: str | Path | TensorSource,
    tuned: str | Path | TensorSource,
    output: str | Path | None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    fmt: str | None = None,
    svd: str = "auto",
    min_diff: float = 0.0,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> tuple[ExtractReport, dict[tuple[str, str], Factored]]:
    """A LoRA whose delta approximates tuned − base; returns the report and the factors."""
    given = fmt is not None
    if (rank is None) == (energy is None):
        raise UsageError("give exactly one of --rank and --energy")
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy must be in (0, 1], got {energy}")
    if svd not in ("auto", "full", "randomized"):
        raise UsageError(f"--svd must be auto, full or randomized, not `{svd}`")
    b = base if isinstance(base, TensorSource) else open_checkpoint(base)
    t = tuned if isinstance(tuned, TensorSource) else open_checkpoint(tuned)
    tkeys = set(t.keys())
    common = [k for k in b.keys() if k in tkeys]
    if not common:
        raise PlanError(
            f"{t.path} and {b.path} share no tensor names; extract needs the fine-tune of this base"
        )
    index = BaseIndex(b.keys())
    out = Path(output) if output is not None else None
    fmt = fmt or {"ldm": "kohya", "pipeline": "diffusers"}.get(index.layout, "peft")
    if out is not None:
        check_output(fmt, out, given=given)
    conv1d = conv1d_modules(b)
    report = ExtractReport()
    result: dict[tuple[str, str], Factored] = {}
    changed_1d: list[str] = []
    shape_problems = []
    for k in common:
        mb, mt = b.meta(k), t.meta(k)
        if not (mb.is_float and mt.is_float):
            continue
        if mb.shape != mt.shape:
            shape_problems.append(f"`{k}`: base {list(mb.shape)}, tuned {list(mt.shape)}")
            continue
        d = t.read(k).float() - b.read(k).float()
        if float(d.abs().max()) <= min_diff if d.numel() else True:
            continue
        module, _, param = k.rpartition(".")
        if param != "weight" or d.dim() not in (2, 4):
            changed_1d.append(k)
            continue
        emb = bool(EMBEDDING.search(module))
        if emb and fmt == "kohya":
            report.dropped.append(f"{k} (kohya files have no embedding LoRA; --to peft keeps it)")
            continue
        # product space [out, in]: embedding ΔWᵀ [dim, num], Conv1D ΔWᵀ (stored [in, out])
        fifo = not emb and d.dim() == 2 and module in conv1d
        m = d.T if emb or fifo else d.reshape(d.shape[0], -1)
        bb, aa, kept, total, rand = low_rank(m.contiguous(), rank, energy, svd)
        f = Factored(bb, aa, tuple(d.shape), transposed=emb or fifo, embedding=emb, from_lora=False)
        name = index.name_of(module)
        result[name] = f
        label = f"{name[0]}/{name[1]}" if name[0] else name[1]
        report.modules[label] = (f.rank, kept / total if total > 0 else 1.0)
        report.kept += kept
        report.total += total
        report.randomized += int(rand)
    if shape_problems:
        raise PlanError(
            f"{t.path} does not have the base's shapes ({len(shape_problems)}):\n  "
            + "\n  ".join(shape_problems[:20])
        )
    adapted = {m for (_, m) in result}
    full: dict[str, Tensor] = {}
    save_modules: list[str] = []
    for k in changed_1d:
        module = k.rpartition(".")[0]
        if module in adapted or fmt != "peft" or index.name_of(module)[0]:
            report.dropped.append(k)
            continue
        if module not in save_modules:
            save_modules.append(module)
    for module in save_modules:
        for k in b.keys():
            if k.rpartition(".")[0] == module and k in tkeys:
                full[k] = t.read(k)
        report.saved_full.append(module)
    if out is not None:
        mods: list[OutModule] = [f.to_out(c, p) for (c, p), f in result.items()]
        base_name = str(Path(b.path).resolve()) if Path(b.path).exists() else b.path
        kw: dict[str, object] = {"dtype": dtype, "force": force}
        if fmt == "peft":
            kw |= {"full": full, "modules_to_save": save_modules, "base_name": base_name}
        report.output = write_adapter(fmt, out, mods, **kw)
    return report, result


def conv1d_modules(base: TensorSource) -> set[str]:
    """Module names of `base` that are transformers `Conv1D` (GPT-2 family, from config.json)."""
    root = base.root()
    cfg_path = root / "config.json" if root is not None and root.is_dir() else None
    if cfg_path is None or not cfg_path.is_file():
        return set()
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        return set()
    leaves = CONV1D_MODULES.get(str(model_type), ())
    modules = {k.rpartition(".")[0] for k in base.keys() if k.endswith(".weight")}
    return {m for m in modules if m.rpartition(".")[2] in leaves}
