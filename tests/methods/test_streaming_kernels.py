"""The statistics kernels of issue 11: hand-worked edges (antiparallel and zero vectors, 1-D and
scalar tensors, ties, NaN), run whole and in chunks; exact Gram sums; bounded kernel state.

`tests/methods/test_chunking.py` checks chunked == whole for every method through the engine;
here the kernels are driven directly, with chunks that split rows, against values worked out
by hand or written out from the formula.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
import torch

import merge.methods._stream as stream
import merge.methods.selection as selection
from merge.api import plan_recipe
from merge.errors import ExecutionError, MergeWarning, UsageError
from merge.execute import Engine
from merge.io.sources import MemorySource
from merge.methods import get_method
from merge.methods._gram import BlockGram, all_pairs, per_column, row_gram
from merge.methods._stream import Kernel, run_whole
from merge.methods.model_stock import model_stock
from merge.methods.sce import model_variance, sce
from merge.methods.slerp import multislerp, nuslerp

T = torch.tensor
S = math.sin(math.pi / 4)


def chunked(
    kernel: Kernel, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, chunk: int
) -> torch.Tensor:
    """The engine's schedule: statistics passes over the chunks, then the apply pass (row-wise
    kernels get whole rows)."""
    flats = [t.reshape(-1) for t in tensors]
    fb = None if base is None else base.reshape(-1)
    n = flats[0].numel()
    row = kernel.row
    size = max(row, chunk // row * row)
    bounds = [(s, min(n, s + size)) for s in range(0, n, size)]

    def part(s: int, e: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        return [f[s:e] for f in flats], None if fb is None else fb[s:e]

    while kernel.needs_pass():
        for s, e in bounds:
            kernel.observe(s, *part(s, e))
        kernel.end_pass()
    return torch.cat([kernel.apply(s, *part(s, e)) for s, e in bounds]).reshape(tensors[0].shape)


def both(name: str, tensors: list[torch.Tensor], base: torch.Tensor | None, **params: Any):
    """The method's function, and its kernel run in chunks of 1 and 3 elements: all equal."""
    spec = get_method(name)
    kw = dict(params)
    if base is not None:
        kw["base"] = base
    whole = spec.fn(tensors, **kw)
    for chunk in (1, 3):
        assert spec.kernel is not None
        kernel = spec.kernel(tensors[0].shape, params, None)
        assert torch.equal(chunked(kernel, tensors, base, chunk), whole), (name, chunk)
    return whole


# ---- slerp -------------------------------------------------------------------------------------


def test_slerp_antiparallel_lerps_and_zero_vectors_follow_compat():
    v = T([1.0, 2.0, 3.0, 4.0])
    # cos Ω = −1: lerp, 0.75·v + 0.25·(−2v) = 0.25·v
    torch.testing.assert_close(both("slerp", [-2 * v], v, t=0.25), 0.25 * v)
    z = torch.zeros(4)
    # paper: a zero vector lerps (t·v); mergekit: Ω = π/2, so sin(π/4)·v at t = 1/2
    torch.testing.assert_close(both("slerp", [v], z, t=0.5), 0.5 * v)
    torch.testing.assert_close(both("slerp", [v], z, t=0.5, compat="mergekit"), S * v)


def test_slerp_of_scalars_is_a_lerp():
    # one-element vectors are parallel or antiparallel: always the lerp
    torch.testing.assert_close(both("slerp", [T(5.0)], T(2.0), t=0.5), T(3.5))
    torch.testing.assert_close(both("slerp", [T(-3.0)], T(2.0), t=0.5), T(-0.5))


def test_slerp_quarter_turn_in_chunks_of_one():
    v0, v1 = T([1.0, 0.0, 0.0]), T([0.0, 2.0, 0.0])
    out = both("slerp", [v1], v0, t=1 / 3)  # sin((1−t)π/2)·v0 + sin(tπ/2)·v1
    torch.testing.assert_close(out, T([math.sin(math.pi / 3), 2 * math.sin(math.pi / 6), 0.0]))


# ---- nuslerp: whole, rows, columns -------------------------------------------------------------


def test_nuslerp_columns_hand_worked_paper_and_mergekit():
    # row_wise (mergekit's naming) slerps the columns: a = (1, 0), (0, 2); b = (0, 1), (0, 0)
    a = T([[1.0, 0.0], [0.0, 2.0]])
    b = T([[0.0, 0.0], [1.0, 0.0]])
    kw = {"weight": [1.0, 1.0], "flatten": False, "row_wise": True}
    # column 0 orthogonal: sin(π/4)·(a + b); column 1 has b = 0: paper lerps (a/2) ...
    torch.testing.assert_close(both("nuslerp", [a, b], None, **kw), T([[S, 0.0], [S, 1.0]]))
    # ... mergekit slerps it at θ = π/2: sin(π/4)·a
    mk = both("nuslerp", [a, b], None, compat="mergekit", **kw)
    torch.testing.assert_close(mk, T([[S, 0.0], [S, 2 * S]]))
    # antiparallel column: lerp at t = 1/2
    c = T([[1.0], [1.0]])
    torch.testing.assert_close(both("nuslerp", [c, -2 * c], None, **kw), -0.5 * c)


def test_nuslerp_columns_of_a_3d_tensor_are_the_vectors_down_dimension_0():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5, 3, 2, generator=g)
    x1, x2 = base + torch.randn(5, 3, 2, generator=g), base + torch.randn(5, 3, 2, generator=g)
    out = both("nuslerp", [x1, x2], base, weight=[1.0, 0.5], flatten=False, row_wise=True)
    for j in range(3):
        for k in range(2):
            want = nuslerp([x1[:, j, k], x2[:, j, k]], base=base[:, j, k], weight=[1.0, 0.5])
            torch.testing.assert_close(out[:, j, k], want, rtol=1e-6, atol=1e-6)


def test_nuslerp_rows_with_antiparallel_and_zero_rows():
    a = T([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    b = T([[2.0, 0.0], [0.0, 1.0], [-1.0, -2.0]])
    out = both("nuslerp", [a, b], None, weight=[1.0, 1.0], flatten=False)
    # zero row: lerp; orthogonal row: sin(π/4)(a + b); antiparallel row: lerp = 0
    torch.testing.assert_close(out, T([[1.0, 0.0], [S, S], [0.0, 0.0]]))


def test_nuslerp_scalars_and_1d_tensors_are_one_vector():
    out = both("nuslerp", [T(1.01), T(0.97)], T(1.0), weight=[1.0, 1.0], flatten=False)
    torch.testing.assert_close(out, T(0.99))  # antiparallel task vectors: lerp
    v = T([1.0, 0.0, 0.0])
    w = T([0.0, 3.0, 0.0])
    out = both("nuslerp", [v, w], None, weight=[1.0, 1.0], flatten=False, row_wise=True)
    torch.testing.assert_close(out, S * (v + w))  # 1-D: the whole vector, even "by column"


# ---- multislerp, karcher -------------------------------------------------------------------------


def test_multislerp_antipodal_pair_falls_back_and_three_cancelling_inputs_are_refused():
    # units (1, 0) and (−1, 0) with equal weights cancel: the weighted sum, as mergekit
    out = both("multislerp", [T([2.0, 0.0]), T([-1.0, 0.0])], None, weight=[1.0, 1.0])
    torch.testing.assert_close(out, T([0.5, 0.0]))
    xs = [T([1.0, 0.0]), T([-0.5, math.sqrt(3) / 2]), T([-0.5, -math.sqrt(3) / 2])]
    with pytest.raises(UsageError, match="weighted mean direction is zero"):
        multislerp(xs, weight=[1.0, 1.0, 1.0])


def test_multislerp_of_scalars_keeps_the_sign_and_the_mean_norm():
    # units 1 and 1: the direction is 1, scaled by Σ w_i‖x_i‖ = 2.5
    torch.testing.assert_close(
        both("multislerp", [T(2.0), T(3.0)], None, weight=[1.0, 1.0]), T(2.5)
    )


def test_karcher_zero_inputs_antipodal_scalars_and_all_zero():
    # a zero input drops out of the mean but counts in the scale Σ α_i‖x_i‖ = (3 + 0)/2
    torch.testing.assert_close(
        both("karcher", [T([3.0, 0.0]), T([0.0, 0.0])], None, weight=[1.0, 1.0]), T([1.5, 0.0])
    )
    # antipodal scalars: no mean; the first direction (as mergekit), scale (2 + 4)/2
    torch.testing.assert_close(both("karcher", [T(-2.0), T(4.0)], None, weight=[1.0, 1.0]), T(-3.0))
    z = torch.zeros(3)
    assert torch.equal(both("karcher", [z, z], None, weight=[1.0, 1.0]), z)


def test_karcher_near_antipodal_refines_to_the_exact_mean():
    a = T([1.0, 0.0, 0.0])
    c = T([-1.0, -1e-7, 0.0])  # 1e-7 rad from antipodal: the mean is 0.3·(π − 1e-7) from a
    out = both("karcher", [a, c], None, weight=[0.7, 0.3])
    phi = 0.3 * (math.pi - 1e-7)
    torch.testing.assert_close(out, T([math.cos(phi), -math.sin(phi), 0.0]), rtol=0, atol=1e-6)


# ---- model stock ---------------------------------------------------------------------------------


def test_model_stock_scalars_zero_task_vectors_and_the_pole():
    # δ = 1 and 2: cos 1, t = 2·1/(1 + 1) = 1: the mean of the models
    torch.testing.assert_close(both("model_stock", [T(2.0), T(3.0)], T(1.0)), T(2.5))
    # a zero task vector: cos = 0/max(0, 1e−6) = 0, t = 0: the base
    base = T([1.0, 2.0])
    torch.testing.assert_close(both("model_stock", [base.clone(), base + 1], base), base)
    # δ = 1 and −1: cos −1; paper clamps c to 0 (warns), mergekit is at its pole: both the base
    with pytest.warns(MergeWarning, match="mean cosine -1 < 0"):
        assert torch.equal(model_stock([T(2.0), T(0.0)], base=T(1.0)), T(1.0))
    assert torch.equal(both("model_stock", [T(2.0), T(0.0)], T(1.0), compat="mergekit"), T(1.0))


def test_model_stock_filter_wise_warns_once_per_tensor_in_any_chunking():
    base = torch.zeros(3, 2)
    x1 = T([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    x2 = T([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])  # rows 1 and 2 point apart
    for chunk in (1, 2, 6):
        kernel = get_method("model_stock").kernel((3, 2), {"filter_wise": True}, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MergeWarning)
            out = chunked(kernel, [x1, x2], base, chunk)
        assert [str(w.message) for w in caught] == [
            "model_stock: a tensor has task vectors pointing apart (mean cosine -1 < 0 in 2 of "
            "3 rows); Model Stock needs cos > 0, so t is clamped to 0 there and the base is kept"
        ]
        torch.testing.assert_close(out, T([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))


# ---- SCE -----------------------------------------------------------------------------------------


def test_sce_keeps_exactly_k_variances_ties_in_index_order():
    base = torch.zeros(6)
    x1 = T([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    x2 = T([3.0, 3.0, 3.0, 3.0, 0.0, 0.0])
    # variances 1, 1, 1, 1, 0, 0: 4 nonzero, k = ⌊0.5·4⌋ = 2 of the tied four, lowest indices
    # energies mean(δ̃²) = 2/6 and 18/6 → w = 0.1, 0.9; both agree: 0.1·1 + 0.9·3 = 2.8
    out = both("sce", [x1, x2], base, select_topk=0.5)
    torch.testing.assert_close(out, T([2.8, 2.8, 0.0, 0.0, 0.0, 0.0]))


def test_sce_variance_is_torchs_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    d = (torch.randn(4, 999, generator=g) * torch.rand(4, 999, generator=g)).bfloat16().float()
    assert torch.equal(model_variance(list(d)), d.var(dim=0, unbiased=False))


def test_sce_of_one_model_or_zero_selection_is_the_base():
    base = T([0.5, -1.0, 2.0])
    x = T([1.0, 1.0, 1.0])
    # one model: every variance is 0, so k = 0 and nothing is selected
    assert torch.equal(both("sce", [x], base, select_topk=0.5), base)
    assert torch.equal(sce([x, x + 1], base=base, select_topk=0.1), base)  # ⌊0.1·3⌋ = 0


# ---- non-finite inputs through the engine ---------------------------------------------------------


@pytest.mark.parametrize(
    "name,step",
    [
        ("slerp", {"models": ["a"], "base": "base", "t": 0.5}),
        ("nuslerp", {"models": ["a", "b"], "base": "base", "flatten": False, "row_wise": True}),
        ("multislerp", {"models": ["a", "b"], "base": "base"}),
        ("karcher", {"models": ["a", "b"]}),
        ("model_stock", {"models": ["a", "b"], "base": "base"}),
        ("sce", {"models": ["a", "b"], "base": "base", "select_topk": 0.5}),
        ("ramplus_tl", {"models": ["a", "b"], "base": "base"}),
        ("arcee_fusion", {"models": ["a"], "base": "base"}),
    ],
)
def test_nan_in_a_later_chunk_is_refused_with_the_tensor_name(name: str, step: dict[str, Any]):
    g = torch.Generator().manual_seed(0)
    data = {k: {"w": torch.randn(8, 5, generator=g)} for k in ("base", "a", "b")}
    bad = step["models"][-1]
    data[bad]["w"][6, 2] = float("nan")  # element 32: the last chunk of 4
    used = [*step["models"], *(["base"] if "base" in step else [])]
    recipe = {
        "inputs": {k: f"<memory:{k}>" for k in used},
        "steps": {"out": {"method": name, **step}},
    }
    srcs = {k: MemorySource(data[k], f"<memory:{k}>") for k in used}
    engine = Engine(plan_recipe(recipe, preopened=srcs), chunk=4, quiet=True)
    who = f"model {len(step['models'])}"
    with pytest.raises(ExecutionError, match=f"method `{name}`: {who} has 1 NaN .* tensor `w`"):
        engine.to_memory()


# ---- arcee fusion: exact quartiles of signed scores ---------------------------------------------


@pytest.mark.parametrize("bin_limit", [1 << 22, 2])  # 2: the low-bits split and the cut pass
def test_streaming_top_k_ranks_signed_values(monkeypatch: pytest.MonkeyPatch, bin_limit: int):
    monkeypatch.setattr(selection, "BIN_LIMIT", bin_limit)
    monkeypatch.setattr(selection, "STREAM_SAMPLE", 32)
    g = torch.Generator().manual_seed(6)
    for trial in range(24):
        n = int(torch.randint(40, 300, (1,), generator=g))
        a = torch.randint(-6, 6, (n,), generator=g).float() * 0.25  # ties, both signs
        if trial % 2:
            a = torch.randn(n, generator=g)
        a[:: 5 + trial % 3] = -0.0  # −0 ranks as +0
        k = int(torch.randint(1, n, (1,), generator=g))
        s = selection.StreamingTopK(n, k, signed=True)
        while not s.done:
            for st in range(0, n, 7):
                s.observe(st, a[st : st + 7])
            s.end_pass()
        assert s.threshold == float(a.sort(descending=True).values[k - 1]), (trial, n, k)


def test_arcee_fusion_hand_worked_in_chunks_of_a_row():
    # Rows 1 and 2 unchanged (KL 0, scores 0); row 0 has KL k > 0, scores k·(1, 2, 3, 100).
    # Sorted: 0 ×8, k, 2k, 3k, 100k; indices ⌊q·11⌋ = 2, 5, 8 give Q1 = Q2 = 0, Q3 = k, so the
    # threshold 1.5k drops the change of 1 and keeps 2, 3, 100.
    base = torch.zeros(3, 4)
    x = T([[1.0, 2.0, 3.0, 100.0], [0.0] * 4, [0.0] * 4])
    want = T([[0.0, 2.0, 3.0, 100.0], [0.0] * 4, [0.0] * 4])
    torch.testing.assert_close(both("arcee_fusion", [x], base), want)
    # every row alike: sorted k·(1 1 1 2 2 2 3 3 3 100 100 100): Q1 = k, Q2 = 2k, Q3 = 3k,
    # threshold 2k + 1.5·2k = 5k keeps the 100s only
    x = T([[1.0, 2.0, 3.0, 100.0]] * 3)
    want = T([[0.0, 0.0, 0.0, 100.0]] * 3)
    torch.testing.assert_close(both("arcee_fusion", [x], base), want)


# ---- exact sums ----------------------------------------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "REDUCE_BLOCK", 16)
    monkeypatch.setattr(selection, "STREAM_SAMPLE", 32)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("cols", [1, 3, 7, 40])
def test_block_gram_is_exact_in_the_chunking_and_matches_float64(cols: int):
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(13 * cols, generator=g) for _ in range(3)]
    ref = torch.stack(
        [(xs[i].double() * xs[j].double()).reshape(13, cols).sum(0) for i, j in all_pairs(3)]
    )
    results = []
    for chunk in (1, 5, 16, 13 * cols):
        gram = BlockGram(3, cols=cols)
        for s in range(0, 13 * cols, chunk):
            gram.add([x[s : s + chunk] for x in xs])
        results.append(gram.total())
    assert all(torch.equal(r, results[0]) for r in results)
    torch.testing.assert_close(results[0], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("small_blocks")
def test_row_gram_gives_each_row_the_same_bits_in_any_chunk():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(11, 5, generator=g), torch.randn(11, 5, generator=g)
    whole = row_gram([a, b], 0)
    parts = torch.cat([row_gram([a[r : r + 3], b[r : r + 3]], r) for r in range(0, 11, 3)], 1)
    assert torch.equal(whole, parts)
    torch.testing.assert_close(whole[1], (a.double() * b.double()).sum(1), rtol=1e-12, atol=0)


def test_per_column_lays_coefficients_over_a_flat_chunk():
    v = T([10.0, 20.0, 30.0])
    assert per_column(v, 4, 5).tolist() == [20.0, 30.0, 10.0, 20.0, 30.0]  # columns 1 2 0 1 2


# ---- kernel state stays O(rows + cols) -------------------------------------------------------------


def _state_numel(obj: object, seen: set[int] | None = None) -> int:
    """Elements of every tensor reachable from a kernel's attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_state_numel(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_state_numel(v, seen) for v in obj)
    if isinstance(obj, Kernel) or type(obj).__module__.startswith("merge.methods"):
        return sum(_state_numel(v, seen) for v in vars(obj).values())
    return 0


KERNEL_CASES = [
    ("slerp", {"t": 0.3}),
    ("nuslerp", {"weight": [1.0, 0.5]}),
    ("nuslerp", {"weight": [1.0, 0.5], "flatten": False, "row_wise": True}),
    ("nuslerp", {"weight": [1.0, 0.5], "flatten": False, "row_wise": True, "compat": "mergekit"}),
    ("nuslerp", {"weight": [1.0, 0.5], "flatten": False}),
    ("multislerp", {"weight": [1.0, 0.5, 0.25]}),
    ("karcher", {"weight": [1.0, 0.5, 0.25]}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("sce", {"select_topk": 0.3}),
    ("ramplus_tl", {}),
    ("ties", {"weight": [1.0] * 3, "density": [0.3] * 3}),
    ("consensus", {"weight": [1.0] * 3, "tall_lambda": [0.6] * 3, "aggregate": "ties"}),
    ("arcee_fusion", {}),
]


def _peak_state(name: str, params: dict[str, Any], side: int) -> int:
    spec = get_method(name)
    g = torch.Generator().manual_seed(side)
    base = torch.randn(side, side, generator=g)
    n_models = len(params.get("weight", [])) or (1 if name in ("slerp", "arcee_fusion") else 3)
    if name == "nuslerp":
        n_models = 2
    xs = [base + 0.1 * torch.randn(side, side, generator=g) for _ in range(n_models)]
    assert spec.kernel is not None
    kernel = spec.kernel((side, side), params, None)
    flats, fb = [x.reshape(-1) for x in xs], base.reshape(-1)
    size = max(kernel.row, 1000 // kernel.row * kernel.row)
    bounds = [(s, min(side * side, s + size)) for s in range(0, side * side, size)]
    peak = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergeWarning)
        while kernel.needs_pass():
            for s, e in bounds:
                kernel.observe(s, [f[s:e] for f in flats], fb[s:e])
                peak = max(peak, _state_numel(kernel))
            kernel.end_pass()
            peak = max(peak, _state_numel(kernel))
        for s, e in bounds:
            kernel.apply(s, [f[s:e] for f in flats], fb[s:e])
            peak = max(peak, _state_numel(kernel))
    return peak


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(
    "name,params", KERNEL_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KERNEL_CASES)]
)
def test_kernel_state_grows_with_rows_and_columns_not_with_the_tensor(name, params):
    # 64² → 256² elements: a kept input or output would add ≥ 61440 elements; per-row and
    # per-column statistics add a few hundred per vector.
    growth = _peak_state(name, params, 256) - _peak_state(name, params, 64)
    assert growth <= 32 * (256 - 64) * 4, (name, growth)


def test_whole_and_chunked_runs_of_a_kernel_agree_on_a_larger_tensor():
    """A sanity check at the real block sizes (64K-element reductions, 1M-element samples)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(700, 300, generator=g)
    xs = [base + 0.02 * torch.randn(700, 300, generator=g) for _ in range(3)]
    for name, params in [
        ("model_stock", {}),
        ("sce", {"select_topk": 0.4}),
        ("multislerp", {"weight": [1.0, 2.0, 3.0]}),
    ]:
        spec = get_method(name)
        assert spec.kernel is not None
        whole = run_whole(spec.kernel(base.shape, params, None), xs, base)
        kernel = spec.kernel(base.shape, params, None)
        assert torch.equal(chunked(kernel, xs, base, 77_777), whole), name
