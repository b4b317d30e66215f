"""Linearity probes: ~0 for linear maps; a bias-free ReLU MLP is positively homogeneous only."""

from __future__ import annotations

import evaluate_entry as entry
import pytest
import torch
from torch import nn

from merge.errors import UsageError
from merge.evaluate.probes import disentanglement, linearity_probe, weight_linearity

KS = [-2.0, -1.0, -0.5, 0.5, 2.0]


def _data(d: int = 8, n: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    return [(x[i : i + 64], torch.zeros(64, dtype=torch.long)) for i in range(0, n, 64)]


def _by_test(result, curve: str = "output") -> dict:  # type: ignore[no-untyped-def]
    return {
        (p["coords"]["test"], p["coords"]["k"]): p["metrics"] for p in result.curve(curve).points
    }


def _seeded(factory):  # type: ignore[no-untyped-def]
    def make() -> nn.Module:
        torch.manual_seed(0)
        return factory()

    return make


@pytest.mark.parametrize("bias", [True, False])
def test_linear_layers_score_zero(bias: bool) -> None:
    r = linearity_probe(_seeded(lambda: nn.Linear(8, 5, bias=bias)), _data(), ks=KS)
    for key, m in _by_test(r).items():
        assert m["max"] < 1e-5, key
    if not bias:  # the textbook form needs f(0) = 0
        r = linearity_probe(
            _seeded(lambda: nn.Linear(8, 5, bias=False)), _data(), ks=KS, origin="zero"
        )
        assert max(m["max"] for m in _by_test(r).values()) < 1e-5


def test_textbook_form_catches_a_bias() -> None:
    r = linearity_probe(_seeded(lambda: nn.Linear(8, 5)), _data(), ks=KS, origin="zero")
    assert _by_test(r)[("homogeneity", 2.0)]["mean"] > 1e-2


def _relu_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 32, bias=False),
        nn.ReLU(),
        nn.Linear(32, 32, bias=False),
        nn.ReLU(),
        nn.Linear(32, 4, bias=False),
    )


def test_bias_free_relu_mlp_is_positively_homogeneous_but_not_linear() -> None:
    r = linearity_probe(_seeded(_relu_mlp), _data(), ks=KS, layers=["1", "3"])
    for where in ("output", "1", "3"):
        m = _by_test(r, where)
        for k in KS:
            if k > 0:
                assert m[("homogeneity", k)]["max"] < 1e-5, (where, k)
            else:
                assert m[("homogeneity", k)]["mean"] > 0.1, (where, k)
        assert m[("additivity", None)]["mean"] > 0.05, where
    assert [c.name for c in r.curves] == ["output", "1", "3"]
    assert r.settings["origin"] == "affine" and r.settings["pairs"] == 256


def test_unknown_layer_and_token_inputs_are_clear_errors() -> None:
    with pytest.raises(
        UsageError, match=r"--layer `4x` is not a module of the model \(did you mean `4`\?\)"
    ):
        linearity_probe(_seeded(_relu_mlp), _data(), layers=["4x"])
    tokens = [(torch.randint(0, 10, (4, 6)), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(UsageError, match="need float input tensors"):
        linearity_probe(
            lambda: nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(24, 2)), tokens
        )


def test_weight_space_probes_are_zero_for_a_model_linear_in_its_weights() -> None:
    # f(x; W) = W x is linear in W, so g(θ0 + kτ) is exactly linear in k
    make = lambda: nn.Linear(8, 5, bias=False)  # noqa: E731
    base, t1, t2 = (
        {"weight": torch.randn(5, 8, generator=torch.Generator().manual_seed(s))} for s in range(3)
    )
    r = weight_linearity(make, base, t1, _data(), task2=t2, ks=KS)
    assert max(m["max"] for m in _by_test(r, "weights:output").values()) < 1e-4
    # the trained MLPs are not: scaling a task vector changes outputs non-linearly
    r = weight_linearity(
        entry.make_model,
        base_state := entry.make_model().state_dict(),
        _train_copy(base_state),
        entry.test_data(),
        ks=[2.0],
    )
    assert _by_test(r, "weights:output")[("homogeneity", 2.0)]["mean"] > 0.01


def _train_copy(state: dict) -> dict:
    from merge.toy import train

    m = entry.make_model()
    m.load_state_dict(state)
    return train(m, entry.train_data(), steps=30, seed=0).state_dict()


def test_disentanglement_is_zero_where_one_task_is_off_and_on_the_axes(mlp_pair) -> None:
    base = entry.make_model().state_dict()
    r = disentanglement(
        entry.make_model,
        base,
        mlp_pair.a.state_dict(),
        mlp_pair.b.state_dict(),
        entry.test_data(),
        entry.test_data(),
        alphas=[0.0, 0.5, 1.0],
        max_examples=256,
    )
    xi = {(p["coords"]["alpha1"], p["coords"]["alpha2"]): p["metrics"] for p in r.curves[0].points}
    assert len(xi) == 9 and xi[(0.0, 0.0)]["xi"] == 0.0
    # on an axis one term compares a model with itself; the other compares it with θ0
    assert xi[(1.0, 0.0)]["xi_task1"] == 0.0 and xi[(0.0, 1.0)]["xi_task2"] == 0.0
    # two unrelated solutions interfere: adding both disagrees with each alone
    assert xi[(1.0, 1.0)]["xi"] > 0.1
    assert r.selection["max_xi"] >= xi[(1.0, 1.0)]["xi"]
