"""Linearity probes: is the network (or a layer of it) secretly almost linear?

Function space, over pairs (x, y) of inputs from the data, at the output and at hooked layers:

    homogeneity  r_hom(k) = ‖f(kx) − k f(x)‖ / ‖f(x) − f(y)‖        (k includes negative values)
    additivity   r_add    = ‖f(x+y) − f(x) − f(y)‖ / ‖f(x) − f(y)‖

With `origin="affine"` (the default) f is first shifted by f(0), so an affine map such as
`nn.Linear` with a bias scores ~0; `origin="zero"` is the textbook form. A bias-free ReLU
network is positively homogeneous (r_hom ≈ 0 for k > 0) but fails for k < 0 and fails
additivity, which is why both tests and a negative k are needed.

Weight space, along task vectors τ1, τ2 from θ0, with g(θ) = f(x; θ):

    homogeneity  ‖g(θ0+kτ1) − g(θ0) − k(g(θ0+τ1) − g(θ0))‖ / ‖g(θ0+τ1) − g(θ0+τ2)‖
    additivity   ‖g(θ0+τ1+τ2) − g(θ0+τ1) − g(θ0+τ2) + g(θ0)‖ / ‖g(θ0+τ1) − g(θ0+τ2)‖

(with one task vector the denominator is ‖g(θ0+τ1) − g(θ0)‖), and the weight
disentanglement error (Ortiz-Jimenez et al. 2023) over a grid of (α1, α2):

    ξ(α1, α2) = Σ_t E_{x∼D_t}[ 1{argmax f(x; θ0 + α_t τ_t) ≠ argmax f(x; θ0 + α1τ1 + α2τ2)} ]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from merge.errors import UsageError, did_you_mean
from merge.evaluate.evaluators import (
    Batches,
    DataSpec,
    as_batches,
    call_model,
    logits_of,
    model_device,
    split_batch,
    to_device,
)
from merge.evaluate.grids import linspace
from merge.evaluate.results import Curve, Result
from merge.evaluate.runner import ModelSpec, build_model
from merge.evaluate.weights import StateLike, StateSpace, describe_state

DEFAULT_KS = (-2.0, -1.0, -0.5, 0.5, 2.0)
OUTPUT = "output"
TINY = 1e-12  # pairs with ‖f(x) − f(y)‖ below this carry no scale and are skipped


def _stats(ratios: Tensor) -> dict[str, float]:
    r = ratios.double()
    return {
        "mean": float(r.mean()),
        "median": float(r.median()),
        "max": float(r.max()),
        "pairs": int(r.numel()),
    }


def collect_inputs(data: Batches, max_examples: int, what: str = "--data") -> Any:
    """The first `max_examples` model inputs of the data: a float tensor or a dict of tensors."""
    chunks: list[Any] = []
    n = 0
    for batch in data:
        x, _ = split_batch(batch, what)
        chunks.append(x)
        n += len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)
        if n >= max_examples:
            break
    if isinstance(chunks[0], Mapping):
        return {k: torch.cat([c[k] for c in chunks])[:max_examples] for k in chunks[0]}
    return torch.cat(chunks)[:max_examples]


class Features:
    """f(inputs) at the output and at named layers (forward hooks), flattened per example."""

    def __init__(self, model: nn.Module, layers: Sequence[str], batch_size: int = 256):
        self.model = model
        modules = dict(model.named_modules())
        for name in layers:
            if name not in modules:
                names = [n for n in modules if n]
                raise UsageError(
                    f"--layer `{name}` is not a module of the model{did_you_mean(name, names)}; "
                    f"modules: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
                )
        self.layers = list(layers)
        self.modules = modules
        self.batch_size = batch_size
        self.output_classes = 0  # the output's last dimension, seen on the latest call

    def __call__(self, inputs: Any) -> dict[str, Tensor]:
        device = model_device(self.model)
        captured: dict[str, list[Tensor]] = {name: [] for name in [OUTPUT, *self.layers]}
        handles = []
        for name in self.layers:

            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                t = out if isinstance(out, Tensor) else out[0]
                captured[name].append(t.detach().float().flatten(1).cpu())

            handles.append(self.modules[name].register_forward_hook(hook))
        n = len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) else len(inputs)
        try:
            with torch.no_grad():
                for i in range(0, n, self.batch_size):
                    chunk = (
                        {k: v[i : i + self.batch_size] for k, v in inputs.items()}
                        if isinstance(inputs, Mapping)
                        else inputs[i : i + self.batch_size]
                    )
                    out = logits_of(call_model(self.model, to_device(chunk, device)))
                    self.output_classes = int(out.shape[-1])
                    captured[OUTPUT].append(out.detach().float().flatten(1).cpu())
        finally:
            for h in handles:
                h.remove()
        return {k: torch.cat(v) for k, v in captured.items()}


def _probe_point(test: str, k: float | None, num: Tensor, den: Tensor) -> dict[str, Any]:
    """One point of a linearity curve: statistics of the error ratios num / den over the pairs."""
    return {"coords": {"test": test, "k": k}, "metrics": _stats(_ratio(num, den)), "seconds": 0.0}


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    keep = den > TINY
    if not bool(keep.any()):
        raise UsageError(
            "every pair has f(x) = f(y): the probe has no scale to compare against (constant output?)"
        )
    return num[keep] / den[keep]


def linearity_probe(
    model: ModelSpec,
    data: DataSpec | Batches,
    *,
    weights: StateLike | None = None,
    layers: Sequence[str] = (),
    ks: Sequence[float] = DEFAULT_KS,
    origin: str = "affine",
    max_pairs: int = 512,
    seed: int = 0,
    device: str = "cpu",
) -> Result:
    """Function-space homogeneity (per k) and additivity at the output and at `layers`."""
    if origin not in ("affine", "zero"):
        raise UsageError(f"--origin must be `affine` or `zero`, got `{origin}`")
    m = build_model(model, device)
    if weights is not None:
        StateSpace(m, {"weights": weights})
    m.eval()
    feats = Features(m, layers)
    x = collect_inputs(as_batches(data), max_pairs)
    if isinstance(x, Mapping) or not x.is_floating_point():
        raise UsageError(
            "function-space probes scale and add inputs, so they need float input tensors "
            "(token ids cannot be scaled); probe a layer's weights with --base/--task instead"
        )
    g = torch.Generator().manual_seed(seed)
    y = x[torch.randperm(len(x), generator=g)]
    fx, fy, fxy = feats(x), feats(y), feats(x + y)
    f0 = (
        feats(torch.zeros_like(x[:1]))
        if origin == "affine"
        else {k: torch.zeros_like(v[:1]) for k, v in fx.items()}
    )
    fk = {k: feats(k * x) for k in ks}
    result = Result(
        kind="linearity",
        axes=["test", "k"],
        settings={
            "space": "function",
            "origin": origin,
            "ks": list(ks),
            "pairs": len(x),
            "layers": [OUTPUT, *layers],
            "seed": seed,
        },
    )
    if weights is not None:
        result.inputs["weights"] = describe_state(weights)
    for where in [OUTPUT, *layers]:
        den = (fx[where] - fy[where]).norm(dim=1)
        c = Curve(where, info={"space": "function"})
        for k in ks:
            num = ((fk[k][where] - f0[where]) - k * (fx[where] - f0[where])).norm(dim=1)
            c.points.append(_probe_point("homogeneity", k, num, den))
        num = (fxy[where] - fx[where] - fy[where] + f0[where]).norm(dim=1)
        c.points.append(_probe_point("additivity", None, num, den))
        result.curves.append(c)
    return result


def weight_linearity(
    model: ModelSpec,
    base: StateLike,
    task1: StateLike,
    data: DataSpec | Batches,
    *,
    task2: StateLike | None = None,
    layers: Sequence[str] = (),
    ks: Sequence[float] = DEFAULT_KS,
    max_examples: int = 512,
    device: str = "cpu",
) -> Result:
    """Weight-space homogeneity (per k) and additivity of g(θ) = f(x; θ) along task vectors."""
    m = build_model(model, device)
    states: dict[str, StateLike] = {
        "base": base,
        "task1": task1,
        **({"task2": task2} if task2 is not None else {}),
    }
    space = StateSpace(m, states)
    m.eval()
    feats = Features(m, layers)
    x = collect_inputs(as_batches(data), max_examples)

    def g(**lam: float) -> dict[str, Tensor]:
        space.apply({"base": 1.0 - sum(lam.values()), **lam})
        return feats(x)

    g0, g1 = g(), g(task1=1.0)
    g2 = g(task2=1.0) if task2 is not None else None
    result = Result(
        kind="linearity",
        axes=["test", "k"],
        inputs={n: describe_state(s) for n, s in states.items()},
        settings={
            "space": "weight",
            "ks": list(ks),
            "examples": max_examples,
            "layers": [OUTPUT, *layers],
        },
    )
    gk = {k: g(task1=k) for k in ks}
    g12 = g(task1=1.0, task2=1.0) if task2 is not None else None
    for where in [OUTPUT, *layers]:
        den = ((g1[where] - g2[where]) if g2 is not None else (g1[where] - g0[where])).norm(dim=1)
        c = Curve(f"weights:{where}", info={"space": "weight"})
        for k in ks:
            num = (gk[k][where] - g0[where] - k * (g1[where] - g0[where])).norm(dim=1)
            c.points.append(_probe_point("homogeneity", k, num, den))
        if g12 is not None and g2 is not None:
            num = (g12[where] - g1[where] - g2[where] + g0[where]).norm(dim=1)
            c.points.append(_probe_point("additivity", None, num, den))
        result.curves.append(c)
    return result


def disentanglement(
    model: ModelSpec,
    base: StateLike,
    task1: StateLike,
    task2: StateLike,
    data1: DataSpec | Batches,
    data2: DataSpec | Batches,
    *,
    alphas: Sequence[float] | None = None,
    max_examples: int = 1024,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Result:
    """ξ(α1, α2) on a grid (default 13 × 13 over [−3, 3]), as a fraction of disagreeing predictions."""
    grid = list(alphas) if alphas is not None else linspace(-3.0, 3.0, 13)
    m = build_model(model, device)
    states = {"base": base, "task1": task1, "task2": task2}
    space = StateSpace(m, states)
    m.eval()
    feats = Features(m, [])
    x1 = collect_inputs(as_batches(data1, "--data1"), max_examples, "--data1")
    x2 = collect_inputs(as_batches(data2, "--data2"), max_examples, "--data2")

    def predict(x: Any, a1: float, a2: float) -> Tensor:
        space.apply({"base": 1.0 - a1 - a2, "task1": a1, "task2": a2})
        out = feats(x)[OUTPUT]
        return out.view(out.shape[0], -1, feats.output_classes).argmax(-1)  # (examples, positions)

    single1 = {a: predict(x1, a, 0.0) for a in grid}
    single2 = {a: predict(x2, 0.0, a) for a in grid}
    c = Curve("xi", info={"distance": "prediction disagreement"})
    total = len(grid) ** 2
    for i, a1 in enumerate(grid):
        for j, a2 in enumerate(grid):
            d1 = float((predict(x1, a1, a2) != single1[a1]).float().mean())
            d2 = float((predict(x2, a1, a2) != single2[a2]).float().mean())
            c.points.append(
                {
                    "coords": {"alpha1": a1, "alpha2": a2},
                    "metrics": {"xi": d1 + d2, "xi_task1": d1, "xi_task2": d2},
                    "seconds": 0.0,
                }
            )
            if progress:
                progress(i * len(grid) + j + 1, total)
    result = Result(
        kind="disentanglement",
        axes=["alpha1", "alpha2"],
        curves=[c],
        inputs={n: describe_state(s) for n, s in states.items()},
        settings={
            "alphas": grid,
            "examples": [len(_n(x1)), len(_n(x2))],
            "distance": "prediction disagreement",
        },
    )
    inside = [
        p["metrics"]["xi"]
        for p in c.points
        if 0 <= p["coords"]["alpha1"] <= 1 and 0 <= p["coords"]["alpha2"] <= 1
    ]
    result.selection = {
        "max_xi": max(p["metrics"]["xi"] for p in c.points),
        "mean_xi": sum(p["metrics"]["xi"] for p in c.points) / len(c.points),
        "mean_xi_unit_square": (sum(inside) / len(inside)) if inside else None,
    }
    return result


def _n(x: Any) -> Any:
    return next(iter(x.values())) if isinstance(x, Mapping) else x
