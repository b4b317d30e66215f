"""compat: mergekit against mergekit itself (skipped unless `mergekit` is importable).

Run with mergekit 0.1.5 unpacked on PYTHONPATH (`pip download mergekit --no-deps`, unzip) or
installed as a test-only extra. Deterministic methods only; inputs in float32, where mergekit
computes in the input dtype, so the comparison is at float32 tolerance.
"""

from __future__ import annotations

import pytest
import torch

mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.karcher import karcher_merge_tensors  # noqa: E402
from mergekit.merge_methods.nuslerp import nuslerp as mk_nuslerp  # noqa: E402
from mergekit.merge_methods.slerp import slerp as mk_slerp  # noqa: E402

from merge.methods import get_method  # noqa: E402

G = torch.Generator().manual_seed(0)
BASE = torch.randn(12, 9, generator=G)
XS = [BASE + torch.randn(12, 9, generator=G) * s for s in (0.5, 0.3, 0.7)]
W = [1.0, 0.6, 0.3]


def _gta(name: str, **params: object) -> torch.Tensor:
    method = mk_registry.get(name)
    group = TensorGroup.from_tensors([BASE, *XS], base_index=0)
    defaults = {p.name: p.default for p in method.spec.parameters if p.default is not None}
    per = {
        "weight": dict(enumerate(W, 1)),
        "density": {1: 0.4, 2: 0.5, 3: 0.3},
        "gamma": {1: 0.05, 2: 0.1, 3: 0.02},
    }
    full = {
        **defaults,
        **{k: v for k, v in per.items() if any(p.name == k for p in method.spec.parameters)},
        **params,
    }
    return method.merge_group(group, **full)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gta_methods_match_mergekit(name, normalize):
    ref = _gta(name, normalize=normalize, **{"lambda": 0.8})
    spec = get_method(name)
    kw: dict[str, object] = {"base": BASE, "weight": W, "scale": 0.8}
    if "density" in spec.per_model:
        kw["density"] = [0.4, 0.5, 0.3]
    if "gamma" in spec.per_model:
        kw["gamma"] = [0.05, 0.1, 0.02]
    if "normalize" in spec.global_params:
        kw["normalize"] = normalize
    elif normalize:
        # mergekit's normalize divides the summed deltas by Σw; without the flag, pass w / Σw.
        kw["weight"] = [w / sum(W) for w in W]
    if "compat" in spec.global_params:
        kw["compat"] = "mergekit"
    torch.testing.assert_close(spec.fn(XS, **kw), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_mergekit(t):
    ref = mk_slerp(torch.tensor([t]), BASE[None], XS[0][None])[0]
    ours = get_method("slerp").fn([XS[0]], base=BASE, t=t, compat="mergekit")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False)])
def test_nuslerp_matches_mergekit(row_wise, flatten):
    t = W[1] / (W[0] + W[1])
    ref = BASE + mk_nuslerp(
        t, XS[0] - BASE, XS[1] - BASE, dim=0 if row_wise else -1, flatten=flatten
    )
    ours = get_method("nuslerp").fn(
        XS[:2], base=BASE, weight=W[:2], row_wise=row_wise, flatten=flatten
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_karcher_matches_mergekit_uniform_weights():
    ref = karcher_merge_tensors(list(XS), [1 / 3] * 3)
    ours = get_method("karcher").fn(XS, weight=W, compat="mergekit")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(filter_wise):
    group = TensorGroup.from_tensors([BASE, *XS], base_index=0)
    ref = mk_registry.get("model_stock").merge_group(group, filter_wise=filter_wise)
    ours = get_method("model_stock").fn(XS, base=BASE, filter_wise=filter_wise, compat="mergekit")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,params",
    [("nearswap", {"t": 0.4}), ("sce", {"select_topk": 0.5}), ("sce", {}), ("ram", {})],
)
def test_newer_methods_match_mergekit(name, params):
    group = TensorGroup.from_tensors([BASE, *(XS[:1] if name == "nearswap" else XS)], base_index=0)
    mk = mk_registry.get(name)
    defaults = {p.name: p.default for p in mk.spec.parameters if p.default is not None}
    ref = mk.merge_group(group, **{**defaults, **params})
    ours = get_method(name).fn(XS[:1] if name == "nearswap" else XS, base=BASE, **params)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _mk_group(xs: list[torch.Tensor], base: torch.Tensor, dtype: torch.dtype) -> TensorGroup:
    return TensorGroup.from_tensors([base.to(dtype), *(x.to(dtype) for x in xs)], base_index=0)


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_bf16_config_matches_mergekit_within_bf16_rounding(name):
    # mergekit casts inputs to the config's dtype and trims bf16 task vectors, whose magnitudes
    # tie often; `compute_dtype` reproduces that, so only the final rounding differs.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(96, 64, generator=g) * 0.02
    xs = [base + torch.randn(96, 64, generator=g) * 0.002 for _ in range(3)]
    mk = mk_registry.get(name)
    defaults = {p.name: p.default for p in mk.spec.parameters if p.default is not None}
    per = {"weight": {1: 1.0, 2: 0.6, 3: 0.3}, "density": {1: 0.3, 2: 0.5, 3: 0.2}}
    if any(p.name == "gamma" for p in mk.spec.parameters):
        per["gamma"] = {1: 0.05, 2: 0.1, 3: 0.02}
    ref = mk.merge_group(_mk_group(xs, base, torch.bfloat16), **{**defaults, **per})
    assert ref.dtype == torch.bfloat16
    kw: dict[str, object] = {
        "base": base,
        "weight": [1.0, 0.6, 0.3],
        "density": [0.3, 0.5, 0.2],
        "compat": "mergekit",
        "compute_dtype": "bfloat16",
        **({"gamma": [0.05, 0.1, 0.02]} if "gamma" in per else {}),
    }
    ours = get_method(name).fn(xs, **kw).to(torch.bfloat16)
    # Within bf16 rounding: mergekit rounds base, task vectors and sums to bf16 along the way,
    # we round once, so entries differ by at most one bf16 step (2^-7) of the tensor's range
    # (measured: 0.30% ties, 0.59% breadcrumbs; without compute_dtype 7-11%).
    span = float(ref.float().abs().max())
    diff = (ours.float() - ref.float()).abs()
    assert float(diff.max()) <= 2**-7 * span
    # Without the compute dtype, trimming picks other entries among the ties: far off.
    off = get_method(name).fn(xs, **{**kw, "compute_dtype": None}).to(torch.bfloat16)
    assert float((off.float() - ref.float()).abs().max()) > 0.05 * span


@pytest.mark.parametrize("name", ["ties", "breadcrumbs"])
def test_constant_tensors_trim_exactly_k_as_mergekit(name):
    # A norm weight moved by the same amount everywhere: every |δ| ties, so a threshold keeps
    # all of them and mergekit's sort keeps exactly k (the first k by its sort order).
    base = torch.ones(64)
    xs = [torch.full((64,), 1.5), torch.full((64,), 0.75)]
    mk = mk_registry.get(name)
    defaults = {p.name: p.default for p in mk.spec.parameters if p.default is not None}
    per = {"weight": {1: 1.0, 2: 1.0}, "density": {1: 0.5, 2: 0.25}}
    if name == "breadcrumbs":
        per["gamma"] = {1: 0.1, 2: 0.1}
    ref = mk.merge_group(_mk_group(xs, base, torch.float32), **{**defaults, **per})
    kw: dict[str, object] = {"base": base, "weight": [1.0, 1.0], "density": [0.5, 0.25]}
    if name == "breadcrumbs":
        kw["gamma"] = [0.1, 0.1]
    ours = get_method(name).fn(xs, **kw, compat="mergekit")
    assert torch.equal(ours, ref)
    if name == "ties":  # 32 of the +0.5 moves survive trimming; a threshold would keep all 64
        assert int((ours == 1.5).sum()) == 32
