"""Modules as factor pairs `M = B·A` (scale folded into A), exact concatenation, and SVD truncation.

A module's delta in "product space" is the 2-D matrix `M = s·B·A` (`[out, in·kh·kw]`); the weight
delta is `M` reshaped to the weight (conv), or `Mᵀ` for embeddings and `fan_in_fan_out`
layers. LoRA modules give their factors exactly; LyCORIS kinds are materialised and split by
an exact (numerical-rank) SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from merge.errors import PlanError
from merge.lora.modules import Getter, LoraModule, module_delta
from merge.lora.write import OutModule


@dataclass
class Factored:
    B: Tensor  # [out, r]
    A: Tensor  # [r, n]; M = B @ A, scale included
    # the weight delta's shape (conv: [out, in, kh, kw]; embedding: [num, dim])
    shape: tuple[int, ...]
    transposed: bool = False  # ΔW = Mᵀ (embedding, fan_in_fan_out)
    embedding: bool = False
    from_lora: bool = True
    scale: float = 1.0  # the adapter's own scale, folded into A (factor-wise mixing undoes it)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> Tensor:
        m = self.B @ self.A
        return (m.T if self.transposed else m).reshape(self.shape)

    def to_out(self, component: str, path: str) -> OutModule:
        """Factors for a writer with alpha = rank (scale 1)."""
        r = self.rank
        if self.embedding:
            return OutModule(
                component, path, self.A.contiguous(), self.B.contiguous(), float(r), embedding=True
            )
        if self.transposed:  # fan_in_fan_out
            return OutModule(
                component,
                path,
                self.A.contiguous(),
                self.B.contiguous(),
                float(r),
                fan_in_fan_out=True,
            )
        if len(self.shape) == 4:
            out, cin, kh, kw = self.shape
            # B [out, r, 1, 1] (1x1 conv), A [r, in, kh, kw] (the base's kernel)
            return OutModule(
                component,
                path,
                self.A.reshape(r, cin, kh, kw).contiguous(),
                self.B.reshape(out, r, 1, 1).contiguous(),
                float(r),
            )
        return OutModule(component, path, self.A.contiguous(), self.B.contiguous(), float(r))


def exact_rank_split(m: Tensor, rel_tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """B, A with B@A = m up to float32 rounding, at m's numerical rank (σ > rel_tol·σ_max)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = max(1, int((s > rel_tol * (s[0] if s.numel() else 0)).sum()))
    return u[:, :k] * s[:k], vh[:k]


def factor_module(
    mod: LoraModule, get: Getter, base_shape: tuple[int, ...] | None = None
) -> Factored:
    """The module as `M = B·A` with its scale folded into A."""
    if mod.is_dora:
        raise PlanError(
            f"`{mod.name}` is a DoRA module: DoRA is not a delta (its magnitude renormalises W + ΔW), so it "
            "cannot be combined, extracted or truncated in factor space; bake it into the base instead "
            "(`merge lora bake`)"
        )
    if mod.kind == "embedding":
        a, b = get(mod.keys["A"]).float(), get(mod.keys["B"]).float()
        return Factored(
            b,
            a * mod.scale,
            (a.shape[1], b.shape[0]),
            transposed=True,
            embedding=True,
            scale=mod.scale,
        )
    if mod.kind == "lora":
        a, b = get(mod.keys["A"]).float(), get(mod.keys["B"]).float()
        r = a.shape[0]
        b2, a2 = b.reshape(b.shape[0], r), a.reshape(r, -1) * mod.scale
        shape = (b.shape[0], *a.shape[1:])
        if mod.fan_in_fan_out:
            return Factored(b2, a2, (shape[1], shape[0]), transposed=True, scale=mod.scale)
        if base_shape is not None and len(base_shape) != len(shape):
            shape = base_shape  # e.g. a 4-D 1x1 LoRA on a Linear proj_in (SD2/SDXL)
        return Factored(b2, a2, shape, scale=mod.scale)
    d = module_delta(mod, get)
    if base_shape is not None:
        d = d.reshape(base_shape)
    bb, aa = exact_rank_split(d.reshape(d.shape[0], -1))
    return Factored(bb, aa, tuple(d.shape), from_lora=False)


def concat(parts: list[tuple[Factored, float]]) -> Factored:
    """Σ w_i M_i exactly: B = [B_1 … B_n], A = [w_1 A_1; …; w_n A_n] (ranks add)."""
    first = parts[0][0]
    for f, _ in parts[1:]:
        if f.shape != first.shape or f.transposed != first.transposed:
            raise PlanError(
                f"cannot combine deltas of shapes {list(first.shape)} and {list(f.shape)} for one module"
            )
    b = torch.cat([f.B for f, _ in parts], dim=1)
    a = torch.cat([w * f.A for f, w in parts], dim=0)
    return Factored(
        b, a, first.shape, first.transposed, first.embedding, all(f.from_lora for f, _ in parts)
    )


def svd_of_product(f: Factored) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) of M = B·A through QR of the thin factors: exact, and cheap when r ≪ out, n."""
    qb, rb = torch.linalg.qr(f.B)  # [out, r], [r, r]
    qa, ra = torch.linalg.qr(f.A.T)  # [n, r], [r, r]
    uc, s, vhc = torch.linalg.svd(rb @ ra.T)
    return qb @ uc, s, vhc @ qa.T


def choose_rank(s: Tensor, rank: int | None, energy: float | None) -> int:
    """Fixed rank (capped by the spectrum) or the smallest k with Σ_{i<k} σ² ≥ energy · Σ σ²."""
    n = int(s.numel())
    if energy is not None:
        e = s.double() ** 2
        total = float(e.sum())
        if total == 0:
            return 1
        cum = torch.cumsum(e, 0) / total
        k = int((cum < energy - 1e-12).sum()) + 1
        return max(1, min(k, n, rank or n))
    return max(1, min(rank or n, n))


def truncate(f: Factored, rank: int | None, energy: float | None) -> tuple[Factored, float, float]:
    """Best rank-k approximation of M (Eckart–Young); returns (factors, kept Σσ², total Σσ²)."""
    u, s, vh = svd_of_product(f)
    k = choose_rank(s, rank, energy)
    kept, total = float((s[:k].double() ** 2).sum()), float((s.double() ** 2).sum())
    root = s[:k].sqrt()
    out = Factored(
        u[:, :k] * root, root[:, None] * vh[:k], f.shape, f.transposed, f.embedding, False
    )
    return out, kept, total


def factorwise_linear(parts: list[tuple[Factored, float, str]], module: str) -> Factored:
    """peft's `linear` combination (approximate: cross terms B_i·A_j): equal ranks required.

    On the raw factors, with w'_i = w_i·s_i: A = Σ sign(w'_i)·sqrt|w'_i|·A_i,
    B = Σ sqrt|w'_i|·B_i, scale 1. Exact only for a single adapter.
    """
    ranks = {f.rank for f, _, _ in parts}
    if len(ranks) > 1:
        detail = ", ".join(f"{n} has rank {f.rank}" for f, _, n in parts)
        raise PlanError(
            f"mismatched ranks in a factor-space operation at `{module}`: {detail}; factor-wise mixing needs "
            "equal ranks. Use the default exact combine (ranks concatenate) or --rank/--energy (SVD)"
        )
    not_lora = [n for f, _, n in parts if not f.from_lora]
    if not_lora:
        raise PlanError(
            f"`{module}` of {', '.join(not_lora)} is not a LoRA factor pair (LoHa, LoKr, Tucker or full); "
            "factor-wise mixing needs LoRA factors: use the default exact combine"
        )
    first = parts[0][0]
    a = torch.zeros_like(first.A)
    b = torch.zeros_like(first.B)
    for f, w, _ in parts:
        wp = w * f.scale
        raw_a = f.A / f.scale if f.scale != 0 else f.A
        a += (1.0 if wp >= 0 else -1.0) * abs(wp) ** 0.5 * raw_a
        b += abs(wp) ** 0.5 * f.B
    return Factored(b, a, first.shape, first.transposed, first.embedding, False)
