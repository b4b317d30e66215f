"""nearswap, SCE and RAM (mergekit's newer methods): hand-worked values."""

from __future__ import annotations

import torch

from merge.methods.nearswap import nearswap
from merge.methods.ram import ram
from merge.methods.sce import sce

T = torch.tensor


def test_nearswap_hand_worked():
    base, x = T([0.0, 0.0, 0.0]), T([0.05, 1.0, -4.0])
    # w = clamp(0.1/|base − x|, 0, 1) = [1, 0.1, 0.025]
    torch.testing.assert_close(nearswap([x], base=base, t=0.1), T([0.05, 0.1, -0.1]))


def test_ram_sums_unique_and_averages_shared():
    base = torch.zeros(3)
    x1, x2 = T([1.0, 2.0, 0.0]), T([3.0, 0.0, 0.0])
    # entry 0 shared → mean 2; entry 1 unique → 2; entry 2 inactive → base
    torch.testing.assert_close(ram([x1, x2], base=base), T([2.0, 2.0, 0.0]))


def test_sce_hand_worked():
    base = torch.zeros(3)
    x1, x2 = T([2.0, -1.0, 1.0]), T([1.0, 1.0, -3.0])
    # energy mean(δ²): (4+1+1)/3 = 2 and (1+1+9)/3 = 11/3 → w = 6/17, 11/17
    w1, w2 = 6 / 17, 11 / 17
    # elected signs of δ1 + δ2 = [3, 0, -2] → [+, +, −]; entry 1: only x2 (+1) agrees
    want = T([(w1 * 2 + w2 * 1) / (w1 + w2), 1.0, -3.0])
    torch.testing.assert_close(sce([x1, x2], base=base), want)
    # select_topk 1/3 keeps the highest-variance entry only (entry 2: var 4)
    torch.testing.assert_close(sce([x1, x2], base=base, select_topk=1 / 3), T([0.0, 0.0, -3.0]))
