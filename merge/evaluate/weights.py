"""The path engine: named state dicts combined into one model instance, in place.

θ(w) = Σ_i w_i θ_i over named states θ_i (checkpoints, aligned copies, task-vector endpoints),
written straight into the model's own parameter and buffer storage:

- an interpolation path A→B is w = (1−α, α), computed with one `torch.lerp` per tensor;
- a task-vector scale θ0 + λτ, τ = θ1 − θ0, is w = (1−λ, λ) (negation: λ < 0);
- a plane θ0 + λ1τ1 + λ2τ2 is w = (1−λ1−λ2, λ1, λ2);
- a soup is w_i = 1/n over its ingredients.

A one-hot w copies that state bit for bit, so path endpoints are exactly the checkpoints.
Integer and boolean tensors (`num_batches_tracked`, masks) are never combined: they are taken
from the state with the largest weight. Nothing is written to disk per point.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from merge.errors import FormatError, UsageError

StateLike = str | os.PathLike[str] | Mapping[str, Tensor] | nn.Module

FLOATS = (torch.float32, torch.float64)


def read_state(spec: StateLike) -> dict[str, Tensor]:
    """A state dict in memory from a path (any layout `open_checkpoint` reads), a dict or a module."""
    if isinstance(spec, nn.Module):
        return {k: v.detach() for k, v in spec.state_dict().items()}
    if isinstance(spec, Mapping):
        return dict(spec)
    from merge.io import load_state_dict

    return load_state_dict(spec if isinstance(spec, str) else Path(spec))


def describe_state(spec: object) -> str:
    if isinstance(spec, str | os.PathLike):
        return str(spec)
    if isinstance(spec, nn.Module):
        return f"<{type(spec).__name__} instance>"
    return "<in-memory state dict>"


def with_tied_aliases(model: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fill names a checkpoint left out because the model ties them to a name it has (lm_head = wte)."""
    out = dict(tensors)
    state = model.state_dict(keep_vars=True)
    by_ptr: dict[tuple[int, str], list[str]] = {}
    for k, v in state.items():
        if v.device.type != "meta" and v.numel():
            by_ptr.setdefault((v.data_ptr(), str(v.device)), []).append(k)
    for names in by_ptr.values():
        present = [n for n in names if n in out]
        for n in names:
            if n not in out and present:
                out[n] = out[present[0]]
    return out


def has_batchnorm(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for m in model.modules()
    )


class StateSpace:
    """Named states held beside `model`'s tensors, ready to be combined into it with `apply`.

    Every state is checked against the model when it is added (missing, unexpected or mis-shaped
    names, all listed). States are kept in the model's float dtype when that is float32/64, and
    in float32 otherwise (the combination is then computed in float32 and cast once).
    """

    def __init__(self, model: nn.Module, states: Mapping[str, StateLike] | None = None):
        self.model = model
        self.targets: dict[str, Tensor] = {}
        seen: set[tuple[int, str]] = set()
        for k, v in model.state_dict(keep_vars=True).items():
            key = (v.data_ptr(), str(v.device))
            if v.numel() and key in seen:  # a tied alias: written once through its first name
                continue
            seen.add(key)
            self.targets[k] = v.data
        self.states: dict[str, dict[str, Tensor]] = {}
        self.sources: dict[str, str] = {}
        self._scratch: dict[str, Tensor] = {}
        for name, spec in (states or {}).items():
            self.add(name, spec)

    def add(self, name: str, spec: StateLike) -> None:
        from merge.entrypoints import load_weights

        tensors = with_tied_aliases(self.model, read_state(spec))
        # load_weights lists every mismatch with a fix; loading also leaves the model usable.
        try:
            load_weights(self.model, tensors, source=name)
        except FormatError as e:
            raise FormatError(f"{describe_state(spec)}: {e}") from None
        kept: dict[str, Tensor] = {}
        for k, target in self.targets.items():
            t = tensors[k]
            if target.is_floating_point():
                dtype = target.dtype if target.dtype in FLOATS else torch.float32
            else:
                dtype = target.dtype
            kept[k] = t.detach().to(device=target.device, dtype=dtype, copy=True)
        self.states[name] = kept
        self.sources[name] = describe_state(spec)

    def state(self, name: str) -> dict[str, Tensor]:
        return self.states[name]

    def apply(self, weights: Mapping[str, float]) -> None:
        """Write Σ_i w_i θ_i into the model, in place (no allocation for float32/64 models)."""
        unknown = [n for n in weights if n not in self.states]
        if unknown:
            raise UsageError(f"unknown state {unknown[0]!r}; known: {', '.join(self.states)}")
        terms = [(n, float(w)) for n, w in weights.items() if float(w) != 0.0]
        if not terms:
            raise UsageError("every weight of the combination is zero")
        dominant = max(weights, key=lambda n: float(weights[n]))
        one_hot = len(terms) == 1 and terms[0][1] == 1.0
        lerp = len(terms) == 2 and abs(terms[0][1] + terms[1][1] - 1.0) < 1e-12
        with torch.no_grad():
            for k, target in self.targets.items():
                if not target.is_floating_point():
                    target.copy_(self.states[dominant][k])
                    continue
                if one_hot:
                    target.copy_(self.states[terms[0][0]][k])
                    continue
                out = target if target.dtype in FLOATS else self._buffer(k, target)
                if lerp:
                    (a, _), (b, wb) = terms
                    torch.lerp(self.states[a][k], self.states[b][k], wb, out=out)
                else:
                    n0, w0 = terms[0]
                    torch.mul(self.states[n0][k], w0, out=out)
                    for n, w in terms[1:]:
                        out.add_(self.states[n][k], alpha=w)
                if out is not target:
                    target.copy_(out)

    def _buffer(self, key: str, like: Tensor) -> Tensor:
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(
                like.shape, dtype=torch.float32, device=like.device
            )
        return buf

    def combined(self, weights: Mapping[str, float]) -> dict[str, Tensor]:
        """Σ_i w_i θ_i as a new state dict (for saving a chosen merge), via the model."""
        self.apply(weights)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def weighted_state(
    states: Mapping[str, StateLike], weights: Mapping[str, float]
) -> dict[str, Tensor]:
    """Σ_i w_i θ_i as a new state dict in each tensor's own dtype (float math in float32/64), no model needed.

    Non-float tensors come from the state with the largest weight, as on a path.
    """
    loaded = {n: read_state(states[n]) for n in weights}
    dominant = max(weights, key=lambda n: float(weights[n]))
    out: dict[str, Tensor] = {}
    for k, ref in loaded[dominant].items():
        if not ref.is_floating_point():
            out[k] = ref.clone()
            continue
        acc_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        acc = torch.zeros(ref.shape, dtype=acc_dtype)
        for n, w in weights.items():
            if float(w) != 0.0:
                acc.add_(loaded[n][k].to(acc_dtype), alpha=float(w))
        out[k] = acc.to(ref.dtype)
    return out
