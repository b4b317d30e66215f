"""Where a tensor sits on a parameter gradient, mergekit's way: layer i of a slice (or of a
whole model) of n layers at t = i/(n − 1), the only layer of a one-layer slice or model at
t = 1 (mergekit 0.1.5, `plan.py: plan_slice`), other tensors at t = 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mk_oracle import needs_mergekit, run_mergekit, run_ours, tensors, tiny_llama

from merge.api import run_recipe
from merge.plan import layer_position

K = "self_attn.q_proj.weight"


def _weights(a_range: list[int], b_range: list[int], a: Path, b: Path) -> dict:
    # per-source weight gradients that do not cancel under linear's normalisation
    return {
        "sources": [
            {"model": str(a), "layer_range": a_range, "parameters": {"weight": [0.1, 0.9]}},
            {"model": str(b), "layer_range": b_range, "parameters": {"weight": [0.7, 0.2]}},
        ]
    }


def test_layer_position_rule():
    assert [layer_position(i, 3) for i in range(3)] == [0.0, 0.5, 1.0]
    assert layer_position(0, 1) == 1.0  # one layer: the last anchor, as mergekit
    assert layer_position(None, 5) == 0.0  # embeddings, norms, lm_head


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grad")
    return tiny_llama(root / "a", 1, layers=4), tiny_llama(root / "b", 2, layers=4)


def _lin(wa: float, xa: torch.Tensor, wb: float, xb: torch.Tensor) -> torch.Tensor:
    return (wa * xa + wb * xb) / (wa + wb)


def test_one_layer_slice_takes_the_last_anchor(four_layers, tmp_path):
    a, b = four_layers
    config = {
        "merge_method": "linear",
        "slices": [_weights([0, 3], [0, 3], a, b), _weights([3, 4], [1, 2], a, b)],
    }
    got, wa, wb = run_ours(config, tmp_path / "ours"), tensors(a), tensors(b)
    # Hand-worked: the three-layer slice at t = 0, 0.5, 1; the one-layer slice at t = 1, so
    # weights 0.9 (a's layer 3) and 0.2 (b's layer 1), not the first anchors 0.1 and 0.7.
    for j, t in enumerate([0.0, 0.5, 1.0]):
        want = _lin(
            0.1 + 0.8 * t, wa[f"model.layers.{j}.{K}"], 0.7 - 0.5 * t, wb[f"model.layers.{j}.{K}"]
        )
        torch.testing.assert_close(got[f"model.layers.{j}.{K}"], want)
    want = _lin(0.9, wa[f"model.layers.3.{K}"], 0.2, wb[f"model.layers.1.{K}"])
    torch.testing.assert_close(got[f"model.layers.3.{K}"], want)
    # lm_head comes from the last slice at t = 0 (mergekit's post weights)
    want = _lin(0.1, wa["lm_head.weight"], 0.7, wb["lm_head.weight"])
    torch.testing.assert_close(got["lm_head.weight"], want)


@needs_mergekit
def test_one_layer_slice_matches_mergekit(four_layers, tmp_path):
    a, b = four_layers
    config = {
        "merge_method": "linear",
        "slices": [_weights([0, 3], [0, 3], a, b), _weights([3, 4], [1, 2], a, b)],
    }
    got, want = run_ours(config, tmp_path / "ours"), run_mergekit(config, tmp_path / "mk")
    assert sorted(got) == sorted(want)
    for k, ref in want.items():
        torch.testing.assert_close(got[k], ref, rtol=1e-6, atol=1e-7, msg=k)


@needs_mergekit
def test_one_layer_model_matches_mergekit(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 3, layers=1), tiny_llama(tmp_path / "b", 4, layers=1)
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": [0.1, 0.9]}},
            {"model": str(b), "parameters": {"weight": [0.7, 0.2]}},
        ],
    }
    got, want = run_ours(config, tmp_path / "ours"), run_mergekit(config, tmp_path / "mk")
    wa, wb = tensors(a), tensors(b)
    layer = _lin(0.9, wa[f"model.layers.0.{K}"], 0.2, wb[f"model.layers.0.{K}"])
    torch.testing.assert_close(got[f"model.layers.0.{K}"], layer)
    for k, ref in want.items():
        torch.testing.assert_close(got[k], ref, rtol=1e-6, atol=1e-7, msg=k)


def test_our_recipes_follow_the_same_rule(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 5, layers=1), tiny_llama(tmp_path / "b", 6, layers=1)
    out = run_recipe(
        {
            "inputs": {"a": str(a), "b": str(b)},
            "steps": {
                "s": {
                    "method": "linear",
                    "models": {"a": {"weight": [1.0, 0.0]}, "b": {"weight": [0.0, 1.0]}},
                }
            },
        },
        tmp_path / "out",
        quiet=True,
    )
    got, wb = tensors(out), tensors(b)
    assert torch.equal(got[f"model.layers.0.{K}"], wb[f"model.layers.0.{K}"])  # t = 1: all b
