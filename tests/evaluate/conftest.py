"""Session fixtures for the evaluation tests: small models trained once, saved as checkpoints."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import evaluate_entry as entry
import pytest
import torch
from torch import nn

from merge.io import save_state_dict
from merge.toy import batches, make_mlp, synthetic_classification, train

ENTRY = str(Path(entry.__file__))


@dataclass
class Pair:
    a: nn.Module
    b: nn.Module
    path_a: Path
    path_b: Path


@pytest.fixture(scope="session")
def mlp_pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """Two MLPs trained on one task from different seeds (init and batch order)."""
    data = entry.train_data()
    a = train(_seeded(entry.make_model, 1), data, steps=200, lr=3e-3, seed=1)
    b = train(_seeded(entry.make_model, 2), data, steps=200, lr=3e-3, seed=2)
    root = tmp_path_factory.mktemp("mlp")
    return Pair(
        a,
        b,
        save_state_dict(a.state_dict(), root / "a"),
        save_state_dict(b.state_dict(), root / "b"),
    )


@pytest.fixture(scope="session")
def cnn_pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """Two small BatchNorm CNNs trained briefly from different seeds."""
    data = entry.image_data()
    a = train(_seeded(entry.make_cnn, 1), data, steps=40, lr=3e-3, seed=1)
    b = train(_seeded(entry.make_cnn, 2), data, steps=40, lr=3e-3, seed=2)
    root = tmp_path_factory.mktemp("cnn")
    return Pair(
        a,
        b,
        save_state_dict(a.state_dict(), root / "a"),
        save_state_dict(b.state_dict(), root / "b"),
    )


def _seeded(factory, seed: int) -> nn.Module:  # type: ignore[no-untyped-def]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


@dataclass
class NegationTasks:
    base: nn.Module
    finetuned: nn.Module
    control: list
    target: list
    make_model: object


@pytest.fixture(scope="session")
def negation_tasks() -> NegationTasks:
    """Experiment E1 in small: a base trained on a 10-class mixture (the control), fine-tuned on the
    same classes seen through a random linear distortion of the inputs (the target)."""
    d, classes = 16, 10
    X, y = synthetic_classification(
        5, 3000, in_features=d, num_classes=classes, clusters_per_class=1, noise=0.6
    )
    g = torch.Generator().manual_seed(7)
    distortion = torch.eye(d) + 0.9 * torch.randn(d, d, generator=g) / d**0.5
    Xt = X @ distortion.T
    base = train(
        make_mlp(d, 64, classes, 2, seed=0),
        batches(X[:2000], y[:2000], 100),
        steps=300,
        lr=3e-3,
        seed=0,
    )
    ft = train(copy.deepcopy(base), batches(Xt[:2000], y[:2000], 100), steps=150, lr=1e-3, seed=1)
    return NegationTasks(
        base,
        ft,
        batches(X[2000:], y[2000:], 500),
        batches(Xt[2000:], y[2000:], 500),
        make_negation_model,
    )


def make_negation_model() -> nn.Module:
    return make_mlp(16, 64, 10, 2)
