"""Whole-model Fisher / RegMean merges in memory: statistics from the user's model and data.

    merged = merge_with_data("regmean", [sd_a, sd_b], make_model=mm, data=[data_a, data_b])

For each input state dict, the weights are loaded into one model instance (`load_weights`),
the statistics are computed on that input's data (Fisher diagonals or RegMean Gram matrices),
and then every tensor is merged with the registered pure function. Suited to models that fit in
memory; for streaming merges, save the statistics (`merge stats`) and pass them per model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from merge.entrypoints import load_weights
from merge.errors import MergeWarning, UsageError
from merge.methods._checks import check_finite
from merge.methods.fisher import compute_fisher, fisher
from merge.methods.regmean import compute_grams, dead_inputs, regmean


def compute_statistics(
    kind: str,
    model: nn.Module,
    state: Mapping[str, Tensor],
    data: Iterable[Any],
    *,
    n_examples: int = 256,
    fisher_kind: str = "exact",
    normalize: bool = False,
) -> dict[str, Tensor]:
    """Load `state` into `model` and return its Fisher diagonals or Gram matrices on `data`."""
    load_weights(model, state)
    if kind == "fisher":
        return compute_fisher(
            model, data, n_examples=n_examples, kind=fisher_kind, normalize=normalize
        )
    if kind == "regmean":
        return compute_grams(model, data, n_examples=n_examples)
    raise UsageError(f"unknown statistics `{kind}`; choose fisher or regmean")


def merge_with_data(
    method: str,
    states: Sequence[Mapping[str, Tensor]],
    *,
    make_model: Callable[[], nn.Module],
    data: Sequence[Iterable[Any]],
    weight: Sequence[float] | None = None,
    n_examples: int = 256,
    fisher_kind: str = "exact",
    normalize_fisher: bool = False,
    alpha: float = 0.1,
    eps: float = 1e-6,
) -> dict[str, Tensor]:
    """Fisher- or RegMean-merge `states`, with statistics of model i computed on `data[i]`."""
    if method not in ("fisher", "regmean"):
        raise UsageError(f"`{method}` is not a data-aware method; choose fisher or regmean")
    if len(data) == 1:
        data = list(data) * len(states)
    if len(data) != len(states):
        raise UsageError(
            f"give one data set for all models or one per model ({len(states)}), not {len(data)}"
        )
    w = list(weight) if weight is not None else [1.0] * len(states)
    for name, ref in states[0].items():
        if ref.is_floating_point():
            check_finite(method, [s[name] for s in states], tensor_name=name)
    model = make_model()
    stats = [
        compute_statistics(
            method,
            model,
            s,
            d,
            n_examples=n_examples,
            fisher_kind=fisher_kind,
            normalize=normalize_fisher,
        )
        for s, d in zip(states, data)
    ]
    out: dict[str, Tensor] = {}
    for name, ref in states[0].items():
        xs = [s[name].float() for s in states]
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        if method == "fisher":
            if all(name in st for st in stats):
                out[name] = fisher(xs, weight=w, statistics=[st[name] for st in stats], eps=eps)
            else:  # buffers have no gradient: weighted mean
                out[name] = regmean(xs, weight=w)
        else:
            grams = [st[name] for st in stats] if all(name in st for st in stats) else None
            dead = dead_inputs(grams) if grams is not None else 0
            if dead:
                warnings.warn(
                    f"RegMean: `{name}`: {dead} of {ref.shape[-1]} input features were "
                    "zero on every example of every model's data (dead units or constant "
                    "inputs); the data says nothing about those columns, so they keep the "
                    "weighted mean",
                    MergeWarning,
                    stacklevel=2,
                )
            out[name] = regmean(xs, weight=w, statistics=grams, alpha=alpha)
        out[name] = out[name].to(ref.dtype)
    return out


__all__ = ["compute_statistics", "merge_with_data"]
