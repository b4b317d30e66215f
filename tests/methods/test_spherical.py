"""SLERP, NuSLERP, multi-SLERP, Karcher, passthrough: hand-worked values and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from merge.errors import UsageError
from merge.methods.karcher import karcher
from merge.methods.passthrough import passthrough
from merge.methods.slerp import multislerp, nuslerp, slerp

T = torch.tensor


def test_slerp_hand_worked_quarter_turn():
    v0, v1 = T([1.0, 0.0, 0.0]), T([0.0, 2.0, 0.0])
    # Ω = π/2, sin Ω = 1: out = sin((1−t)π/2)·v0 + sin(tπ/2)·v1
    out = slerp([v1], base=v0, t=1 / 3)
    torch.testing.assert_close(out, T([math.sin(math.pi / 3), 2 * math.sin(math.pi / 6), 0.0]))


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    torch.testing.assert_close(slerp([a, b], t=0.0), a)
    torch.testing.assert_close(slerp([a, b], t=1.0), b)
    b = b * (a.norm() / b.norm())
    for t in (0.2, 0.5, 0.9):
        torch.testing.assert_close(slerp([a, b], t=t).norm(), a.norm())


def test_slerp_parallel_and_zero_vectors_fall_back_to_lerp():
    v = T([1.0, 2.0, 3.0])
    torch.testing.assert_close(slerp([v, 3 * v], t=0.25), 1.5 * v)  # 0.75·v + 0.25·3v
    torch.testing.assert_close(slerp([v, -v], t=0.25), 0.5 * v)  # anti-parallel: lerp too
    z = torch.zeros(3)
    torch.testing.assert_close(slerp([z, v], t=0.5), 0.5 * v)
    # mergekit leaves the zero vector unnormalised: Ω = π/2, so sin(π/4)·v
    torch.testing.assert_close(slerp([z, v], t=0.5, compat="mergekit"), math.sin(math.pi / 4) * v)


def test_slerp_model_count_errors():
    with pytest.raises(
        UsageError, match="method `slerp` takes exactly 2 models besides the base, got 3"
    ):
        slerp([torch.ones(2)] * 3)
    with pytest.raises(UsageError, match="takes exactly 1 model besides the base, got 2"):
        slerp([torch.ones(2)] * 2, base=torch.ones(2))


def test_nuslerp_weights_give_t_and_base_makes_it_task_space():
    base = T([1.0, 1.0, 0.0])
    x1, x2 = base + T([1.0, 0.0, 0.0]), base + T([0.0, 1.0, 0.0])
    # t = w2/(w1+w2) = 0.5 on δ1 ⊥ δ2: sin(π/4)(δ1 + δ2)
    out = nuslerp([x1, x2], base=base, weight=[1.0, 1.0])
    torch.testing.assert_close(out, base + math.sin(math.pi / 4) * T([1.0, 1.0, 0.0]))
    # zero weight sum → t = 0.5 as mergekit
    torch.testing.assert_close(nuslerp([x1, x2], base=base, weight=[1.0, -1.0]), out)


def test_nuslerp_row_wise_slerps_each_row():
    a = T([[1.0, 0.0], [1.0, 0.0]])
    b = T([[0.0, 1.0], [2.0, 0.0]])
    out = nuslerp([a, b], weight=[1.0, 1.0], flatten=False)
    s = math.sin(math.pi / 4)
    # row 0: orthogonal → sin(π/4)(a + b); row 1: parallel → lerp
    torch.testing.assert_close(out, T([[s, s], [1.5, 0.0]]))


def test_multislerp_two_orthogonal_unit_vectors():
    a, b = T([1.0, 0.0, 0.0]), T([0.0, 1.0, 0.0])
    # m̂ = (a+b)/√2, tangent components cancel → the midpoint direction, norm 1
    out = multislerp([a, b], weight=[1.0, 1.0])
    torch.testing.assert_close(out, T([1.0, 1.0, 0.0]) / math.sqrt(2), atol=1e-6, rtol=0)


def test_karcher_of_two_unit_vectors_is_slerp_half():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, generator=g), torch.randn(7, generator=g)
    a, b = a / a.norm(), b / b.norm()
    torch.testing.assert_close(karcher([a, b], weight=[1.0, 1.0]), slerp([a, b], t=0.5))


def test_karcher_honours_weights():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    # weights (3/4, 1/4): the weighted Fréchet mean on the circle is at angle π/8 from a
    out = karcher([a, b], weight=[3.0, 1.0], max_iter=100, tol=1e-9)
    torch.testing.assert_close(out, T([math.cos(math.pi / 8), math.sin(math.pi / 8)]))
    torch.testing.assert_close(slerp([a, b], t=0.25), out)
    # mergekit ignores the weights: the midpoint
    mk = karcher([a, b], weight=[3.0, 1.0], compat="mergekit")
    torch.testing.assert_close(mk, T([1.0, 1.0]) / math.sqrt(2))


def test_karcher_scales_by_weighted_norm():
    a, b = T([2.0, 0.0]), T([0.0, 4.0])
    out = karcher([a, b], weight=[1.0, 1.0])
    torch.testing.assert_close(out.norm(), T(3.0))


def test_passthrough_copies_and_scales():
    x = T([1.0, -2.0, 3.0])
    torch.testing.assert_close(passthrough([x], scale=[1.0]), x)
    torch.testing.assert_close(passthrough([x], scale=[0.5]), T([0.5, -1.0, 1.5]))
    with pytest.raises(UsageError, match="method `passthrough` takes exactly 1 model"):
        passthrough([x, x], scale=[1.0, 1.0])
