"""Session fixtures for the alignment tests: two MLPs trained once on a synthetic task."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from align_helpers import MLP_KW, TrainedPair

from merge.threads import one_thread as one_intra_op_thread
from merge.toy import batches, make_mlp, synthetic_classification, train


@pytest.fixture(scope="session")
def mlp_pair() -> TrainedPair:
    """Two MLPs trained on one synthetic task from different seeds (init and batch order)."""
    X, y = synthetic_classification(0, 2048, in_features=16, num_classes=4)
    data = batches(X, y, 128)
    a = train(make_mlp(**MLP_KW, seed=1), data, steps=200, lr=3e-3, seed=1)
    b = train(make_mlp(**MLP_KW, seed=2), data, steps=200, lr=3e-3, seed=2)
    return TrainedPair(a, b, data)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: one intra-op thread is fastest, and stays fast on a busy machine."""
    with one_intra_op_thread():
        yield
