"""BatchNorm statistics reset and REPAIR for interpolated models (Jordan et al., ICLR 2023).

Interpolating two aligned networks shrinks the variance of hidden activations ("variance
collapse"). `reset_batchnorm` recomputes BatchNorm running statistics on data (cumulative
average, `momentum=None`); `repair` rescales every channel of the interpolated model so that its
mean and standard deviation equal the interpolation of the endpoints':

    μ_goal = (1−α) μ_A + α μ_B,   σ_goal = (1−α) σ_A + α σ_B
    y' = (y − μ) · σ_goal/σ + μ_goal       (folded into the layer's weight and bias)

Both work in place on in-memory modules and return the model.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from merge.align.trace import eval_mode, split_batch
from merge.errors import MergeWarning, UsageError

_BN = nn.modules.batchnorm._BatchNorm
NOTHING_TO_REPAIR = (
    "REPAIR has nothing to correct in this model: no BatchNorm layer and no Linear/Conv with a "
    "bias before the output layer (LayerNorm/RMSNorm nets without biases), so it leaves the "
    "interpolated model unchanged"
)


def _batches(data: Iterable[Any], num_batches: int | None) -> Iterable[Any]:
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            return
        yield batch


def _to(obj: Any, device: torch.device) -> Any:
    """Tensors inside a batch moved to `device` (tuples, lists and dicts followed)."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _run(model: nn.Module, data: Iterable[Any], num_batches: int | None) -> int:
    seen = 0
    device = _device(model)
    for batch in _batches(data, num_batches):
        args, kwargs = split_batch(batch)
        model(*_to(args, device), **_to(kwargs, device))
        seen += 1
    if not seen:
        raise UsageError("the data yielded no batches")
    return seen


@torch.no_grad()
def reset_batchnorm(
    model: nn.Module, data: Iterable[Any], num_batches: int | None = None
) -> nn.Module:
    """Recompute every BatchNorm's running mean/var as the average over `data` (all other modules
    in eval mode, so dropout is off); momentum and train/eval flags are restored afterwards."""
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return model
    momenta = [bn.momentum for bn in bns]
    with eval_mode(model):
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: every batch weighs the same
            bn.train()
        try:
            _run(model, data, num_batches)
        finally:
            for bn, m in zip(bns, momenta):
                bn.momentum = m
    return model


def _channel_axis(module: nn.Module, x: Tensor) -> int:
    return x.dim() - 1 if isinstance(module, nn.Linear) else 1


def _layers(model: nn.Module) -> list[str]:
    return [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)
    ]


@torch.no_grad()
def output_layer(model: nn.Module, data: Iterable[Any] | None = None) -> str | None:
    """The Linear/Conv that runs last on the first batch of `data` (the classifier head).

    Without data, the last one registered, which is wrong for a model that defines its head
    first; REPAIR passes its data.
    """
    layers = _layers(model)
    if not layers or data is None:
        return layers[-1] if layers else None
    mods = dict(model.named_modules())
    order: list[str] = []
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n in layers]
    try:
        with eval_mode(model):
            _run(model, data, 1)
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else layers[-1]


def repair_points(model: nn.Module, data: Iterable[Any] | None = None) -> list[str]:
    """Where REPAIR corrects: BatchNorm layers (affine) and Linear/Conv layers with a bias, except
    the output layer (`output_layer`: the classifier, whose output order and scale are the
    function). Empty for nets whose layers have neither (LayerNorm/RMSNorm nets without biases)."""
    last = output_layer(model, data)
    out = []
    for name, m in model.named_modules():
        if (isinstance(m, _BN) and m.affine) or (
            isinstance(m, nn.Linear | nn.modules.conv._ConvNd)
            and m.bias is not None
            and name != last
            # a grouped transposed conv's output channels are not rows of its weight
            and not (isinstance(m, nn.modules.conv._ConvTransposeNd) and m.groups != 1)
        ):
            out.append(name)
    return out


class _Stats:
    """Per-channel running sums of one module's output, in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.s: Tensor | None = None
        self.ss: Tensor | None = None

    def add(self, x: Tensor, axis: int) -> tuple[Tensor, Tensor]:
        x = x.movedim(axis, -1).reshape(-1, x.shape[axis]).double()  # (samples, C)
        s, ss = x.sum(0), (x * x).sum(0)
        self.n += x.shape[0]
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        return s / x.shape[0], ((ss / x.shape[0]) - (s / x.shape[0]) ** 2).clamp_min(0).sqrt()

    def mean_std(self) -> tuple[Tensor, Tensor]:
        assert self.s is not None and self.ss is not None
        mean = self.s / self.n
        return mean, (self.ss / self.n - mean**2).clamp_min(0).sqrt()


def _measure(
    model: nn.Module,
    points: list[str],
    data: Iterable[Any],
    num_batches: int | None,
    goal: dict[str, tuple[Tensor, Tensor]] | None = None,
    eps: float = 1e-5,
) -> dict[str, _Stats]:
    """One pass over `data` recording each point's channel statistics; with `goal`, each point's
    output is also corrected to the goal mean/std with its batch statistics as it passes."""
    stats = {p: _Stats() for p in points}
    mods = dict(model.named_modules())

    def hook(p: str, m: nn.Module, out: Tensor) -> Tensor | None:
        axis = _channel_axis(m, out)
        mean, std = stats[p].add(out, axis)
        if goal is None:
            return None
        mu, sd = goal[p]
        shape = [1] * out.dim()
        shape[axis] = -1
        scale = (sd / (std + eps)).to(out.dtype).view(shape)
        return (out - mean.to(out.dtype).view(shape)) * scale + mu.to(out.dtype).view(shape)

    hooks = [mods[p].register_forward_hook(lambda m, i, o, p=p: hook(p, m, o)) for p in points]
    try:
        with eval_mode(model):
            _run(model, data, num_batches)
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def repair(
    model: nn.Module,
    model_a: nn.Module,
    model_b: nn.Module,
    alpha: float,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    eps: float = 1e-5,
) -> nn.Module:
    """REPAIR `model` (the interpolation (1−α)·A + α·B of aligned `model_a`, `model_b`) in place.

    One pass over `data` per endpoint collects each point's channel statistics; one pass over the
    interpolated model, with each point already corrected by its batch statistics (as REPAIR's
    reset layers do), measures what to fold into the weights. See `repair_points` for where.
    """
    points = repair_points(model, data)
    if not points:
        warnings.warn(NOTHING_TO_REPAIR, MergeWarning, stacklevel=2)
        return model
    sa = _measure(model_a, points, data, num_batches)
    sb = _measure(model_b, points, data, num_batches)
    goal = {}
    for p in points:
        (ma, da), (mb, db) = sa[p].mean_std(), sb[p].mean_std()
        goal[p] = ((1 - alpha) * ma + alpha * mb, (1 - alpha) * da + alpha * db)
    stats = _measure(model, points, data, num_batches, goal, eps)
    mods = dict(model.named_modules())
    for p in points:
        m = mods[p]
        mean, std = stats[p].mean_std()
        mu, sd = goal[p]
        scale = sd / (std + eps)
        shift = mu - mean * scale  # y' = y·scale + shift
        if isinstance(m, _BN):
            m.weight.mul_(scale.to(m.weight.dtype))
            m.bias.mul_(scale.to(m.bias.dtype)).add_(shift.to(m.bias.dtype))
        else:
            w = m.weight
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                view = [1, -1] + [1] * (w.dim() - 2)  # (C_in, C_out/groups, ...)
            else:
                view = [-1] + [1] * (w.dim() - 1)
            w.mul_(scale.to(w.dtype).view(view))
            m.bias.mul_(scale.to(m.bias.dtype)).add_(shift.to(m.bias.dtype))
    return model
