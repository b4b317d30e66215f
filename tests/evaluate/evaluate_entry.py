"""Entry points for the CLI tests: `tests/evaluate/toy_entry.py:make_model` and friends.

The architecture and data match the session fixtures in conftest.py, which train the models
once and save them as checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from merge.toy import batches, make_mlp, make_vgg, synthetic_classification, synthetic_images

IN, HIDDEN, CLASSES, DEPTH = 16, 32, 4, 2
TASK_SEED = 0


def make_model() -> nn.Module:
    return make_mlp(IN, HIDDEN, CLASSES, DEPTH)


def make_wide_model() -> nn.Module:
    return make_mlp(IN, 2 * HIDDEN, CLASSES, DEPTH)


def make_cnn() -> nn.Module:
    return make_vgg(widths=((8,), (16,)), hidden=16)


def split(n_train: int = 1536, n_test: int = 512) -> tuple[torch.Tensor, ...]:
    X, y = synthetic_classification(
        TASK_SEED, n_train + n_test, in_features=IN, num_classes=CLASSES
    )
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def train_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    X, y, _, _ = split()
    return batches(X, y, 128)


def test_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    _, _, X, y = split()
    return batches(X, y, 256)


def test_data_generator():  # type: ignore[no-untyped-def]
    """A one-shot generator (the factory is called again for every pass)."""
    yield from test_data()


def image_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    X, y = synthetic_images(3, 512)
    return batches(X, y, 128)


def empty_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return []


def score(model: nn.Module) -> dict[str, float]:
    """A user's --eval: negative accuracy as the loss, accuracy as a metric."""
    correct = n = 0
    for x, y in test_data():
        correct += int((model(x).argmax(-1) == y).sum())
        n += len(y)
    return {"loss": -correct / n, "accuracy": correct / n}


def bad_score(model: nn.Module) -> dict[str, float]:
    return {"accuracy": 1.0}


def quality(model: nn.Module) -> dict[str, float]:
    """A user's --eval with a metric merge cannot know by name; it declares its direction."""
    correct = n = 0
    for x, y in test_data():
        correct += int((model(x).argmax(-1) == y).sum())
        n += len(y)
    return {"loss": 1.0 - correct / n, "quality": correct / n}


quality.higher_is_better = {"quality": True}  # type: ignore[attr-defined]


def undeclared_quality(model: nn.Module) -> dict[str, float]:
    return quality(model)
