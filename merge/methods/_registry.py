"""Registry of merge methods: each one a typed pure function whose signature is its schema.

Convention for a method function:

    fn(tensors: Sequence[Tensor], *, base: Tensor [= None], <per-model params>: Sequence[float],
       <global params>: float | int | bool | str = default, generator: torch.Generator | None = None)
       -> Tensor

- `tensors` are the (non-base) inputs, already float32 on the compute device, all of one shape.
- `base` is required when the signature gives it no default (`needs_base`).
- per-model parameters are named in `register(per_model={name: default})` (default `None` means
  required); the planner broadcasts them to one value per input before the call.
- a method that takes `generator` is random; it gets a generator seeded from (seed, tensor name),
  so results do not depend on order or threads.
- `elementwise=True` means output[i] depends on inputs[i] only, so large tensors may be chunked.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from merge.errors import UsageError, did_you_mean

MethodFn = Callable[..., Tensor]


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
    elementwise: bool = False
    random: bool = False
    properties: frozenset[str] = field(default_factory=frozenset)

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
    elementwise: bool = False,
    properties: Iterable[str] = (),
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` as merge method `name`; its docstring's first line is the summary."""

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
            elementwise=elementwise,
            random="generator" in sig.parameters,
            properties=frozenset(properties),
        )
        return fn

    return wrap


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in method module.
    import merge.methods  # noqa: F401


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    if name in _METHODS:
        return _METHODS[name]
    raise UsageError(
        f"unknown merge method `{name}`{did_you_mean(name, _METHODS)}; "
        f"run `merge methods` to list them (available: {', '.join(sorted(_METHODS))})"
    )


def list_methods() -> list[MethodSpec]:
    _load_builtin_methods()
    return [_METHODS[n] for n in sorted(_METHODS)]


def bind_params(spec: MethodSpec, params: Mapping[str, Any]) -> list[str]:
    """Problems with `params` for `spec` (unknown or missing names); empty when they bind."""
    problems = []
    valid = {**spec.global_params, **dict.fromkeys(spec.per_model)}
    for key in params:
        if key not in valid:
            problems.append(
                f"unknown parameter `{key}` for method `{spec.name}`{did_you_mean(key, valid)}; "
                f"it takes: {', '.join(spec.describe_params()) or 'no parameters'}"
            )
    for n, p in spec.global_params.items():
        if p.default is p.empty and n not in params:
            problems.append(f"method `{spec.name}` needs parameter `{n}`")
    return problems
