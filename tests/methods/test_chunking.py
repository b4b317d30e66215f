"""Chunked execution equals whole-tensor execution, bit for bit, for every registered method.

The engine streams every call whose registration declares a streaming shape (elementwise,
statistics then elementwise, row-wise); the block sizes of the random draws, the reductions
and the threshold sample are shrunk here so that tiny tensors cross every boundary.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import merge.methods._stream as stream
import merge.methods.selection as selection
from merge.api import plan_recipe
from merge.errors import MergeWarning
from merge.execute import Engine, form_calls, streams
from merge.io.sources import MemorySource
from merge.methods import get_method, list_methods
from merge.methods._registry import MATRIX, SHAPES, MethodSpec
from merge.methods._stream import ElementRandom, mix_seed, run_whole
from merge.methods.selection import StreamingTopK

SPECS = list_methods()
# Data-aware methods need statistics inputs that a plain recipe does not give.
NEEDS_DATA = {"fisher", "regmean"}
# (6, 10): rows of 10; (37,): one row; (3, 4, 5): rows of 5, columns of 20; (): a scalar;
# (9, 3): rows shorter than a reduction group, so groups of rows are cut by the chunks.
SHAPES_UNDER_TEST = {"w": (6, 10), "v": (37,), "t": (3, 4, 5), "s": (), "u": (9, 3)}
CHUNKS = [3, 7, 10, 23, 64]  # smaller than a row, splitting rows, a row, several rows
# Parameter sets beyond the defaults and the one-parameter flips that `variants` derives from
# the registry (every boolean and every choice); `_base: False` drops an optional base.
EXTRA_VARIANTS: dict[str, list[dict[str, Any]]] = {
    "nuslerp": [
        {"flatten": False, "row_wise": True},
        {"flatten": False, "compat": "mergekit"},
        {"flatten": False, "row_wise": True, "compat": "mergekit"},
        {"_base": False},
    ],
    "model_stock": [{"filter_wise": True, "compat": "mergekit"}],
    "multislerp": [{"_base": False}],
    "slerp": [{"_base": False}],
    "sce": [{"select_topk": 0.5}, {"select_topk": 0.3, "compute_dtype": "bfloat16"}],
    "ramplus_tl": [{"r": 0.5, "alpha": 1.0}],
}


def variants(spec: MethodSpec) -> list[dict[str, Any]]:
    """The defaults, each boolean flipped, each other choice, and the extra sets above."""
    out: list[dict[str, Any]] = [{}]
    for name, param in spec.global_params.items():
        domain = spec.domains.get(name)
        if domain is None or name == "scope":  # scope: model has its own engine pass (below)
            continue
        if domain.kind == "bool":
            out.append({name: not param.default})
        elif domain.kind == "choice":
            out += [{name: c} for c in domain.choices if c != param.default]
    return out + EXTRA_VARIANTS.get(spec.name, [])


CASES = [
    pytest.param(
        s.name, v, id=f"{s.name}-{'-'.join(f'{k}={x}' for k, x in v.items()) or 'defaults'}"
    )
    for s in SPECS
    if s.name not in NEEDS_DATA
    for v in variants(s)
]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "REDUCE_BLOCK", 16)
    monkeypatch.setattr(selection, "STREAM_SAMPLE", 32)


def _inputs(n_models: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES_UNDER_TEST.items()}
    out = {"base": base}
    # a shared direction, so fine-tunes agree as real ones do (Model Stock needs cos > 0)
    shared = {k: 0.1 * torch.randn(s, generator=g) for k, s in SHAPES_UNDER_TEST.items()}
    for i in range(n_models):
        # bf16-rounded task vectors: magnitudes repeat, so the tie rules are exercised
        out[f"m{i}"] = {
            k: v + (shared[k] + 0.05 * torch.randn(v.shape, generator=g)).bfloat16().float()
            for k, v in base.items()
        }
    return out


def _recipe(
    name: str, params: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    spec = get_method(name)
    params = dict(params or {})
    with_base = spec.accepts_base and params.pop("_base", True)
    n = max(spec.min_models, 3)
    if spec.max_models is not None:
        n = min(n, spec.max_models)
    if name == "slerp" and with_base:
        n = 1  # slerp(base, model)
    data = _inputs(n)
    models: dict[str, dict[str, Any]] = {}
    for i in range(n):
        mp: dict[str, Any] = {}
        for p, default in spec.per_model.items():
            if default is None:
                mp[p] = 1.0
        if "density" in spec.per_model:
            mp["density"] = 0.4
        if "weight" in spec.per_model:
            mp["weight"] = 1.0 + 0.25 * i
        models[f"m{i}"] = mp
    step: dict[str, Any] = {"method": name, "models": models, **params}
    if with_base:
        step["base"] = "base"
    for p, param in spec.global_params.items():
        if param.default is param.empty:
            step[p] = 0.5
    used = ["base", *models] if with_base else list(models)
    recipe = {"inputs": {k: f"<memory:{k}>" for k in used}, "steps": {"out": step}}
    return recipe, {k: data[k] for k in used}


def _run(recipe: dict[str, Any], data: dict[str, dict[str, torch.Tensor]], chunk: int):
    """The plan, its output, and the texts of the warnings it gave (in order)."""
    srcs = {k: MemorySource(v, f"<memory:{k}>") for k, v in data.items()}
    plan = plan_recipe(recipe, preopened=srcs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MergeWarning)
        out = Engine(plan, chunk=chunk, quiet=True, seed=3).to_memory()
    return plan, out, [str(w.message) for w in caught if issubclass(w.category, MergeWarning)]


@pytest.mark.parametrize("name,params", CASES)
def test_chunked_equals_whole_bit_for_bit(name: str, params: dict[str, Any]) -> None:
    recipe, data = _recipe(name, params)
    plan, whole, said = _run(recipe, data, 1 << 20)
    graph = [j for j in plan.jobs if j.mode == "graph"]
    spec = get_method(name)
    if spec.affine is None:
        assert graph, f"{name}: no method call was planned"
        # the declared shape decides the path: only whole-matrix calls read whole tensors
        for j in graph:
            (call,) = form_calls(j.form)
            if j.numel > 1:
                assert streams(j) == (spec.shape_for(dict(call.params)) != MATRIX), j.name
        _assert_function_matches(spec, recipe, data, graph, whole)
    for chunk in CHUNKS:
        _, chunked, said_chunked = _run(recipe, data, chunk)
        for k in whole:
            assert torch.equal(whole[k], chunked[k]), f"{name} chunk {chunk}: `{k}` differs"
        assert said_chunked == said, f"{name} chunk {chunk}: other warnings"


def _assert_function_matches(
    spec: MethodSpec,
    recipe: dict[str, Any],
    data: dict[str, dict[str, torch.Tensor]],
    graph: list[Any],
    whole: dict[str, torch.Tensor],
) -> None:
    """The method's own function on whole tensors gives the engine's bytes (one kernel)."""
    step = recipe["steps"]["out"]
    for j in graph:
        (call,) = form_calls(j.form)
        kwargs: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in call.params}
        if "tensor_name" in spec.signature.parameters:
            kwargs["tensor_name"] = j.name
        if spec.random:
            kwargs["generator"] = ElementRandom(mix_seed(3, j.name, call.step, 0))
        if "base" in step:
            kwargs["base"] = data["base"][j.name]
        models = [data[m][j.name] for m in step["models"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MergeWarning)
            direct = spec.fn(models, **kwargs)
        assert torch.equal(direct, whole[j.name]), (
            f"{spec.name}: `{j.name}` differs from the engine"
        )


def test_every_streaming_method_is_covered() -> None:
    """Every method that streams for some parameters is run chunked above with them."""
    covered = {name for name, *_ in (c.values for c in CASES)}
    streaming = {
        s.name
        for s in SPECS
        if any(
            s.shape_for({k: v for k, v in p.items() if k != "_base"}) != MATRIX for p in variants(s)
        )
    }
    assert streaming - NEEDS_DATA <= covered
    # the methods this issue made streaming, in every mode
    made_streaming = ("slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce")
    for name in (*made_streaming, "ramplus_tl", "arcee_fusion", "consensus", "tall_mask"):
        assert get_method(name).kernel is not None, name


def test_every_method_declares_a_known_shape() -> None:
    for s in SPECS:
        assert s.shape_for({}) in SHAPES, s.name


def test_element_random_draws_do_not_depend_on_the_cut() -> None:
    r = ElementRandom(key=11)
    whole = r.uniform(100, stream=1)
    parts = torch.cat([r.at(s).uniform(min(13, 100 - s), stream=1) for s in range(0, 100, 13)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, r.uniform(100, stream=2))  # one stream per model


def test_two_random_calls_on_one_tensor_draw_independent_masks() -> None:
    """Issue 14 item 2: `dare(a) - dare(a')` with a' = a used to be exactly zero."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(64)}
    a = {"w": torch.randn(64, generator=g)}
    recipe = {
        "inputs": {"base": "<memory:base>", "a": "<memory:a>", "b": "<memory:b>"},
        "steps": {
            "one": {"method": "dare_linear", "base": "base", "models": {"a": {"density": 0.5}}},
            "two": {"method": "dare_linear", "base": "base", "models": {"b": {"density": 0.5}}},
            "out": "one - two",
        },
    }
    srcs = {
        "base": MemorySource(base, "<memory:base>"),
        "a": MemorySource(a, "<memory:a>"),
        "b": MemorySource({"w": a["w"].clone()}, "<memory:b>"),
    }
    out = Engine(plan_recipe(recipe, preopened=srcs), quiet=True, seed=1).to_memory()["w"]
    # Each entry is kept by both, one or none: 2a, a or −a or 0 after the 1/p rescale.
    diff = out / a["w"]
    assert set(diff.round().unique().tolist()) <= {-2.0, 0.0, 2.0}
    assert 10 < int((diff != 0).sum()) < 54  # about half the entries differ


def test_streaming_top_k_keeps_exactly_k_with_ties_in_index_order() -> None:
    # |d| = [3, 2, 2, 2, 2, 1]: k = 3 keeps 3 and the first two 2s (indices 1, 2)
    a = torch.tensor([3.0, 2.0, 2.0, 2.0, 2.0, 1.0])
    s = StreamingTopK(6, 3)
    while not s.done:
        s.observe(0, a)
        s.end_pass()
    assert (s.threshold, s.cut) == (2.0, 3)
    kept = selection.keep_top(a.clone(), 0, s.threshold, s.cut)
    assert kept.tolist() == [3.0, 2.0, 2.0, 0.0, 0.0, 0.0]


def test_ties_on_bf16_task_vectors_keeps_exactly_density() -> None:
    """Issue 14 item 8: density 0.2 on bf16 task vectors kept 37% (every tie at the threshold)."""
    from merge.methods.ties import ties

    g = torch.Generator().manual_seed(0)
    base = torch.zeros(4000)
    x = (0.01 * torch.randn(4000, generator=g)).bfloat16().float()
    assert x.abs().unique().numel() < 1500  # many ties
    out = ties([x], base=base, weight=[1.0], density=[0.2])
    assert int((out != 0).sum()) == 800
    # the kept set is the top 800 magnitudes, ties broken towards lower indices
    order = sorted(range(4000), key=lambda i: (-abs(float(x[i])), i))[:800]
    assert set(out.nonzero().reshape(-1).tolist()) == set(order)


def test_breadcrumbs_keeps_exactly_its_band_and_leaves_0d_tensors() -> None:
    from merge.methods.sparsify import breadcrumbs_band

    row = torch.tensor([[3.0, 1.0, 1.0, 1.0, 1.0, 2.0]])
    # γ = 0.2 drops ⌊1.2⌋ = 1 top entry (3), density 0.5 keeps ⌊3⌋ = 3: 2 and the first two 1s
    assert breadcrumbs_band(row, 0.5, 0.2, compat="paper").tolist() == [
        [0.0, 1.0, 1.0, 0.0, 0.0, 2.0]
    ]
    assert breadcrumbs_band(torch.tensor(0.7), 0.5, 0.2, compat="paper").item() == pytest.approx(
        0.7
    )


def test_statistics_kernel_passes_match_run_whole() -> None:
    from merge.methods.ties import TiesKernel

    g = torch.Generator().manual_seed(1)
    b = torch.randn(50, 40, generator=g)
    xs = [b + (0.1 * torch.randn(50, 40, generator=g)).bfloat16().float() for _ in range(2)]
    params = {"weight": [1.0, 0.5], "density": [0.3, 0.6], "elect": "sum", "compat": "paper"}
    whole = run_whole(TiesKernel(b.shape, params), xs, b).reshape(-1)
    k = TiesKernel(b.shape, params)
    flats, fb = [x.reshape(-1) for x in xs], b.reshape(-1)
    while k.needs_pass():
        for s in range(0, 2000, 77):
            k.observe(s, [f[s : s + 77] for f in flats], fb[s : s + 77])
        k.end_pass()
    parts = [k.apply(s, [f[s : s + 77] for f in flats], fb[s : s + 77]) for s in range(0, 2000, 77)]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("bin_limit", [1 << 22, 2])  # 2: the low-bits split and the cut pass
def test_streaming_top_k_matches_a_sort_on_every_path(
    monkeypatch: pytest.MonkeyPatch, bin_limit: int
) -> None:
    monkeypatch.setattr(selection, "BIN_LIMIT", bin_limit)
    g = torch.Generator().manual_seed(2)
    for trial in range(12):
        n = int(torch.randint(40, 300, (1,), generator=g))
        # few distinct magnitudes (integers 0..5), so ties at the threshold are the rule
        a = torch.randint(0, 6, (n,), generator=g).float() * 0.25
        k = int(torch.randint(1, n, (1,), generator=g))
        chunk = [5, 17, n][trial % 3]
        s = StreamingTopK(n, k)
        while not s.done:
            for st in range(0, n, chunk):
                s.observe(st, a[st : st + chunk])
            s.end_pass()
        kept = torch.cat(
            [
                selection.keep_top(a[st : st + chunk].clone(), st, s.threshold, s.cut)
                for st in range(0, n, chunk)
            ]
        )
        want = sorted(range(n), key=lambda i: (-float(a[i]), i))[:k]
        ref = torch.zeros(n)
        ref[want] = a[want]
        assert torch.equal(kept, ref), (trial, n, k, chunk)


def test_a_slow_writer_never_sees_a_reused_buffer() -> None:
    """Statistics items write nothing, so slot reuse must wait for the older item's write: with
    a lagging writer, the last chunk of one tensor was overwritten by the next tensor's."""
    import time

    recipe, data = _recipe("model_stock")
    _, whole, _ = _run(recipe, data, 1 << 20)
    srcs = {k: MemorySource(v, f"<memory:{k}>") for k, v in data.items()}
    engine = Engine(plan_recipe(recipe, preopened=srcs), chunk=23, quiet=True, seed=3)
    parts: dict[str, list[torch.Tensor]] = {}

    def slow_write(name: str, t: torch.Tensor) -> None:
        time.sleep(0.02)
        parts.setdefault(name, []).append(t.detach().clone())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergeWarning)  # a scalar's task vectors point apart
        engine.run(slow_write)
    for k, v in whole.items():
        assert torch.equal(torch.cat([p.reshape(-1) for p in parts[k]]).reshape(v.shape), v), k


def test_the_docs_table_lists_every_method_with_its_shape() -> None:
    """docs/methods.md, "How each method runs": one row per method, its default shape first."""
    text = (Path(__file__).parents[2] / "docs" / "methods.md").read_text()
    section = text.split("## How each method runs")[1].split("\n## ")[0]
    listed: dict[str, str] = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            first, runs_as, *_ = (c.strip() for c in line.strip().strip("|").split("|"))
            shape = re.match(r"[a-z]+", runs_as)
            assert shape is not None, line
            listed.update(dict.fromkeys(re.findall(r"`([a-z_]+)`", first), shape.group(0)))
    assert set(listed) == {s.name for s in SPECS}
    for s in SPECS:
        assert listed[s.name] == s.shape_for({}), s.name
