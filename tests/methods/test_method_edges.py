"""Edge cases found by the method audits (issue 14.1, 14.6, 14.7; issue 15.19).

Each test states the hand-worked value or writes the reference's formula out.
"""

from __future__ import annotations

import math

import pytest
import torch

from merge.errors import ExecutionError, MergeWarning
from merge.methods import get_method
from merge.methods._checks import check_finite
from merge.methods.consensus import consensus, tall_mask
from merge.methods.karcher import karcher
from merge.methods.model_stock import model_stock
from merge.methods.slerp import multislerp, nuslerp, slerp
from merge.methods.svd_merge import iso_c, iso_cts, polar_factor, tsv

T = torch.tensor


# -- 14.1 nuslerp on (anti)parallel vectors --------------------------------------------------


def test_nuslerp_antiparallel_scalars_lerp_instead_of_dividing_by_sin_pi():
    b = T(1.0)
    # δ1 = 0.01, δ2 = −0.03: cos θ = −1, so lerp at t = 1/2: 1 + (0.01 − 0.03)/2 = 0.99.
    # In float32 sin(acos(−1)) = −8.7e−8, and dividing by it gave 228774.
    out = nuslerp([b + 0.01, b - 0.03], base=b, weight=[1.0, 1.0])
    torch.testing.assert_close(out, T(0.99))


def test_nuslerp_rows_of_length_one_and_near_antiparallel_rows_lerp():
    base = torch.zeros(3, 1)
    x1 = T([[0.01], [2.0], [-1.0]])
    x2 = T([[-0.03], [-1.0], [3.0]])
    # every row is a 1-vector: cos = ±1 per row, lerp at t = w2/(w1+w2) = 0.25
    out = nuslerp([x1, x2], base=base, weight=[3.0, 1.0], flatten=False)
    torch.testing.assert_close(out, 0.75 * x1 + 0.25 * x2)
    # |cos| = 0.99995 > 0.9995: lerp (as slerp), not a division by sin θ ≈ 0.01
    a = T([1.0, 0.0])
    c = T([-1.0, 0.01])
    torch.testing.assert_close(nuslerp([a, c], weight=[1.0, 1.0]), 0.5 * (a + c))


def test_nuslerp_zero_rows_lerp_in_paper_mode_and_slerp_at_right_angle_for_mergekit():
    a = T([[0.0, 0.0], [1.0, 0.0]])
    b = T([[2.0, 0.0], [0.0, 1.0]])
    s = math.sin(math.pi / 4)
    # row 0: a zero vector → lerp 0.5·b (as `slerp`); row 1: orthogonal → sin(π/4)(a + b)
    paper = nuslerp([a, b], weight=[1.0, 1.0], flatten=False)
    torch.testing.assert_close(paper, T([[1.0, 0.0], [s, s]]))
    # mergekit normalises by max(‖v‖, 1e−7): cos = 0, θ = π/2, so sin(π/4)·b on row 0
    mk = nuslerp([a, b], weight=[1.0, 1.0], flatten=False, compat="mergekit")
    torch.testing.assert_close(mk, T([[2 * s, 0.0], [s, s]]))


def test_nuslerp_edge_cases_match_mergekit():
    mk = pytest.importorskip("mergekit.merge_methods.nuslerp")
    b = T(1.0)
    ref = b + mk.nuslerp(0.5, T(0.01), T(-0.03), flatten=True)
    torch.testing.assert_close(nuslerp([b + 0.01, b - 0.03], base=b, weight=[1.0, 1.0]), ref)
    a = T([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    c = T([[2.0, 0.0], [0.0, 1.0], [-1.0, -2.0]])
    ref = mk.nuslerp(0.3, a, c, flatten=False)
    ours = nuslerp([a, c], weight=[0.7, 0.3], flatten=False, compat="mergekit")
    torch.testing.assert_close(ours[:2], ref[:2])
    # row 2 is antiparallel but float32 rounds cos to −0.99999994, so mergekit slerps at
    # θ = π − 3.5e−4 with a float32 acos (ours: the same rule, angle in float64): 3e−4 apart
    torch.testing.assert_close(ours[2], ref[2], rtol=0, atol=1e-3)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("gap", [0.0, 1e-7, 1e-4, 1e-2])
def test_spherical_siblings_stay_bounded_near_parallel_and_antiparallel(sign, gap):
    # Interpolating two unit vectors never leaves the unit ball (slerp stays on the sphere,
    # lerp inside it); a division by a tiny sin θ would leave it by orders of magnitude.
    # (Unequal norms are another matter: slerp applies sin((1−t)Ω)/sin Ω to the unnormalised
    # vectors, as mergekit does, which amplifies ‖v0‖ − ‖v1‖ near Ω = π; see docs/methods.md.)
    a = T([1.0, 0.0, 0.0])
    c = sign * T([1.0, gap, 0.0]) / math.hypot(1.0, gap)
    bound = 1.001  # float32 angles near π (mergekit mode) are 3e-4 off; a blow-up is ≫ 1
    outs = {
        "slerp": slerp([a, c], t=0.3),
        "nuslerp": nuslerp([a, c], weight=[0.7, 0.3]),
        "nuslerp mergekit": nuslerp([a, c], weight=[0.7, 0.3], compat="mergekit"),
        "nuslerp rows": nuslerp([a[None], c[None]], weight=[0.7, 0.3], flatten=False),
        "multislerp": multislerp([a, c], weight=[0.7, 0.3]),
        "karcher": karcher([a, c], weight=[0.7, 0.3]),
    }
    for name, out in outs.items():
        assert bool(torch.isfinite(out).all()), name
        assert float(out.norm()) <= bound, (name, out)


# -- 14.7 non-finite inputs: one shared refusal ----------------------------------------------

_G = torch.Generator().manual_seed(3)
_BASE = torch.randn(4, 3, generator=_G)
_XS = [_BASE + torch.randn(4, 3, generator=_G) for _ in range(2)]


def _call(name: str, tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    spec = get_method(name)
    if name == "slerp":
        return spec.fn(tensors, t=0.5)
    kw: dict[str, object] = {p: [1.0 if d is None else d] * 2 for p, d in spec.per_model.items()}
    if spec.accepts_base:
        kw["base"] = base
    return spec.fn(tensors, **kw)


@pytest.mark.parametrize(
    "name",
    [
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "model_stock",
        "consensus",
        "tall_mask",
        "tsv",
        "iso_c",
        "iso_cts",
        "fisher",
        "regmean",
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused_by_every_method(name, bad):
    xs = [x.clone() for x in _XS]
    xs[1][2, 1] = bad
    kind = "NaN" if math.isnan(bad) else "inf"
    counts = "1 NaN and 0 inf value" if kind == "NaN" else "0 NaN and 1 inf value"
    if name == "fisher":
        with pytest.raises(ExecutionError, match=f"method `fisher`: model 2 has {counts}"):
            get_method("fisher").fn(xs, weight=[1.0, 1.0], statistics=[torch.ones(4, 3)] * 2)
        return
    with pytest.raises(ExecutionError, match=f"method `{name}`: model 2 has {counts};"):
        _call(name, xs, _BASE)


def test_check_finite_names_the_base_and_the_tensor():
    base = T([1.0, float("nan"), float("-inf"), float("nan")])
    with pytest.raises(
        ExecutionError,
        match=r"method `ties`: the base has 2 NaN and 1 inf values in tensor `h\.0\.w`; .*"
        "repair or drop that checkpoint",
    ):
        check_finite("ties", [torch.ones(4)], base, tensor_name="h.0.w")
    check_finite("ties", [torch.ones(4)], torch.zeros(4))  # finite: no error


# -- 14.7 model_stock outside its geometry -------------------------------------------------


def test_model_stock_negative_cosine_keeps_the_base_with_a_warning():
    base = T([0.5, -0.5])
    d1 = T([1.0, 0.0])
    d2 = T([-1.0, math.sqrt(1 / 0.999**2 - 1)])  # cos(δ1, δ2) = −0.999
    # unclamped t = 2c/(1 + c) = −1998: the output would be 1998 task vectors away from base
    with pytest.warns(MergeWarning, match=r"mean cosine -0\.999 < 0\); Model Stock needs cos > 0"):
        out = model_stock([base + d1, base + d2], base=base)
    torch.testing.assert_close(out, base)
    # compat mergekit keeps its unclamped formula: t·mean + (1 − t)·base
    t = 2 * -0.999 / (1 - 0.999)
    mk = model_stock([base + d1, base + d2], base=base, compat="mergekit")
    torch.testing.assert_close(mk, base + t * (d1 + d2) / 2, rtol=1e-3, atol=1e-3)


def test_model_stock_filter_wise_clamps_rows_and_names_the_tensor():
    base = torch.zeros(2, 2)
    x1 = T([[1.0, 0.0], [1.0, 0.0]])
    x2 = T([[0.0, 1.0], [-1.0, 0.0]])  # row 0: cos 0 → t 0; row 1: cos −1 → clamped → t 0
    x3 = T([[1.0, 0.0], [1.0, 0.0]])
    with pytest.warns(MergeWarning, match=r"tensor `l\.w` .* in 1 of 2 rows"):
        out = model_stock([x1, x2, x3], base=base, filter_wise=True, tensor_name="l.w")
    # row 0: pairwise cos (0, 1, 0) → c = 1/3, t = 3c/(1 + 2c) = 3/5; mean = (2/3, 1/3)
    # row 1: pairwise cos (−1, 1, −1) → c = −1/3 → 0: the base
    torch.testing.assert_close(out, T([[0.6 * 2 / 3, 0.6 / 3], [0.0, 0.0]]))


# -- 14.6 consensus / TALL masks with TIES, Iso-CTS ranks ------------------------------------


def _reference_ties_dis_sum(tvs: torch.Tensor, top: float = 0.2) -> torch.Tensor:
    """tall_masks' ties_merging(tvs, reset_thresh=20, merge_func="dis-sum"), written out."""
    n = tvs.shape[1]
    kth = tvs.abs().kthvalue(n - int(n * top), dim=1, keepdim=True).values
    trimmed = tvs * (tvs.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum()) if sign.sum() != 0 else 1.0  # "majority"
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    return (trimmed * agree).sum(0)


def test_tall_mask_ties_aggregate_trims_the_top_20_percent_as_the_reference():
    base = torch.zeros(10)
    t1 = T([9.0, -8.0, 7.0, 0.5, 0.4, -0.3, 0.2, 0.1, 0.05, 0.01])
    t2 = T([-1.0, 6.0, 0.6, -5.0, 4.0, 0.3, -0.2, 0.1, 0.0, 0.02])
    # hand-worked: each task keeps its ⌊0.2·10⌋ + 1 = 3 largest |τ| (the reference's kthvalue)
    # t1 → [9, −8, 7, 0...], t2 → [0, 6, 0, −5, 4, 0...]; signs of the sum: [+, −, +, −, +, 0...]
    # dis-sum: [9, −8, 7, −5, 4, 0, ...]
    mtl = T([9.0, -8.0, 7.0, -5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(_reference_ties_dis_sum(torch.stack([t1, t2])), mtl)
    lam = [0.6, 0.6]
    out = tall_mask([t1, t2], base=base, weight=[1.0, 1.0], tall_lambda=lam, aggregate="ties")
    m1 = t1.abs() > 0.6 * (mtl - t1).abs()
    torch.testing.assert_close(out, torch.where(m1, mtl, 0.0))
    cons = consensus([t1, t2], base=base, weight=[1.0, 1.0], tall_lambda=lam, aggregate="ties")
    m2 = t2.abs() > 0.6 * (mtl - t2).abs()
    torch.testing.assert_close(cons, torch.where(m1.float() + m2.float() >= 2, mtl, 0.0))


def test_consensus_ties_matches_the_reference_on_random_task_vectors():
    g = torch.Generator().manual_seed(5)
    tvs = torch.randn(4, 500, generator=g)
    base = torch.randn(500, generator=g)
    mtl = _reference_ties_dis_sum(tvs)
    masks = tvs.abs() > (mtl - tvs).abs() * 0.4
    ref = base + torch.where(masks.sum(0) >= 2, mtl, 0.0)
    out = consensus(
        list(base + tvs), base=base, weight=[1.0] * 4, tall_lambda=[0.4] * 4, aggregate="ties"
    )
    torch.testing.assert_close(out, ref)


def _reference_iso_cts(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """iso-merging's iso_cts for one layer, written out (float64 here)."""
    r = min(deltas[0].shape)
    n_tasks = len(deltas)
    common = int(r * fraction)
    specific_total = round((r - common) / n_tasks) * n_tasks
    common = r - specific_total
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    per = specific_total // n_tasks
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common]]
    for d in deltas:
        w = d - u[:, :common] @ u[:, :common].T @ d
        ut, st, vt = torch.linalg.svd(w, full_matrices=False)
        us.append(ut[:, :per])
        ss.append(st[:per])
        vs.append(vt[:per])
    uu = polar_factor(torch.cat(us, dim=1))
    vv = polar_factor(torch.cat(vs, dim=0).T)
    return torch.cat(ss).mean() * uu @ vv.T


def test_iso_cts_rounds_the_per_task_rank_as_the_reference():
    # r = 16, T = 5, f = 0.8: k = 12, (16 − 12)/5 = 0.8 → round 1 per task (floor gave 0, so
    # no task-specific directions at all and the result was Iso-C). ViT-B, 20 tasks: 7.7 → 8.
    g = torch.Generator().manual_seed(7)
    base = torch.randn(16, 20, generator=g)
    deltas = [torch.randn(16, 20, generator=g, dtype=torch.float64) for _ in range(5)]
    out = iso_cts([base + d.float() for d in deltas], base=base)
    ref = base + _reference_iso_cts(deltas, 0.8).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, iso_c([base + d.float() for d in deltas], base=base))


# -- issue 15.19: same bytes whatever the thread count --------------------------------------


@pytest.mark.parametrize("fn", [iso_c, iso_cts, tsv])
def test_svd_merges_give_the_same_bytes_with_one_and_two_threads(fn):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(96, 160, generator=g)
    xs = [base + 0.05 * torch.randn(96, 160, generator=g) for _ in range(3)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn(xs, base=base)
        torch.set_num_threads(2)
        two = fn(xs, base=base)
        assert torch.get_num_threads() == 2  # restored after the one-thread SVD
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
