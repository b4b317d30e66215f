"""Greedy soup, recipe sweeps and task-vector sweeps."""

from __future__ import annotations

from pathlib import Path

import evaluate_entry as entry
import pytest
import yaml

from merge.errors import RecipeError, UsageError
from merge.evaluate import interpolation_path
from merge.evaluate.grids import parse_range
from merge.evaluate.soup import greedy_soup
from merge.evaluate.sweep import set_path, sweep_recipe, sweep_task_vectors
from merge.toy import train


@pytest.fixture(scope="module")
def finetunes(mlp_pair) -> dict:  # type: ignore[no-untyped-def]
    """Three short fine-tunes of model a (one basin), with different learning rates and seeds."""
    out = {}
    for i, lr in enumerate((1e-3, 3e-3, 1e-2)):
        m = entry.make_model()
        m.load_state_dict(mlp_pair.a.state_dict())
        out[f"ft{i}"] = train(m, entry.train_data(), steps=40, lr=lr, seed=10 + i).state_dict()
    return out


def test_greedy_soup_is_never_worse_than_its_best_ingredient(finetunes, mlp_pair) -> None:
    ingredients = {**finetunes, "other_seed": mlp_pair.b.state_dict()}
    r = greedy_soup(entry.make_model, ingredients, data=entry.test_data(), metric="accuracy")
    sel = r.selection
    assert sel["score"] >= sel["best_single_score"]
    assert sel["kept"][0] == sel["best_single"] and sel["weights"] == dict.fromkeys(
        sel["kept"], 1 / len(sel["kept"])
    )
    greedy = r.curve("greedy").points
    assert len(greedy) == 4 and greedy[0]["kept"]
    # kept steps strictly improve; the soup score is the last kept one
    kept = [p["metrics"]["accuracy"] for p in greedy if p["kept"]]
    assert kept == sorted(kept) and len(set(kept)) == len(kept) and kept[-1] == sel["score"]
    # a model from another seed is in another basin: averaging it in never helps
    assert "other_seed" not in sel["kept"]
    # loss as the metric: lower is better, and the rule flips
    r = greedy_soup(entry.make_model, ingredients, data=entry.test_data(), metric="loss")
    assert r.selection["score"] <= r.selection["best_single_score"]


def test_greedy_soup_needs_two_ingredients_and_a_known_metric(finetunes) -> None:
    with pytest.raises(UsageError, match="at least two ingredients"):
        greedy_soup(entry.make_model, {"a": finetunes["ft0"]}, data=entry.test_data())
    with pytest.raises(
        UsageError, match=r"--metric `f1` is not among the evaluator's metrics \(loss, accuracy\)"
    ):
        greedy_soup(entry.make_model, finetunes, data=entry.test_data(), metric="f1")


def _recipe(tmp_path: Path, mlp_pair) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "inputs": {"a": str(mlp_pair.path_a), "b": str(mlp_pair.path_b)},
                "vars": {"lam": 0.5},
                "steps": {
                    "mix": "a + lam * (b - a)",
                    "avg": {
                        "method": "linear",
                        "models": {"a": {"weight": 1.0}, "b": {"weight": 1.0}},
                    },
                },
                "output": {"from": "mix"},
            }
        )
    )
    return path


def test_recipe_sweep_over_a_var_matches_the_path(tmp_path: Path, mlp_pair) -> None:
    recipe = _recipe(tmp_path, mlp_pair)
    r = sweep_recipe(
        recipe, [parse_range("vars.lam=0:1:3")], entry.make_model, data=entry.test_data()
    )
    path = interpolation_path(
        entry.make_model, mlp_pair.path_a, mlp_pair.path_b, data=entry.test_data(), steps=3
    )
    for got, want in zip(r.curve("sweep").points, path.curve("naive").points, strict=True):
        assert got["coords"]["vars.lam"] == want["coords"]["alpha"]
        assert got["metrics"]["loss"] == pytest.approx(want["metrics"]["loss"], rel=1e-5)
    assert r.selection["best"]["coords"]["vars.lam"] in (
        0.0,
        1.0,
    )  # the endpoints beat the bumpy middle
    # a method parameter by its step path, on the other step
    data = yaml.safe_load(recipe.read_text())
    data["output"]["from"] = "avg"
    recipe.write_text(yaml.safe_dump(data))
    r = sweep_recipe(
        recipe,
        [("steps.avg.models.b.weight", [0.0, 1.0])],
        entry.make_model,
        data=entry.test_data(),
    )
    assert r.curve("sweep").points[0]["metrics"]["loss"] == pytest.approx(
        path.curve("naive").points[0]["metrics"]["loss"], rel=1e-5
    )


def test_recipe_sweep_errors_name_the_problem(tmp_path: Path, mlp_pair) -> None:
    recipe = _recipe(tmp_path, mlp_pair)
    with pytest.raises(
        RecipeError,
        match=r"vars.lan: not declared in the recipe's `vars:` \(did you mean `lam`\?\)",
    ):
        sweep_recipe(
            recipe, [parse_range("vars.lan=0:1:3")], entry.make_model, data=entry.test_data()
        )
    with pytest.raises(
        UsageError,
        match=r"--param `steps.mixx.x`: steps has no key `mixx` \(did you mean `mix`\?\)",
    ):
        sweep_recipe(recipe, [("steps.mixx.x", [1.0])], entry.make_model, data=entry.test_data())
    with pytest.raises(UsageError, match="is not a mapping"):
        set_path({"steps": {"mix": "a + b"}}, "steps.mix.weight", 1.0)


def test_task_vector_sweep(mlp_pair, finetunes) -> None:
    base = mlp_pair.a.state_dict()
    r = sweep_task_vectors(
        entry.make_model,
        base,
        {"ft0": finetunes["ft0"], "ft1": finetunes["ft1"]},
        [("ft0", [0.0, 1.0]), ("ft1", [0.0, 0.5])],
        data=entry.test_data(),
    )
    assert [p["coords"] for p in r.curves[0].points] == [
        {"ft0": 0.0, "ft1": 0.0},
        {"ft0": 0.0, "ft1": 0.5},
        {"ft0": 1.0, "ft1": 0.0},
        {"ft0": 1.0, "ft1": 0.5},
    ]
    assert r.endpoints["base"]["ok"] and r.endpoints["ft0"]["ok"]
    assert r.selection["metric"] == "loss" and r.selection["best"] is not None
    with pytest.raises(UsageError, match=r"--param `ft3` names no task \(did you mean `ft0`\?\)"):
        sweep_task_vectors(
            entry.make_model,
            base,
            {"ft0": finetunes["ft0"]},
            [("ft3", [1.0])],
            data=entry.test_data(),
        )
