"""Properties every registered method must have, generated from the registry."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from merge.errors import UsageError
from merge.methods import get_method, list_methods
from merge.methods._registry import MethodSpec
from merge.methods.validate import call_problems, validate_call

SPECS = list_methods()
NAMES = [s.name for s in SPECS]


def n_models(spec: MethodSpec) -> int:
    n = max(spec.min_models, 2)
    return n if spec.max_models is None else min(n, spec.max_models)


def call(
    spec: MethodSpec, tensors: list[torch.Tensor], base: torch.Tensor | None, seed: int = 0
) -> torch.Tensor:
    """Call with the defaults; required per-model parameters get 1.0 and statistics get ones."""
    kwargs: dict[str, Any] = {}
    if spec.accepts_base and base is not None:
        kwargs["base"] = base
    for p, default in spec.per_model.items():
        kwargs[p] = [1.0 if default is None else default] * len(tensors)
    if "density" in spec.per_model:
        kwargs["density"] = [0.5] * len(tensors)  # exercise the sparsifiers
    if spec.name == "fisher":  # regmean without statistics is the weighted mean
        kwargs["statistics"] = [torch.ones_like(t) for t in tensors]
    for name, p in spec.global_params.items():
        if p.default is p.empty:
            kwargs[name] = 0.5  # required scalars (nearswap's t)
    if spec.random:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return spec.fn(tensors, **kwargs)


def inputs(spec: MethodSpec, shape: tuple[int, ...], same: bool = False):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g)
    n = n_models(spec)
    if spec.name == "slerp":
        n = 2  # two models, no base
    tensors = [x.clone() if same else torch.randn(shape, generator=g) for _ in range(n)]
    base = x.clone() if (spec.accepts_base and spec.name != "slerp") else None
    return x, tensors, base


def test_registry_lists_the_catalogue():
    want = {
        "linear",
        "task_arithmetic",
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "passthrough",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
        "consensus",
        "tall_mask",
        "tsv",
        "iso_c",
        "iso_cts",
        "fisher",
        "regmean",
        "nearswap",
        "sce",
        "ram",
    }
    assert want <= set(NAMES)
    for s in SPECS:
        assert s.summary and s.reference, s.name


@pytest.mark.parametrize("name", NAMES)
def test_identical_inputs_give_the_input_back(name):
    spec = get_method(name)
    if "idempotent" not in spec.properties:
        pytest.skip(f"{name} is not marked idempotent")
    for shape in [(6, 4), (7,)]:
        x, tensors, base = inputs(spec, shape, same=True)
        torch.testing.assert_close(call(spec, tensors, base), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(6, 4), (5,), (2, 3, 4)])
def test_shape_and_dtype_kept(name, shape):
    spec = get_method(name)
    _, tensors, base = inputs(spec, shape)
    out = call(spec, tensors, base)
    assert out.shape == torch.Size(shape)
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_seed(name):
    spec = get_method(name)
    _, tensors, base = inputs(spec, (8, 5))
    a, b = call(spec, tensors, base, seed=3), call(spec, tensors, base, seed=3)
    assert torch.equal(a, b)
    if spec.random:
        c = call(spec, tensors, base, seed=4)
        assert not torch.equal(a, c), f"{name}: the seed has no effect"


@pytest.mark.parametrize("name", [s.name for s in SPECS if s.elementwise])
def test_elementwise_methods_stream_in_chunks(name):
    spec = get_method(name)
    _, tensors, base = inputs(spec, (10, 6))
    whole = call(spec, tensors, base)
    halves = [
        call(spec, [t[sl] for t in tensors], None if base is None else base[sl])
        for sl in (slice(0, 4), slice(4, 10))
    ]
    torch.testing.assert_close(torch.cat(halves), whole)


def test_random_methods_take_a_generator_and_no_others_do():
    for s in SPECS:
        assert s.random == ("generator" in inspect.signature(s.fn).parameters)
    assert {s.name for s in SPECS if s.random} == {
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
    }


def test_wrong_model_count_is_named_with_the_fix():
    with pytest.raises(
        UsageError,
        match=r"method `slerp` takes 1 to 2 models besides the base, got 3; list 1 to 2 under `models:`",
    ):
        validate_call("slerp", 3, has_base=False)
    with pytest.raises(
        UsageError, match=r"method `model_stock` takes at least 2 models besides the base, got 1"
    ):
        validate_call("model_stock", 1, has_base=True)


def test_missing_base_is_named_with_the_fix():
    with pytest.raises(
        UsageError,
        match=r"method `ties` needs a base model .* add `base: <input name>` to the step",
    ):
        validate_call("ties", 2, has_base=False)
    with pytest.raises(UsageError, match=r"method `karcher` takes no base model"):
        validate_call("karcher", 2, has_base=True)


def test_density_outside_unit_interval_is_named():
    with pytest.raises(UsageError, match=r"`density` 1.5 \(model 2\) is outside \(0, 1\]"):
        validate_call(
            "ties", 2, has_base=True, per_model_params=[{"density": 0.5}, {"density": 1.5}]
        )
    with pytest.raises(UsageError, match=r"`density` 0 is outside \(0, 1\]"):
        validate_call("dare_ties", 2, has_base=True, params={"density": [0, 0.5]})


def test_unknown_parameter_is_named_with_a_suggestion():
    with pytest.raises(
        UsageError,
        match=r"unknown parameter `densty` for method `ties` \(did you mean `density`\?\)",
    ):
        validate_call("ties", 2, has_base=True, params={"densty": 0.5})


def test_all_problems_are_reported_together():
    problems = call_problems("ties", 0, has_base=False, params={"elect": "mass", "densty": 1})
    assert len(problems) == 4
    assert any("`elect: mass` is not one of sum, count" in p for p in problems)
    with pytest.raises(UsageError, match=r"^4 problems with method `ties`:"):
        validate_call("ties", 0, has_base=False, params={"elect": "mass", "densty": 1})


def test_unknown_method_suggests_the_nearest():
    with pytest.raises(UsageError, match=r"unknown merge method `tie` \(did you mean `ties`\?\)"):
        validate_call("tie", 2, has_base=True)
