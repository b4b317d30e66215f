"""Registry of merge methods: each one a typed pure function whose signature is its schema.

Convention for a method function:

    fn(tensors: Sequence[Tensor], *, base: Tensor [= None], <per-model params>: Sequence[float],
       <global params>: float | int | bool | str = default, generator: ... | None = None)
       -> Tensor

- `tensors` are the (non-base) inputs, already float32 on the compute device, all of one shape.
- `base` is required when the signature gives it no default (`needs_base`).
- per-model parameters are named in `register(per_model={name: default})` (default `None` means
  required); the planner broadcasts them to one value per input before the call.
- parameter domains are declared once, in the signature: `Annotated[float, Interval(0, 1)]`
  (for a per-model parameter, each model's value), `Literal["sum", "count"]` for choices. The
  one binder (`bind_call`) checks every call against them, wherever the call was written.
- a method that takes `generator` is random; the engine gives it an `ElementRandom` keyed by
  (seed, tensor name, call identity), so draws are indexed by element.
- `shape` says how the engine may evaluate it (see `SHAPES`); `kernel` builds the chunked
  evaluator for the streaming shapes; `affine` folds a weighted sum into coefficients.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from torch import Tensor

from merge.dtypes import DtypeName
from merge.errors import UsageError, did_you_mean

MethodFn = Callable[..., Tensor]

# Execution shapes, from the most to the least streamable.
ELEMENTWISE = "elementwise"  # out[i] depends on inputs[i] only (random draws indexed by i)
STATISTICS = "statistics"  # per-tensor statistics passes (thresholds, norms), then elementwise
ROWS = "rows"  # each row (last dimension) on its own
MATRIX = "matrix"  # needs the whole tensor at once (SVD, solves)
MODEL = "model"  # model-wide statistics: a first pass over every tensor of each model
SHAPES = (ELEMENTWISE, STATISTICS, ROWS, MATRIX, MODEL)


@dataclass(frozen=True)
class Interval:
    """A numeric domain: lo ≤ v ≤ hi (strict where `lo_open` / `hi_open`); None is unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""

    def contains(self, v: float) -> bool:
        if math.isnan(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


DENSITY = Interval(
    0.0,
    1.0,
    lo_open=True,
    hint="the fraction of each task vector kept (e.g. 0.5), 1 keeps everything",
)
FRACTION = Interval(0.0, 1.0)
NON_NEGATIVE = Interval(0.0, None)
POSITIVE = Interval(0.0, None, lo_open=True)

# Parameter types with their domains, for method signatures.
Density = Annotated[float, DENSITY]
Fraction = Annotated[float, FRACTION]
NonNegative = Annotated[float, NON_NEGATIVE]
Compat = Literal["paper", "mergekit"]
# A mergekit config's `dtype`: methods under `compat: mergekit` round their task vectors to it.
ComputeDtype = DtypeName
Elect = Literal["sum", "count"]


@dataclass(frozen=True)
class Domain:
    """What a parameter accepts: an interval for numbers, or a set of choices."""

    kind: str  # "number", "bool", "choice", "any"
    interval: Interval | None = None
    choices: tuple[Any, ...] = ()

    def problem(self, value: Any) -> str | None:
        """None when `value` (one value, not a gradient list) is in the domain, else why not."""
        if self.kind == "choice":
            if value not in self.choices:
                return (
                    f"is not one of {', '.join(str(c) for c in self.choices)}"
                    f"{did_you_mean(str(value), [str(c) for c in self.choices])}"
                )
            return None
        if self.kind == "bool":
            return None if isinstance(value, bool) else "is not true or false"
        if self.kind == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return "is not a number"
            if self.interval is not None and not self.interval.contains(float(value)):
                hint = f"; it is {self.interval.hint}" if self.interval.hint else ""
                return f"is outside {self.interval}{hint}"
        return None


def _domain_of(annotation: Any) -> Domain:
    """Read a Domain from a resolved annotation (Annotated / Literal / bool / numbers)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *extras = typing.get_args(annotation)
        interval = next((e for e in extras if isinstance(e, Interval)), None)
        d = _domain_of(inner)
        return Domain("number", interval) if interval is not None else d
    if origin is typing.Literal:
        return Domain("choice", choices=typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _domain_of(args[0])
    if origin is not None and origin in (Sequence, list, tuple):
        items = typing.get_args(annotation)
        return _domain_of(items[0]) if items else Domain("any")
    if annotation is bool:
        return Domain("bool")
    if annotation in (int, float):
        return Domain("number")
    return Domain("any")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MethodFn
    signature: inspect.Signature
    needs_base: bool
    accepts_base: bool
    per_model: Mapping[str, float | None]
    reference: str
    summary: str
    min_models: int = 1
    max_models: int | None = None
    shape: str | Callable[[Mapping[str, Any]], str] = MATRIX
    kernel: Callable[..., Any] | None = None
    affine: Callable[..., tuple[list[float], float]] | None = None
    random: bool = False
    properties: frozenset[str] = field(default_factory=frozenset)
    domains: Mapping[str, Domain] = field(default_factory=dict)

    @property
    def elementwise(self) -> bool:
        return self.shape == ELEMENTWISE

    def shape_for(self, params: Mapping[str, Any]) -> str:
        """The execution shape of a call with these (resolved) parameters."""
        return self.shape(params) if callable(self.shape) else self.shape

    @property
    def global_params(self) -> dict[str, inspect.Parameter]:
        """Keyword parameters a recipe may set for the whole call (not per model)."""
        skip = {"tensors", "base", "generator", "tensor_name", *self.per_model}
        return {
            n: p
            for n, p in self.signature.parameters.items()
            if n not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }

    def describe_params(self) -> list[str]:
        out = []
        for n, d in self.per_model.items():
            out.append(f"{n} (per model{', required' if d is None else f', default {d}'})")
        for n, p in self.global_params.items():
            out.append(n if p.default is p.empty else f"{n}={p.default!r}")
        return out


_METHODS: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    reference: str,
    per_model: Mapping[str, float | None] | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    shape: str | Callable[[Mapping[str, Any]], str] = MATRIX,
    kernel: Callable[..., Any] | None = None,
    affine: Callable[..., tuple[list[float], float]] | None = None,
    elementwise: bool = False,
    properties: Iterable[str] = (),
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` as merge method `name`; its docstring's first line is the summary.

    `elementwise=True` is short for `shape=ELEMENTWISE`.
    """

    def wrap(fn: MethodFn) -> MethodFn:
        if name in _METHODS:
            raise ValueError(
                f"merge method `{name}` is already registered by {_METHODS[name].fn.__module__}"
            )
        sig = inspect.signature(fn)
        base = sig.parameters.get("base")
        pm = dict(per_model or {})
        for p in pm:
            if p not in sig.parameters:
                raise ValueError(
                    f"method `{name}`: per-model parameter `{p}` is not in its signature"
                )
        the_shape = ELEMENTWISE if elementwise else shape
        if not callable(the_shape) and the_shape not in SHAPES:
            raise ValueError(f"method `{name}`: shape `{the_shape}` is not one of {SHAPES}")
        hints = typing.get_type_hints(fn, include_extras=True)
        domains = {
            n: _domain_of(hints[n])
            for n in sig.parameters
            if n in hints and n not in ("tensors", "base", "generator", "tensor_name")
        }
        _METHODS[name] = MethodSpec(
            name=name,
            fn=fn,
            signature=sig,
            needs_base=base is not None and base.default is inspect.Parameter.empty,
            accepts_base=base is not None,
            per_model=pm,
            reference=reference,
            summary=(inspect.getdoc(fn) or "").splitlines()[0] if fn.__doc__ else "",
            min_models=min_models,
            max_models=max_models,
            shape=the_shape,
            kernel=kernel,
            affine=affine,
            random="generator" in sig.parameters,
            properties=frozenset(properties),
            domains=domains,
        )
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    if name in _METHODS:
        return _METHODS[name]
    raise UsageError(
        f"unknown merge method `{name}`{did_you_mean(name, _METHODS)}; "
        f"run `merge methods` to list them (available: {', '.join(sorted(_METHODS))})"
    )


def list_methods() -> list[MethodSpec]:
    return [_METHODS[n] for n in sorted(_METHODS)]


def _values(v: Any) -> list[Any]:
    """A parameter's values: a list or tuple is a layer gradient (each anchor is checked)."""
    return list(v) if isinstance(v, (list, tuple)) else [v]


def value_problems(spec: MethodSpec, key: str, value: Any, where: str = "") -> list[str]:
    """Problems with one parameter value (or each anchor of a gradient) against its domain."""
    domain = spec.domains.get(key)
    if domain is None:
        return []
    out = []
    for v in _values(value):
        why = domain.problem(v)
        if why is not None:
            shown = f"`{key}: {v}`" if domain.kind == "choice" else f"`{key}` {v}{where}"
            out.append(f"method `{spec.name}`: {shown} {why}")
    return out


def bind_call(
    spec: MethodSpec,
    *,
    n_models: int | None,
    has_base: bool | None,
    params: Mapping[str, Any] | None = None,
    per_model_params: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """Every problem binding a call of `spec`: model count, base, names, required, domains.

    The one binder: recipe steps, expression calls, overrides (`n_models`/`has_base` None:
    only names and values), gradients (each anchor) and mergekit imports all go through it.
    """
    params = dict(params or {})
    problems: list[str] = []
    name = spec.name
    if n_models is not None:
        lo, hi = spec.min_models, spec.max_models
        if n_models < lo or (hi is not None and n_models > hi):
            want = (
                f"exactly {lo}"
                if lo == hi
                else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            )
            problems.append(
                f"method `{name}` takes {want} model{'s' if want != 'exactly 1' else ''} besides "
                f"the base, got {n_models}; list {want} under `models:`"
            )
    if has_base is not None:
        if spec.needs_base and not has_base:
            problems.append(
                f"method `{name}` needs a base model (task vectors are x − base); "
                "add `base: <input name>` to the step"
            )
        if has_base and not spec.accepts_base:
            problems.append(
                f"method `{name}` takes no base model; remove `base:` or list the model under `models:`"
            )
    merged = dict(params)
    for pm in per_model_params:
        for k in pm:
            merged.setdefault(k, pm[k])
    valid = {**spec.global_params, **dict.fromkeys(spec.per_model)}
    for key in merged:
        if key not in valid:
            problems.append(
                f"unknown parameter `{key}` for method `{name}`{did_you_mean(key, valid)}; "
                f"it takes: {', '.join(spec.describe_params()) or 'no parameters'}"
            )
    if n_models is not None:
        for n, p in spec.global_params.items():
            if p.default is p.empty and n not in params:
                problems.append(f"method `{name}` needs parameter `{n}`")
    for i, pm in enumerate([params, *per_model_params]):
        where = "" if i == 0 else f" (model {i})"
        for key, value in pm.items():
            if key in valid:
                problems += value_problems(spec, key, value, where)
    if spec.shape_for(params) == MODEL:
        for pm in [params, *per_model_params]:
            for key, value in pm.items():
                if key in spec.per_model and isinstance(value, (list, tuple)):
                    problems.append(
                        f"method `{name}`: a model-wide call (`scope: model`) takes one `{key}` "
                        f"per model for the whole model, but {value!r} is a layer gradient; "
                        "give one value, or use `scope: tensor`"
                    )
    return list(dict.fromkeys(problems))  # once each, in order


def _well_formed(value: Any) -> bool:
    """A finite number, text, true/false, or a non-empty list of finite numbers."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if isinstance(value, (list, tuple)):
        return bool(value) and all(number(v) for v in value)
    return isinstance(value, (str, bool)) or number(value)


def override_problems(
    spec: MethodSpec, values: Mapping[str, Any], call_params: Mapping[str, Any], glob: str | None
) -> list[tuple[str, str]]:
    """(key, problem) for an override's values on a call of `spec`: each value against its
    domain, and per-tensor values of a model-wide call (its statistics span every tensor)."""
    out: list[tuple[str, str]] = []
    valid = {**spec.global_params, **dict.fromkeys(spec.per_model)}
    for key, value in values.items():
        if key not in valid or not _well_formed(value):
            continue  # a value of the wrong structure is the recipe layer's to report
        out += [(key, m) for m in value_problems(spec, key, value)]
    merged = {**call_params, **{k: v for k, v in values.items() if k in spec.global_params}}
    if spec.shape_for(merged) == MODEL and glob != "*":
        for key in values:
            if key in spec.per_model:
                out.append(
                    (
                        key,
                        f"method `{spec.name}` runs model-wide here (`scope: model`: one "
                        f"threshold per model over all its tensors), so `{key}` cannot change "
                        "per tensor; set it on the step, or use `scope: tensor`",
                    )
                )
    return out


def bind_params(spec: MethodSpec, params: Mapping[str, Any]) -> list[str]:
    """Problems with `params` for `spec` (unknown or missing names, values); empty when they bind."""
    problems = bind_call(spec, n_models=None, has_base=None, params=params)
    for n, p in spec.global_params.items():
        if p.default is p.empty and n not in params:
            problems.append(f"method `{spec.name}` needs parameter `{n}`")
    return problems
