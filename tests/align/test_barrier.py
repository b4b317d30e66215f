"""The experiment as a test: weight matching removes most of the loss barrier between two MLPs."""

from __future__ import annotations

import time

import torch
from align_helpers import MLP_KW, TrainedPair, barrier, path_losses

from merge.align import align_state_dicts
from merge.toy import make_mlp


def test_weight_matching_removes_most_of_the_barrier(mlp_pair: TrainedPair) -> None:
    start = time.perf_counter()
    sa, sb = mlp_pair.a.state_dict(), mlp_pair.b.state_dict()
    aligned, report = align_state_dicts(lambda: make_mlp(**MLP_KW), sa, sb, method="weight", seed=0)

    naive = path_losses(sa, sb, mlp_pair.data)
    permuted = path_losses(sa, aligned, mlp_pair.data)
    assert barrier(naive) > 0.3  # the task puts the two solutions in different basins
    assert barrier(permuted) <= 0.25 * barrier(naive), (naive, permuted)

    # the aligned endpoint is B itself, up to the order of float sums
    assert abs(permuted[-1] - naive[-1]) <= 1e-6 * abs(naive[-1])
    assert permuted[0] == naive[0]
    assert report.objective_after > report.objective_before
    assert report.distance_after < report.distance_before
    assert time.perf_counter() - start < 30


def test_aligned_b_predicts_exactly_like_b(mlp_pair: TrainedPair) -> None:
    sa, sb = mlp_pair.a.state_dict(), mlp_pair.b.state_dict()
    aligned, _ = align_state_dicts(make_mlp(**MLP_KW), sa, sb)
    model = make_mlp(**MLP_KW).eval()
    x = mlp_pair.data[0][0]
    model.load_state_dict(sb)
    ref = model(x)
    model.load_state_dict(aligned)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
