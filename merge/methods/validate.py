"""Check a method call before any tensor is read: model count, base, parameter names and values.

The checks themselves live in the registration (the signature's domains) and the one binder,
`merge.methods._registry.bind_call`; this module keeps the call-site names the recipe layer
uses. `call_problems(...)` returns every problem as a message (the recipe layer prefixes the key
path); `validate_call(...)` raises them together as one UsageError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from merge.errors import UsageError
from merge.methods._registry import bind_call, get_method


def call_problems(
    name: str,
    n_models: int | None,
    *,
    has_base: bool | None,
    params: Mapping[str, Any] | None = None,
    per_model_params: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """Every problem with calling method `name` on `n_models` models (+ a base if `has_base`).

    `n_models` / `has_base` None (an override, which sets values only) skip those checks.
    """
    return bind_call(
        get_method(name),
        n_models=n_models,
        has_base=has_base,
        params=params,
        per_model_params=per_model_params,
    )


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
