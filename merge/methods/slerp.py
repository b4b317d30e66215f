"""Spherical interpolation of weights: SLERP, NuSLERP and multi-model SLERP.

Each needs only inner products of its inputs (norms, the angle, the Gram matrix), so each is a
kernel: a statistics pass sums them in float64 (`_gram`), then an elementwise pass applies
coefficients chunk by chunk. The whole-tensor functions run the same kernels (`run_whole`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from merge.errors import UsageError
from merge.methods._checks import check_compat, check_count, check_finite
from merge.methods._fused import NO_BFLOAT16, NO_FLOAT32, as_array, loops, usable
from merge.methods._gram import (
    BlockGram,
    gram_matrix,
    per_column,
    row_gram,
    span_combination,
)
from merge.methods._registry import ROWS, STATISTICS, Compat, register
from merge.methods._stream import GramPass, Kernel, OrderedSum, run_whole

DOT_THRESHOLD = 0.9995  # |cos Ω| above this: the vectors are (anti)parallel, so lerp instead
_NORM_EPS = 1e-8  # below this a vector counts as zero and is not normalised
_MK_NORM_EPS = 1e-7  # mergekit's nuslerp normalises by max(‖v‖, 1e-7)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


# ---- slerp ------------------------------------------------------------------------------------


def slerp_coefficients(
    g00: float, g11: float, g01: float, t: float, compat: str = "paper"
) -> tuple[float, float] | None:
    """(c0, c1) with slerp(v0, v1, t) = c0·v0 + c1·v1, from ‖v0‖², ‖v1‖² and v0·v1; None: lerp.

    c0 = sin((1−t)Ω)/sin Ω, c1 = sin(tΩ)/sin Ω, cos Ω = v0·v1/(‖v0‖‖v1‖). Lerp when
    |cos Ω| > 0.9995, and (paper) when either vector is zero; mergekit leaves a zero vector
    unnormalised and so slerps it at Ω = π/2.
    """
    n0, n1 = math.sqrt(max(g00, 0.0)), math.sqrt(max(g11, 0.0))
    if (n0 <= _NORM_EPS or n1 <= _NORM_EPS) and compat == "paper":
        return None
    dot = g01 / ((n0 if n0 > _NORM_EPS else 1.0) * (n1 if n1 > _NORM_EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return None
    omega = math.acos(dot)
    s = math.sin(omega)
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s


_V = TypeVar("_V")  # a tensor, or an operand's position


def _pair(
    name: str, tensors: Sequence[_V], base: _V | None, *, with_base_as_v0: bool
) -> tuple[_V, _V]:
    if base is not None and with_base_as_v0:
        check_count(name, len(tensors), at_least=1, at_most=1)
        return base, tensors[0]
    check_count(name, len(tensors), at_least=2, at_most=2)
    return tensors[0], tensors[1]


def _pair_positions(models: int, has_base: bool) -> tuple[int, int]:
    """`_pair`'s (v0, v1) as operand positions (models 0..n−1, the base n), with its checks."""
    return _pair("slerp", list(range(models)), models if has_base else None, with_base_as_v0=True)


class SlerpKernel(Kernel):
    """One pass sums ‖v0‖², ‖v1‖², v0·v1; the apply pass is c0·v0 + c1·v1 (or a lerp)."""

    reads_bfloat16 = True

    def __init__(self, shape: Sequence[int], params: Mapping[str, Any]):
        self.t = float(params.get("t", 0.5))
        self.compat = str(params.get("compat", "paper"))
        check_compat("slerp", self.compat)
        self.gram = BlockGram(2)
        self.coefs: tuple[float, float] | None = None
        self.done = False

    def needs_pass(self) -> bool:
        return not self.done

    def observe(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> None:
        self.gram.add(_pair("slerp", models, base, with_base_as_v0=True))

    def gram_pass(self, models: int, has_base: bool) -> GramPass | None:
        return GramPass(self.gram, _pair_positions(models, has_base), minus_base=False)

    def ordered_sum(self, models: int, has_base: bool) -> OrderedSum | None:
        if self.coefs is None:
            return None  # a lerp (near-parallel vectors): torch's formula
        c0, c1 = (float(np.float32(c)) for c in self.coefs)
        return OrderedSum(_pair_positions(models, has_base), (c0, c1))

    def end_pass(self) -> None:
        g00, g01, g11 = self.gram.total()[:, 0].tolist()
        self.coefs = slerp_coefficients(g00, g11, g01, self.t, self.compat)
        self.done = True

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        v0, v1 = _pair("slerp", models, base, with_base_as_v0=True)
        if self.coefs is not None and usable(v0, v1, widen=self.widen_bfloat16):
            out = torch.empty(v0.shape, dtype=torch.float32)
            self._combine(v0, v1, out.numpy(), NO_BFLOAT16)
            return out
        if self.widen_bfloat16:
            v0, v1 = v0.float(), v1.float()
        if self.coefs is None:
            return torch.lerp(v0, v1, self.t)
        c0, c1 = self.coefs
        return v0 * c0 + v1 * c1

    def apply_bfloat16(
        self, start: int, models: Sequence[Tensor], base: Tensor | None, out: Tensor
    ) -> bool | None:
        v0, v1 = _pair("slerp", models, base, with_base_as_v0=True)
        if self.coefs is None or not usable(v0, v1, widen=self.widen_bfloat16):
            return None
        return bool(self._combine(v0, v1, NO_FLOAT32, as_array(out)))

    def _combine(self, v0: Tensor, v1: Tensor, out: np.ndarray, out16: np.ndarray) -> bool:
        assert self.coefs is not None
        c0, c1 = (np.float32(c) for c in self.coefs)
        return bool(loops().combine_two(as_array(v0), as_array(v1), c0, c1, out, out16))


@register(
    "slerp",
    reference="Shoemake 1985 (SIGGRAPH); for weights as in mergekit",
    min_models=1,
    max_models=2,
    shape=STATISTICS,
    kernel=lambda shape, params, rng: SlerpKernel(shape, params),
    properties={"idempotent"},
)
def slerp(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    t: float = 0.5,
    compat: Compat = "paper",
) -> Tensor:
    """slerp(v0, v1, t): v0 = base (mergekit's base_model) and v1 = the model, or two models."""
    check_compat("slerp", compat)
    check_finite("slerp", tensors, base)
    _pair("slerp", tensors, base, with_base_as_v0=True)
    kernel = SlerpKernel(tensors[0].shape, {"t": t, "compat": compat})
    return run_whole(kernel, tensors, base)


# ---- nuslerp ----------------------------------------------------------------------------------


def nuslerp_coefficients(
    gaa: Tensor, gbb: Tensor, gab: Tensor, t: float, compat: str
) -> tuple[Tensor, Tensor]:
    """Per vector (float64) c0, c1 with nuslerp = c0·a + c1·b; lerp where (anti)parallel or zero.

    `paper`: gab is a·b, and the angle is tested through cos θ = a·b/(‖a‖‖b‖), never through
    sin θ (in float32 sin(acos(−1)) = −8.7e−8, which once passed a |sin θ| ≥ 1e−8 test and
    divided the result by ~1e−7): lerp where |cos θ| > 0.9995 (as `slerp`) or a vector is zero.
    `mergekit` (0.1.5): gab is already cos θ, the dot of the unit vectors rounded as mergekit
    rounds them (in the data's dtype; that rounding decides near ±1); lerp only where
    1 − cos²θ ≤ 1e−16, so a zero vector is slerped at θ = π/2.
    """
    if compat == "mergekit":
        cos = gab.clamp(-1.0, 1.0)
        lerp = (1.0 - cos.square()) <= 1e-16
    else:
        na, nb = gaa.clamp(min=0.0).sqrt(), gbb.clamp(min=0.0).sqrt()
        cos = (gab / (na * nb).clamp(min=_NORM_EPS**2)).clamp(-1.0, 1.0)
        lerp = (na <= _NORM_EPS) | (nb <= _NORM_EPS) | (cos.abs() > DOT_THRESHOLD)
    theta = torch.acos(torch.where(lerp, 0.0, cos))  # lerp vectors: θ = 0, never divided by
    sin = torch.where(lerp, 1.0, torch.sin(theta))
    c0 = torch.where(lerp, 1.0 - t, torch.sin((1.0 - t) * theta) / sin)
    c1 = torch.where(lerp, t, torch.sin(t * theta) / sin)
    return c0, c1


def _mk_norms(gaa: Tensor, gbb: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """mergekit's norms, in the data's dtype (its arithmetic), clamped at 1e-7."""
    return (
        gaa.clamp(min=0.0).sqrt().to(dtype).clamp(min=_MK_NORM_EPS),
        gbb.clamp(min=0.0).sqrt().to(dtype).clamp(min=_MK_NORM_EPS),
    )


class NuslerpKernel(Kernel):
    """slerp per vector: the whole tensor (`flatten`, or fewer than 2 dimensions), each row
    (last dimension; row-wise chunks, statistics inside `apply`), or each column (`row_wise`,
    mergekit's naming: vectors run down dimension 0; per-column sums in a statistics pass).
    `compat: mergekit` takes a second pass: the dot of the unit vectors after the norms, with
    norms, unit vectors, cosines and coefficients rounded to the data's dtype as mergekit's
    arithmetic rounds them (float32, or a mergekit config's compute dtype)."""

    def __init__(self, shape: Sequence[int], params: Mapping[str, Any]):
        w = [float(v) for v in params["weight"]]
        total = w[0] + w[1]
        self.t = 0.5 if abs(total) < 1e-6 else w[1] / total  # mergekit's rule
        self.compat = str(params.get("compat", "paper"))
        check_compat("nuslerp", self.compat)
        n = _numel(shape)
        if bool(params.get("flatten", True)) or len(shape) < 2:
            self.layout, self.cols = "flat", 1
        elif bool(params.get("row_wise", False)):
            self.layout, self.cols = "columns", max(n // max(int(shape[0]), 1), 1)
        else:
            self.layout, self.cols = "rows", max(int(shape[-1]), 1)
            self.row = self.cols
        self.passes = 0 if self.layout == "rows" else (2 if self.compat == "mergekit" else 1)
        self.gram = BlockGram(2, cols=self.cols)  # a·a, a·b, b·b per vector
        self.norms: tuple[Tensor, Tensor] | None = None  # mergekit, after the first pass
        self.dtype = torch.float32  # the data's, seen in the first chunk
        self.coefs: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def _vectors(models: Sequence[Tensor], base: Tensor | None) -> tuple[Tensor, Tensor]:
        check_count("nuslerp", len(models), at_least=2, at_most=2)
        if base is None:
            return models[0], models[1]
        return models[0] - base, models[1] - base

    def _spread(self, values: Tensor, start: int, like: Tensor) -> Tensor:
        """Per-vector values over the flat chunk [start, start + m) `like`, in its dtype."""
        values = values.to(like.device, like.dtype)
        return (
            values.reshape(()) if self.layout == "flat" else per_column(values, start, like.numel())
        )

    def needs_pass(self) -> bool:
        return self.passes > 0

    def observe(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> None:
        a, b = self._vectors(models, base)
        self.dtype = a.dtype
        if self.norms is None:
            self.gram.add([a, b])
        else:  # mergekit's second pass: the unit vectors' dot
            na, nb = (self._spread(v, start, a) for v in self.norms)
            products = (a / na) * (b / nb)  # rounded to the data's dtype, as mergekit's
            self.gram.add([products, torch.ones_like(products)])

    def end_pass(self) -> None:
        sums = self.gram.total()
        self.passes -= 1
        if self.compat == "mergekit":
            if self.norms is None:
                self.norms = _mk_norms(sums[0], sums[2], self.dtype)
                self.gram = BlockGram(2, cols=self.cols, pairs=[(0, 1)])  # the unit vectors' dot
                return
            cos = sums[0].to(self.dtype).double()  # mergekit's sum, in its dtype
            self.coefs = nuslerp_coefficients(cos, cos, cos, self.t, self.compat)
            return
        self.coefs = nuslerp_coefficients(sums[0], sums[2], sums[1], self.t, self.compat)

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        a, b = self._vectors(models, base)
        if self.layout == "rows":
            out = self._rows(start, a.reshape(-1, self.cols), b.reshape(-1, self.cols)).reshape(-1)
        else:
            assert self.coefs is not None
            c0, c1 = (self._spread(c, start, a) for c in self.coefs)
            out = c0 * a + c1 * b
        return out if base is None else out.add_(base)

    def _rows(self, start: int, a: Tensor, b: Tensor) -> Tensor:
        first = start // self.cols
        g = row_gram([a, b], first)  # (3, rows): a·a, a·b, b·b
        if self.compat == "mergekit":
            na, nb = _mk_norms(g[0], g[2], a.dtype)
            an, bn = a / na.to(a.device)[:, None], b / nb.to(a.device)[:, None]
            g = g.clone()
            products = an * bn  # rounded to the data's dtype, as mergekit's
            ones = torch.ones_like(products)
            g[1] = row_gram([products, ones], first, pairs=[(0, 1)])[0].to(a.dtype).double()
        c0, c1 = (
            c.to(a.device, a.dtype)[:, None]
            for c in nuslerp_coefficients(g[0], g[2], g[1], self.t, self.compat)
        )
        return c0 * a + c1 * b


def _nuslerp_shape(params: Mapping[str, Any]) -> str:
    """Per row: whole rows per chunk; whole tensor or per column: a statistics pass."""
    if not params.get("flatten", True) and not params.get("row_wise", False):
        return ROWS
    return STATISTICS


@register(
    "nuslerp",
    reference="mergekit nuslerp (Goddard et al. 2024, arXiv:2403.13257)",
    per_model={"weight": 1.0},
    min_models=2,
    max_models=2,
    shape=_nuslerp_shape,
    kernel=lambda shape, params, rng: NuslerpKernel(shape, params),
    properties={"idempotent"},
)
def nuslerp(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    weight: Sequence[float],
    flatten: bool = True,
    row_wise: bool = False,
    compat: Compat = "paper",
) -> Tensor:
    """slerp at t = w₂/(w₁+w₂) of x₁, x₂ (of x_i − base, then + base, when a base is given)."""
    check_compat("nuslerp", compat)
    check_count("nuslerp", len(tensors), at_least=2, at_most=2)
    check_finite("nuslerp", tensors, base)
    params = {"weight": weight, "flatten": flatten, "row_wise": row_wise, "compat": compat}
    return run_whole(NuslerpKernel(tensors[0].shape, params), tensors, base)


# ---- multislerp -------------------------------------------------------------------------------


def multislerp_coefficients(gram: Tensor, w: Tensor, eps: float) -> Tensor:
    """γ (float64) with multislerp = Σ γ_i x_i, from the Gram matrix G of the x_i (− base).

    Every vector of the method lies in the span of the x_i: u_i = x_i/(‖x_i‖ + ε), the mean
    Σ w_i u_i = Σ c_i x_i (c_i = w_i/(‖x_i‖ + ε)), m̂ = mean/‖mean‖ with ‖mean‖² = cᵀGc, the
    tangent Σ w_i (u_i − (u_i·m̂) m̂) = Σ τ_i x_i, u_i·m̂ = (G a)_i/(‖x_i‖ + ε) for m̂ = Σ a_i x_i;
    the result m̂ cos‖τ‖ + τ sin‖τ‖/‖τ‖, scaled by Σ w_i ‖x_i‖.
    """
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    c = w / (norms + eps)
    m_norm = math.sqrt(max(float(c @ gram @ c), 0.0))
    if m_norm < eps:
        if len(w) == 2:
            return w.clone()  # (anti)podal pair: the weighted sum, as mergekit
        raise UsageError(
            "method `multislerp`: the weighted mean direction is zero (the inputs cancel out); "
            "change the weights"
        )
    a = c / m_norm
    dots = (gram @ a) / (norms + eps)
    tau_c = c - float(w @ dots) * a
    tau = math.sqrt(max(float(tau_c @ gram @ tau_c), 0.0)) + eps
    direction = a * math.cos(tau) + tau_c * (math.sin(tau) / tau)
    return direction * float(w @ norms)


class MultislerpKernel(Kernel):
    """One pass sums the Gram matrix of x_i (− base); the apply pass is Σ γ_i x_i (+ base)."""

    def __init__(self, shape: Sequence[int], params: Mapping[str, Any]):
        weight = [float(v) for v in params["weight"]]
        w = torch.tensor(weight, dtype=torch.float64)
        if params.get("normalize_weights", True):
            if abs(float(w.sum())) < 1e-12:
                raise UsageError(
                    f"method `multislerp`: weights {weight} sum to zero; change a weight "
                    "or set `normalize_weights: false`"
                )
            w = w / w.sum()
        self.w = w
        self.eps = float(params.get("eps", 1e-8))
        self.gram = BlockGram(len(weight))
        self.coefs: list[float] | None = None

    @staticmethod
    def _vectors(models: Sequence[Tensor], base: Tensor | None) -> list[Tensor]:
        return list(models) if base is None else [x - base for x in models]

    def needs_pass(self) -> bool:
        return self.coefs is None

    def observe(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> None:
        self.gram.add(self._vectors(models, base))

    def end_pass(self) -> None:
        gram = gram_matrix(self.gram.total()[:, 0], len(self.w))
        self.coefs = multislerp_coefficients(gram, self.w, self.eps).tolist()

    def apply(self, start: int, models: Sequence[Tensor], base: Tensor | None) -> Tensor:
        assert self.coefs is not None
        out = span_combination(self._vectors(models, base), self.coefs)
        return out if base is None else out.add_(base)


@register(
    "multislerp",
    reference="mergekit multislerp (tangent-space barycentre on the sphere)",
    per_model={"weight": 1.0},
    min_models=1,
    shape=STATISTICS,
    kernel=lambda shape, params, rng: MultislerpKernel(shape, params),
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
    params = {"weight": weight, "normalize_weights": normalize_weights, "eps": eps}
    return run_whole(MultislerpKernel(tensors[0].shape, params), tensors, base)
