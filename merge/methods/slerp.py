"""Spherical interpolation of weights: SLERP, NuSLERP and multi-model SLERP."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from merge.errors import UsageError
from merge.methods._checks import check_compat, check_count, check_finite
from merge.methods._registry import register

DOT_THRESHOLD = 0.9995  # |cos Ω| above this: the vectors are (anti)parallel, so lerp instead
_NORM_EPS = 1e-8  # below this a vector counts as zero and is not normalised


def slerp_tensors(v0: Tensor, v1: Tensor, t: float, *, compat: str = "paper") -> Tensor:
    """sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1, Ω the angle of the flattened tensors.

    Falls back to lerp (1−t)v0 + t v1 when |cos Ω| > 0.9995, and (paper) when either vector is
    zero; mergekit leaves a zero vector unnormalised and so slerps it at Ω = π/2.
    """
    n0 = torch.linalg.vector_norm(v0)
    n1 = torch.linalg.vector_norm(v1)
    zero = float(n0) <= _NORM_EPS or float(n1) <= _NORM_EPS
    if zero and compat == "paper":
        return torch.lerp(v0, v1, t)
    u0 = v0 / n0 if float(n0) > _NORM_EPS else v0
    u1 = v1 / n1 if float(n1) > _NORM_EPS else v1
    dot = float((u0.reshape(-1).double() * u1.reshape(-1).double()).sum())
    if abs(dot) > DOT_THRESHOLD:
        return torch.lerp(v0, v1, t)
    omega = math.acos(dot)
    s = math.sin(omega)
    return v0 * (math.sin((1.0 - t) * omega) / s) + v1 * (math.sin(t * omega) / s)


def _pair(
    name: str, tensors: Sequence[Tensor], base: Tensor | None, *, with_base_as_v0: bool
) -> tuple[Tensor, Tensor]:
    if base is not None and with_base_as_v0:
        check_count(name, len(tensors), at_least=1, at_most=1)
        return base, tensors[0]
    check_count(name, len(tensors), at_least=2, at_most=2)
    return tensors[0], tensors[1]


@register(
    "slerp",
    reference="Shoemake 1985 (SIGGRAPH); for weights as in mergekit",
    min_models=1,
    max_models=2,
    properties={"idempotent"},
)
def slerp(
    tensors: Sequence[Tensor], *, base: Tensor | None = None, t: float = 0.5, compat: str = "paper"
) -> Tensor:
    """slerp(v0, v1, t): v0 = base (mergekit's base_model) and v1 = the model, or two models."""
    check_compat("slerp", compat)
    check_finite("slerp", tensors, base)
    v0, v1 = _pair("slerp", tensors, base, with_base_as_v0=True)
    return slerp_tensors(v0, v1, float(t), compat=compat)


def _nuslerp_vectors(
    v0: Tensor, v1: Tensor, t: float, flatten: bool, row_wise: bool, compat: str
) -> Tensor:
    """Row- or whole-tensor slerp; lerp per vector where it is (anti)parallel or zero.

    The angle is tested through cos θ, never through sin θ: in float32 sin(acos(−1)) = −8.7e−8,
    which once passed a |sin θ| ≥ 1e−8 test and divided the result by ~1e−7. `paper` lerps where
    |cos θ| > 0.9995 (as `slerp`) or a vector is zero; `mergekit` (0.1.5) lerps only where
    1 − cos²θ ≤ 1e−16 and slerps a zero vector at θ = π/2 (it normalises by max(‖v‖, 1e−7)).
    """
    shape = v0.shape
    if flatten or v0.dim() < 2:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)  # (1, n)
    elif row_wise:  # mergekit's naming: row_wise slerps the columns
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)  # (cols, rows)
    else:
        a, b = v0, v1  # (rows, cols)
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True)  # (vectors, 1)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    if compat == "mergekit":
        cos = ((a / na.clamp(min=1e-7)) * (b / nb.clamp(min=1e-7))).sum(-1, keepdim=True)
        cos = cos.double().clamp(-1.0, 1.0)
        lerp = (1.0 - cos.square()) <= 1e-16
    else:
        dot = (a * b).sum(-1, keepdim=True).double()
        den = (na.double() * nb.double()).clamp(min=_NORM_EPS**2)
        cos = (dot / den).clamp(-1.0, 1.0)
        zero = (na <= _NORM_EPS) | (nb <= _NORM_EPS)
        lerp = zero | (cos.abs() > DOT_THRESHOLD)
    theta = torch.acos(torch.where(lerp, 0.0, cos))  # lerp rows: θ = 0, never divided by
    sin = torch.where(lerp, 1.0, torch.sin(theta))
    c0 = torch.where(lerp, 1.0 - t, torch.sin((1.0 - t) * theta) / sin).to(a.dtype)
    c1 = torch.where(lerp, t, torch.sin(t * theta) / sin).to(a.dtype)
    res = c0 * a + c1 * b
    if not (flatten or v0.dim() < 2) and row_wise:
        res = res.transpose(0, -1)
    return res.reshape(shape)


@register(
    "nuslerp",
    reference="mergekit nuslerp (Goddard et al. 2024, arXiv:2403.13257)",
    per_model={"weight": 1.0},
    min_models=2,
    max_models=2,
    properties={"idempotent"},
)
def nuslerp(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weight: Sequence[float],
    flatten: bool = True,
    row_wise: bool = False,
    compat: str = "paper",
) -> Tensor:
    """slerp at t = w₂/(w₁+w₂) of x₁, x₂ (of x_i − base, then + base, when a base is given)."""
    check_compat("nuslerp", compat)
    check_count("nuslerp", len(tensors), at_least=2, at_most=2)
    check_finite("nuslerp", tensors, base)
    total = float(weight[0]) + float(weight[1])
    t = 0.5 if abs(total) < 1e-6 else float(weight[1]) / total
    if base is None:
        return _nuslerp_vectors(tensors[0], tensors[1], t, flatten, row_wise, compat)
    d = _nuslerp_vectors(tensors[0] - base, tensors[1] - base, t, flatten, row_wise, compat)
    return d.add_(base)


@register(
    "multislerp",
    reference="mergekit multislerp (tangent-space barycentre on the sphere)",
    per_model={"weight": 1.0},
    min_models=1,
    properties={"idempotent"},
)
def multislerp(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weight: Sequence[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """(Σ w_i‖x_i‖)·exp_m̂(Σ w_i log_m̂(u_i)), one tangent step at the weighted mean direction m̂."""
    check_finite("multislerp", tensors, base)
    w = torch.tensor([float(v) for v in weight], dtype=torch.float64)
    if normalize_weights:
        if abs(float(w.sum())) < 1e-12:
            raise UsageError(
                f"method `multislerp`: weights {list(weight)} sum to zero; change a weight "
                "or set `normalize_weights: false`"
            )
        w = w / w.sum()
    shape = tensors[0].shape
    xs = torch.stack([(x - base if base is not None else x).reshape(-1) for x in tensors])
    xs = xs.double()  # (N, n); float64 keeps the near-parallel cases stable
    norms = torch.linalg.vector_norm(xs, dim=1)  # (N,)
    units = xs / (norms + eps)[:, None]
    mean = (w[:, None] * units).sum(0)
    m_norm = float(torch.linalg.vector_norm(mean))
    if m_norm < eps:
        if len(tensors) == 2:
            out = (w[:, None] * xs).sum(0)
            return _finish(out, shape, base)
        raise UsageError(
            "method `multislerp`: the weighted mean direction is zero (the inputs cancel out); "
            "change the weights"
        )
    m_hat = mean / m_norm
    tangent = (w[:, None] * (units - (units @ m_hat)[:, None] * m_hat[None, :])).sum(0)
    tau = float(torch.linalg.vector_norm(tangent)) + eps
    direction = m_hat * math.cos(tau) + tangent * (math.sin(tau) / tau)
    out = direction * float((w * norms).sum())
    return _finish(out, shape, base)


def _finish(flat: Tensor, shape: torch.Size, base: Tensor | None) -> Tensor:
    out = flat.to(torch.float32).reshape(shape)
    return out + base if base is not None else out
