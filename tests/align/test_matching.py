"""Weight and activation matching: planted permutations, identity, monotone objective, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from align_helpers import MLP_KW, TrainedPair, barrier, path_losses, toy_cases
from scipy.optimize import linear_sum_assignment

from merge.align import activation_matching, apply_permutation, infer_spec, weight_matching
from merge.align.activation_matching import route_probes
from merge.align.permute import invert, random_perms
from merge.align.spec import PermutationSpec, spec_from_dict
from merge.errors import UsageError
from merge.toy import make_mlp, make_resnet, synthetic_images

CASES = ["mlp", "vgg", "resnet", "transformer"]


def noisy(state: dict, scale: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * v.std() * torch.randn(v.shape, generator=g)
        if v.is_floating_point() and v.numel() > 1
        else v
        for k, v in state.items()
    }


@pytest.mark.parametrize("noise", [0.0, 0.2])
@pytest.mark.parametrize("name", CASES)
def test_planted_permutation_is_recovered_exactly(name: str, noise: float) -> None:
    model, x = toy_cases()[name]
    spec = infer_spec(model, x)
    a = model.state_dict()
    planted = random_perms(spec, seed=7)
    b = noisy(apply_permutation(spec, planted, a), noise)
    perms, report = weight_matching(spec, a, b, restarts=1)
    for g in spec.groups:
        np.testing.assert_array_equal(perms[g], invert(planted[g]), err_msg=g)
    if noise == 0:
        aligned = apply_permutation(spec, perms, b)
        assert all(torch.equal(aligned[k], a[k]) for k in a)
        assert report.distance_after == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_aligning_a_model_to_itself_gives_the_identity(name: str) -> None:
    model, x = toy_cases()[name]
    spec = infer_spec(model, x)
    state = model.state_dict()
    perms, report = weight_matching(spec, state, state, restarts=2)
    assert all(np.array_equal(p, np.arange(len(p))) for p in perms.values())
    assert report.objective_after == report.objective_before
    assert all(g.moved == 0 for g in report.groups.values())


def test_objective_never_decreases_across_sweeps(mlp_pair: TrainedPair) -> None:
    spec = infer_spec(mlp_pair.a)
    for seed in range(3):
        _, report = weight_matching(
            spec, mlp_pair.a.state_dict(), mlp_pair.b.state_dict(), seed=seed, restarts=3
        )
        assert len(report.history) == report.sweeps + 1
        assert all(later >= earlier for earlier, later in zip(report.history, report.history[1:]))
        assert report.objective_after == max(r["objective"] for r in report.restarts)
        assert (
            report.sweeps >= 2
        )  # trained models need several sweeps; the last one changes nothing
        for g in report.groups.values():
            assert g.objective_after >= g.objective_before


def test_weight_matching_is_deterministic_under_a_seed(mlp_pair: TrainedPair) -> None:
    spec = infer_spec(mlp_pair.a)
    a, b = mlp_pair.a.state_dict(), mlp_pair.b.state_dict()
    p1, r1 = weight_matching(spec, a, b, seed=3)
    p2, r2 = weight_matching(spec, a, b, seed=3)
    assert all(np.array_equal(p1[g], p2[g]) for g in spec.groups)
    assert r1.history == r2.history and r1.restarts == r2.restarts


def test_apply_permutation_then_its_inverse_is_the_identity() -> None:
    model, x = toy_cases()["vgg"]
    spec = infer_spec(model, x)
    state = model.state_dict()
    perms = random_perms(spec, seed=1)
    there = apply_permutation(spec, perms, state)
    back = apply_permutation(spec, {g: invert(p) for g, p in perms.items()}, there)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert not torch.equal(
        there["classifier.0.weight"], state["classifier.0.weight"]
    )  # block layout moved


def test_activation_matching_recovers_a_planted_permutation() -> None:
    for model, data in [
        (make_mlp(**MLP_KW, seed=0).eval(), [(torch.randn(64, 16), None)]),
        (toy_cases()["resnet"][0], [(synthetic_images(0, 32)[0], None)]),
    ]:
        spec = infer_spec(model, data[0][0])
        a = model.state_dict()
        planted = random_perms(spec, seed=3)
        b = apply_permutation(spec, planted, a)
        perms, report = activation_matching(model, spec, a, b, data)
        for g in spec.groups:
            np.testing.assert_array_equal(perms[g], invert(planted[g]), err_msg=g)
            assert report.groups[g].objective_after > report.groups[g].objective_before


def test_activation_matching_on_trained_models(mlp_pair: TrainedPair) -> None:
    spec = infer_spec(mlp_pair.a)
    a, b = mlp_pair.a.state_dict(), mlp_pair.b.state_dict()
    perms, report = activation_matching(mlp_pair.a, spec, a, b, mlp_pair.data, max_batches=4)
    assert report.extra["batches"] == 4
    assert (
        report.objective_after > report.objective_before + 1.0
    )  # mean correlation per group rises
    aligned = apply_permutation(spec, perms, b)
    naive, permuted = path_losses(a, b, mlp_pair.data), path_losses(a, aligned, mlp_pair.data)
    assert barrier(permuted) <= 0.25 * barrier(naive), (naive, permuted)


def test_resnet_x2_planted_with_shortcut_convs() -> None:
    model = make_resnet(14, width=2, seed=0).eval()
    spec = infer_spec(model, torch.randn(2, 3, 8, 8))
    a = model.state_dict()
    planted = random_perms(spec, seed=11)
    perms, _ = weight_matching(spec, a, noisy(apply_permutation(spec, planted, a), 0.3), restarts=1)
    assert all(np.array_equal(perms[g], invert(planted[g])) for g in spec.groups)


# A residual stream: group R sits on both axes of the d→d map `attn` (and on an embedding and an
# MLP block's input and output axes); H is the MLP's hidden units.
RESIDUAL_AXES = {"emb": ["-", "R"], "attn": ["R", "R"], "up": ["H", "R"], "down": ["R", "H"]}


def residual_spec(d: int = 16, h: int = 32) -> PermutationSpec:
    members: dict[str, list] = {"R": [], "H": []}
    for t, axes in RESIDUAL_AXES.items():
        for axis, g in enumerate(axes):
            if g != "-":
                members[g].append([t, axis])
    return spec_from_dict(
        {
            "groups": {
                "R": {"size": d, "members": members["R"]},
                "H": {"size": h, "members": members["H"]},
            }
        }
    )


def residual_state(g: torch.Generator, rows: int = 8, d: int = 16, h: int = 32) -> dict:
    shapes = {"emb": (rows, d), "attn": (d, d), "up": (h, d), "down": (d, h)}
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def git_rebasin_loop(a: dict, b: dict, sizes: dict[str, int], seed: int) -> dict:
    """Ainsworth et al.'s `weight_matching`, written out: every other axis permuted (`except_axis`)."""
    perm = {p: np.arange(n) for p, n in sizes.items()}
    rng = np.random.default_rng(seed)

    def permuted(k: str, skip: int) -> np.ndarray:
        w = b[k].numpy()
        for axis, p in enumerate(RESIDUAL_AXES[k]):
            if axis != skip and p in perm:
                w = np.take(w, perm[p], axis=axis)
        return w

    for _ in range(100):
        progress = False
        for p in rng.permutation(sorted(sizes)):
            n = sizes[p]
            C = np.zeros((n, n))
            for k, axes in RESIDUAL_AXES.items():
                for axis, q in enumerate(axes):
                    if q == p:
                        wa = np.moveaxis(a[k].numpy(), axis, 0).reshape(n, -1)
                        C += wa @ np.moveaxis(permuted(k, axis), axis, 0).reshape(n, -1).T
            _, cols = linear_sum_assignment(C, maximize=True)
            idx = np.arange(n)
            progress |= bool(C[idx, cols].sum() > C[idx, perm[p]].sum() + 1e-12)
            perm[p] = cols
        if not progress:
            break
    return perm


def test_group_on_both_axes_of_a_tensor_is_solved_as_git_rebasin_does() -> None:
    spec = residual_spec()
    sizes = {n: g.size for n, g in spec.groups.items()}
    ours = literal = with_restarts = 0
    for seed in range(60):
        a = residual_state(torch.Generator().manual_seed(seed))
        planted = random_perms(spec, seed=100 + seed)
        b = apply_permutation(spec, planted, a)

        def found(p: dict, planted: dict = planted) -> bool:
            return all(np.array_equal(p[g], invert(planted[g])) for g in spec.groups)

        got_literal = found(git_rebasin_loop(a, b, sizes, seed))
        got_ours = found(weight_matching(spec, a, b, restarts=1, seed=seed)[0])
        literal += got_literal
        ours += got_ours
        with_restarts += found(weight_matching(spec, a, b, restarts=3, seed=seed)[0])
    # One run from the identity: 51/60 as the reference loop (46/60 with the group left out on
    # both axes); restarts now help: 60/60 (57/60 before).
    assert ours >= literal == 51
    assert with_restarts == 60


def test_weight_matching_is_never_worse_than_the_identity() -> None:
    # Only the two-axis map and a small embedding: the objective is quadratic in R, and a LAP step
    # on its linearisation can lower it; the best permutation seen, or the identity, is returned.
    spec = spec_from_dict(
        {"groups": {"R": {"size": 16, "members": [["emb", 1], ["attn", 0], ["attn", 1]]}}}
    )
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        a = {"emb": torch.randn(4, 16, generator=g), "attn": torch.randn(16, 16, generator=g)}
        b = {k: torch.randn(v.shape, generator=g) for k, v in a.items()}
        a, b = {k: v.double() for k, v in a.items()}, {k: v.double() for k, v in b.items()}
        perms, report = weight_matching(spec, a, b, restarts=3, seed=seed)
        identity = float(sum((a[k] * b[k]).sum() for k in a))
        achieved = float(
            sum((a[k] * v).sum() for k, v in apply_permutation(spec, perms, b).items())
        )
        assert report.objective_before == pytest.approx(identity)
        assert achieved == pytest.approx(report.objective_after)
        assert report.objective_after >= report.objective_before, f"seed {seed}"


class Concat(torch.nn.Module):
    """Two equal-width branches concatenated into one layer: one tensor axis, two groups."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left, self.right = torch.nn.Linear(6, 8), torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(torch.cat([self.left(x), self.right(x)], dim=1)))


def test_activation_matching_on_a_one_shot_generator_and_a_concatenation() -> None:
    model = Concat().eval()
    spec = infer_spec(model, torch.randn(4, 6))
    a = model.state_dict()
    planted = random_perms(spec, seed=5)
    b = apply_permutation(spec, planted, a)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 6, generator=g), None) for _ in range(2)]
    perms, report = activation_matching(model, spec, a, b, (batch for batch in data))
    assert report.extra["batches"] == 2  # was 0: tracing and the first batch used both up
    for name in spec.groups:
        np.testing.assert_array_equal(perms[name], invert(planted[name]), err_msg=name)
    with pytest.raises(UsageError, match="activation matching saw no batch"):
        activation_matching(model, spec, a, b, data, max_batches=0)


def test_activations_are_routed_by_offset_along_a_concatenated_axis() -> None:
    # A traced group can list the shared consumer axis first; its offset says which branch it is.
    spec = spec_from_dict(
        {
            "groups": {
                "L": {
                    "size": 8,
                    "members": [["left.weight", 0], {"tensor": "head.weight", "axis": 1}],
                },
                "R": {
                    "size": 8,
                    "members": [
                        ["right.weight", 0],
                        {"tensor": "head.weight", "axis": 1, "offset": 8},
                    ],
                },
            }
        }
    )
    traced = spec_from_dict(
        {
            "groups": {
                "t0": {
                    "size": 8,
                    "members": [{"tensor": "head.weight", "axis": 1}, ["left.weight", 0]],
                },
                "t1": {"size": 8, "members": [{"tensor": "head.weight", "axis": 1, "offset": 8}]},
                "t2": {"size": 8, "members": [["right.weight", 0], ["left.weight", 0]]},
            }
        }
    )
    traced.probes = {
        "t0": [("relu_left", 1, 1)],
        "t1": [("relu_right", 1, 1)],
        "t2": [("mixed", 1, 1)],
    }
    probes, notes = route_probes(spec, traced)
    assert probes == {"L": [("relu_left", 1, 1)], "R": [("relu_right", 1, 1)]}
    assert notes == ["traced group `t2` spans the spec's groups L, R; its activations are not used"]
