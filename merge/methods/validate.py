"""Check a method call before any tensor is read: model count, base, parameter names and values.

`call_problems(name, n_models, has_base, params, per_model_params)` returns every problem as a
message (the recipe layer prefixes the key path); `validate_call(...)` raises them together as one
UsageError. Values that can be checked without tensors (density in (0, 1], known choices) are
checked here too, so a recipe fails at validation rather than on its first tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from merge.errors import UsageError, did_you_mean
from merge.methods._checks import COMPAT_CHOICES
from merge.methods._gta import ELECT_CHOICES
from merge.methods._registry import bind_params, get_method

_CHOICES: dict[str, tuple[str, ...]] = {
    "compat": COMPAT_CHOICES,
    "elect": ELECT_CHOICES,
    "aggregate": ("sum", "ties"),
    "compute_dtype": ("float32", "float16", "bfloat16", "float64"),
}


def _values(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def call_problems(
    name: str,
    n_models: int,
    *,
    has_base: bool,
    params: Mapping[str, Any] | None = None,
    per_model_params: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """Every problem with calling method `name` on `n_models` models (+ a base if `has_base`)."""
    spec = get_method(name)
    params = dict(params or {})
    problems: list[str] = []
    lo, hi = spec.min_models, spec.max_models
    if n_models < lo or (hi is not None and n_models > hi):
        want = (
            f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        )
        problems.append(
            f"method `{name}` takes {want} model{'s' if want != 'exactly 1' else ''} besides "
            f"the base, got {n_models}; list {want} under `models:`"
        )
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
    problems += bind_params(spec, merged)
    for i, pm in enumerate([params, *per_model_params]):
        where = "" if i == 0 else f" (model {i})"
        if "density" in pm and "density" in spec.per_model:
            for d in _values(pm["density"]):
                if isinstance(d, (int, float)) and not 0.0 < float(d) <= 1.0:
                    problems.append(
                        f"method `{name}`: `density` {d}{where} is outside (0, 1]; it is the "
                        "fraction of each task vector kept (e.g. 0.5), 1 keeps everything"
                    )
        for key, choices in _CHOICES.items():
            if key in pm and key in spec.global_params and pm[key] not in choices:
                problems.append(
                    f"method `{name}`: `{key}: {pm[key]}` is not one of {', '.join(choices)}"
                    f"{did_you_mean(str(pm[key]), choices)}"
                )
    return problems


def validate_call(
    name: str,
    n_models: int,
    *,
    has_base: bool,
    params: Mapping[str, Any] | None = None,
    per_model_params: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Raise one UsageError listing every problem `call_problems` finds."""
    problems = call_problems(
        name, n_models, has_base=has_base, params=params, per_model_params=per_model_params
    )
    if problems:
        if len(problems) == 1:
            raise UsageError(problems[0])
        raise UsageError(
            f"{len(problems)} problems with method `{name}`:\n  " + "\n  ".join(problems)
        )
