"""Model Stock, Consensus / TALL masks, TSV, Iso-C and Iso-CTS."""

from __future__ import annotations

import pytest
import torch

from merge.errors import UsageError
from merge.methods.consensus import consensus, tall_mask
from merge.methods.model_stock import model_stock
from merge.methods.svd_merge import iso_c, iso_cts, polar_factor, tsv, tsv_factors
from merge.methods.task_arithmetic import task_arithmetic

T = torch.tensor


def test_model_stock_hand_worked():
    base = T([0.0, 0.0, 1.0])
    x1, x2 = base + T([1.0, 0.0, 0.0]), base + T([1.0, 1.0, 0.0])
    # cos φ = 1/√2; t = 2c/(1 + c); out = t·mean(x) + (1−t)·base
    c = 1 / 2**0.5
    t = 2 * c / (1 + c)
    out = model_stock([x1, x2], base=base)
    torch.testing.assert_close(out, base + t * T([1.0, 0.5, 0.0]))


def test_model_stock_filter_wise_rows():
    base = torch.zeros(2, 2)
    x1 = T([[1.0, 0.0], [1.0, 0.0]])
    x2 = T([[0.0, 1.0], [1.0, 0.0]])
    # row 0 orthogonal → c = 0 → t = 0 → base row; row 1 parallel → t = 1 → mean row
    out = model_stock([x1, x2], base=base, filter_wise=True)
    torch.testing.assert_close(out, T([[0.0, 0.0], [1.0, 0.0]]))


def test_model_stock_needs_two_models():
    with pytest.raises(
        UsageError, match="method `model_stock` takes at least 2 models besides the base, got 1"
    ):
        model_stock([torch.ones(3)], base=torch.zeros(3))


def test_consensus_hand_worked():
    base = torch.zeros(3)
    d1, d2, d3 = T([1.0, 0.1, 0.0]), T([1.0, 0.0, 2.0]), T([-1.0, 0.05, 0.0])
    # τ_MTL = [1, 0.15, 2]; λ = 0.5: m_t = |τ_t| > 0.5·|τ_MTL − τ_t|
    #   m1 = [1 > 0, 0.1 > 0.025, 0 > 1] = [1, 1, 0]
    #   m2 = [1 > 0, 0 > 0.075, 2 > 0] = [1, 0, 1]
    #   m3 = [1 > 1, 0.05 > 0.05, 0 > 1] = [0, 0, 0]
    # votes [2, 1, 1]; k = 2 keeps entry 0 only
    out = consensus([d1, d2, d3], base=base, weight=[1.0] * 3, tall_lambda=[0.5] * 3, k=2)
    torch.testing.assert_close(out, T([1.0, 0.0, 0.0]))
    # TALL reconstruction of task 1 (index 1): m2 ⊙ τ_MTL
    rec = tall_mask([d1, d2, d3], base=base, weight=[1.0] * 3, tall_lambda=[0.5] * 3, task=1)
    torch.testing.assert_close(rec, T([1.0, 0.0, 2.0]))


def test_consensus_k0_is_task_arithmetic_and_large_k_is_base():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20, generator=g)
    xs = [base + torch.randn(20, generator=g) for _ in range(3)]
    w = [1.0, 0.5, 0.3]
    ta = task_arithmetic(xs, base=base, weight=w, scale=0.7)
    torch.testing.assert_close(
        consensus(xs, base=base, weight=w, tall_lambda=[0.6] * 3, k=0, scale=0.7), ta
    )
    torch.testing.assert_close(consensus(xs, base=base, weight=w, tall_lambda=[0.6] * 3, k=4), base)


def test_tsv_factors_are_orthonormal_and_single_task_full_rank_returns_tau():
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(6, 4, generator=g) for _ in range(2)]
    u, s, v = tsv_factors(deltas)
    # k = ⌊4/2⌋ = 2 per task → 4 columns
    torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=u.dtype))
    torch.testing.assert_close(v.T @ v, torch.eye(4, dtype=v.dtype))
    assert s.shape == (4,)
    base = torch.randn(6, 4, generator=g)
    torch.testing.assert_close(tsv([base + deltas[0]], base=base), base + deltas[0])


def test_tsv_orthogonal_tasks_hand_worked():
    base = torch.zeros(3, 3)
    d1 = torch.diag(T([3.0, 0.0, 0.0]))
    d2 = torch.diag(T([0.0, 2.0, 0.0]))
    # k = ⌊3/2⌋ = 1 per task; task singular vectors e1 and e2 are already orthogonal → d1 + d2
    torch.testing.assert_close(tsv([d1, d2], base=base, scale=2.0), 2.0 * (d1 + d2))


def test_iso_c_flattens_the_spectrum():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(8, 5, generator=g)
    xs = [base + torch.randn(8, 5, generator=g) for _ in range(3)]
    out = iso_c(xs, base=base)
    sigma = torch.linalg.svdvals(out - base)
    total = torch.linalg.svdvals(sum(x - base for x in xs))
    torch.testing.assert_close(sigma, torch.full((5,), float(total.mean())), rtol=1e-5, atol=1e-5)


def test_iso_c_hand_worked_diagonal():
    d = torch.diag(T([4.0, 2.0]))
    # σ = (4, 2) → σ̄ = 3, U Vᵀ = I
    torch.testing.assert_close(iso_c([d], base=torch.zeros(2, 2)), 3.0 * torch.eye(2))


def test_iso_c_one_dimensional_tensors_take_the_mean():
    base = T([1.0, 1.0, 1.0])
    out = iso_c([base + T([1.0, 2.0, 3.0]), base + T([3.0, 2.0, 1.0])], base=base)
    torch.testing.assert_close(out, base + T([2.0, 2.0, 2.0]))


def test_iso_cts_isotropic_and_orthonormal():
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(10, 10)
    xs = [torch.randn(10, 10, generator=g) for _ in range(2)]
    out = iso_cts(xs, base=base, common_space_fraction=0.8)
    s = torch.linalg.svdvals(out)
    # full rank r = 10: k = 8 common + 1 per task; all singular values equal
    torch.testing.assert_close(s, torch.full((10,), float(s.mean())), rtol=1e-5, atol=1e-5)


def test_polar_factor_of_orthonormal_is_itself():
    q, _ = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))
    torch.testing.assert_close(polar_factor(q), q)


def test_iso_cts_hand_worked_one_task():
    d = torch.diag(T([4.0, 2.0]))
    # r = 2, f = 0.5: k = 1 common direction (e1, σ 4); the residual diag(0, 2) gives e2 (σ 2);
    # U = V = I after orthogonalisation, every σ set to the mean 3
    torch.testing.assert_close(
        iso_cts([d], base=torch.zeros(2, 2), common_space_fraction=0.5), 3.0 * torch.eye(2)
    )


def test_linear_and_task_arithmetic_hand_worked_and_peft():
    from peft.utils import merge_utils

    from merge.methods.linear import linear

    x1, x2 = T([1.0, 2.0, 3.0]), T([3.0, 0.0, -1.0])
    # (1·x1 + 3·x2)/4
    torch.testing.assert_close(linear([x1, x2], weight=[1.0, 3.0]), T([2.5, 0.5, 0.0]))
    base = T([1.0, 1.0, 1.0])
    # base + 0.5·(1·[0, 1, 2] + 2·[2, −1, −2]) = base + 0.5·[4, −1, −2]
    out = task_arithmetic([x1, x2], base=base, weight=[1.0, 2.0], scale=0.5)
    torch.testing.assert_close(out, T([3.0, 0.5, 0.0]))
    ref = merge_utils.task_arithmetic([x1 - base, x2 - base], T([1.0, 2.0]))
    torch.testing.assert_close(out, base + 0.5 * ref)
