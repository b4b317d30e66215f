"""Small experiments as tests: task arithmetic vs averaging, and a sign-conflict case for TIES."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merge.methods.linear import linear
from merge.methods.task_arithmetic import task_arithmetic
from merge.methods.ties import ties

N_TASKS, DIM, BLOCK, CLASSES = 4, 32, 8, 4


def task_data(task: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Task t: clustered points in its own 8-feature block (zeros elsewhere), 4 classes."""
    g = torch.Generator().manual_seed(100 + task)
    centres = torch.randn(CLASSES * 3, BLOCK, generator=g) * 1.5  # the task, fixed by `task`
    labels = torch.arange(CLASSES).repeat_interleave(3)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(centres), (n,), generator=g)
    x = torch.zeros(n, DIM)
    x[:, task * BLOCK : (task + 1) * BLOCK] = centres[pick] + 0.5 * torch.randn(
        n, BLOCK, generator=g
    )
    return x, labels[pick]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, CLASSES))


def fit(model: nn.Module, x: Tensor, y: Tensor, steps: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mean_accuracy(
    model: nn.Module, state: dict[str, Tensor], data: list[tuple[Tensor, Tensor]]
) -> float:
    model.load_state_dict(state)
    with torch.no_grad():
        return sum(float((model(x).argmax(-1) == y).float().mean()) for x, y in data) / len(data)


def test_task_arithmetic_beats_plain_averaging():
    torch.manual_seed(0)
    base_model = mlp()
    # "pre-training" on a generic task over all features, so the base is a real starting point
    xp = torch.randn(2000, DIM)
    yp = (xp[:, ::8].sum(1) > 0).long() + 2 * (xp[:, 1::8].sum(1) > 0).long()
    base = fit(base_model, xp, yp, 200, seed=1)
    tuned = []
    for t in range(N_TASKS):
        m = mlp()
        m.load_state_dict(base)
        tuned.append(fit(m, *task_data(t, 1000, seed=1), 150, seed=10 + t))
    val = [task_data(t, 300, seed=2) for t in range(N_TASKS)]
    test = [task_data(t, 1000, seed=3) for t in range(N_TASKS)]
    ev = mlp()
    ones = [1.0] * N_TASKS

    average = {k: linear([s[k] for s in tuned], weight=ones) for k in base}

    def ta(lam: float) -> dict[str, Tensor]:
        return {
            k: task_arithmetic([s[k] for s in tuned], base=base[k], weight=ones, scale=lam)
            for k in base
        }

    # λ chosen on validation, as in Ilharco et al.
    lam = max((0.2, 0.4, 0.6, 0.8, 1.0), key=lambda v: mean_accuracy(ev, ta(v), val))
    acc_avg = mean_accuracy(ev, average, test)
    acc_ta = mean_accuracy(ev, ta(lam), test)
    acc_ft = sum(mean_accuracy(ev, tuned[t], [test[t]]) for t in range(N_TASKS)) / N_TASKS
    assert acc_ft > 0.95  # the fine-tunes learned their tasks
    assert acc_ta > acc_avg + 0.2, (acc_ta, acc_avg)  # measured: 0.71 vs 0.31


def test_ties_beats_task_arithmetic_under_sign_conflicts():
    """Linear classifiers sign(w·x), base w = 0; task A lives on features 0..19, B on 20..39.

    Each fine-tune's vector is its true direction (±1 on its own block) plus smaller noise of
    random sign on the *other* task's block (|noise| < 1, so half of it conflicts in sign).
    TIES at density 0.5 keeps exactly the ±1 entries, so it recovers a + b and classifies both
    tasks perfectly. Task arithmetic adds the noise; for any λ > 0 its direction on block A is
    a + n_B, so its accuracy is 1 − angle(a, a + n_B)/π < 1, whatever λ.
    """
    g = torch.Generator().manual_seed(0)
    half = 20
    a = torch.randint(0, 2, (half,), generator=g).float() * 2 - 1
    b = torch.randint(0, 2, (half,), generator=g).float() * 2 - 1
    noise_a = (torch.rand(half, generator=g) * 0.9) * (
        torch.randint(0, 2, (half,), generator=g) * 2 - 1
    )
    noise_b = (torch.rand(half, generator=g) * 0.9) * (
        torch.randint(0, 2, (half,), generator=g) * 2 - 1
    )
    base = torch.zeros(2 * half)
    tau_a = torch.cat([a, noise_a])  # task A: true direction on block A, noise on block B
    tau_b = torch.cat([noise_b, b])

    def accuracy(w: Tensor) -> float:
        xa = torch.cat([torch.randn(4000, half, generator=g), torch.zeros(4000, half)], 1)
        xb = torch.cat([torch.zeros(4000, half), torch.randn(4000, half, generator=g)], 1)
        acc_a = float(((xa @ w).sign() == (xa @ torch.cat([a, 0 * b])).sign()).float().mean())
        acc_b = float(((xb @ w).sign() == (xb @ torch.cat([0 * a, b])).sign()).float().mean())
        return (acc_a + acc_b) / 2

    merged_ties = ties(
        [base + tau_a, base + tau_b], base=base, weight=[1.0, 1.0], density=[0.5, 0.5]
    )
    torch.testing.assert_close(merged_ties, torch.cat([a, b]))  # exact recovery
    assert accuracy(merged_ties) == 1.0
    # With some noise surviving the trim (density 0.75), the sign election still drops the
    # conflicting half; TIES stays near perfect.
    dense = ties([base + tau_a, base + tau_b], base=base, weight=[1.0, 1.0], density=[0.75, 0.75])
    assert accuracy(dense) > 0.93

    for lam in (0.3, 0.5, 1.0, 2.0):
        merged_ta = task_arithmetic(
            [base + tau_a, base + tau_b], base=base, weight=[1.0, 1.0], scale=lam
        )
        cos_a = float(F.cosine_similarity(a, a + noise_b, dim=0))
        cos_b = float(F.cosine_similarity(b, b + noise_a, dim=0))
        predicted = 1 - (math.acos(cos_a) + math.acos(cos_b)) / (2 * math.pi)
        acc = accuracy(merged_ta)
        assert abs(acc - predicted) < 0.03, (acc, predicted)  # the angle formula, measured
        assert acc < 0.95 < accuracy(dense), (lam, acc)
