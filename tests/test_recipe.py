from __future__ import annotations

from pathlib import Path

import pytest

from merge.errors import RecipeError
from merge.plan import gradient_value
from merge.recipe import load_recipe


def test_all_problems_reported_together_with_key_paths(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "inputs: {base: b, math: m}\n"
        "stpes: {}\n"
        "steps:\n"
        "  one: {method: tie, models: [math]}\n"
        "  two: {method: linear, models: {math: {wieght: 1}}, normalise: true}\n"
        "  three: bse + math\n"
        "output: {from: four, dtpye: bfloat16}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    text = str(e.value)
    assert text.startswith(f"recipe {tmp_path / 'r.yaml'} is invalid")
    assert "stpes: unknown key (did you mean `steps`?)" in text
    assert "output.dtpye: unknown key (did you mean `dtype`?)" in text
    # Structural problems stop pydantic before semantics; fix them and the rest appear together.
    (tmp_path / "r.yaml").write_text(
        "inputs: {base: b, math: m}\n"
        "steps:\n"
        "  one: {method: tie, models: [math]}\n"
        "  two: {method: linear, models: {math: {wieght: 1}}, normalise: true}\n"
        "  three: bse + math\n"
        "output: {from: four}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    text = str(e.value)
    assert (
        "steps.one.method: unknown merge method `tie` (did you mean `ties`?)" in text
        or "steps.one.method: unknown merge method `tie`" in text
    )
    assert (
        "steps.two.models.math.wieght: `wieght` is not a per-model parameter of `linear` (did you mean `weight`?)"
        in text
    )
    assert (
        "steps.two: unknown parameter `normalise` for method `linear` (did you mean `normalize`?)"
        in text
    )
    assert "steps.three: unknown name `bse` (did you mean `base`?)" in text
    assert "output.from: no step named `four`" in text
    assert "(5 problems)" in text


def test_method_step_rules() -> None:
    base = {"inputs": {"base": "b", "a": "a"}}
    with pytest.raises(RecipeError, match="method `task_arithmetic` needs a base model"):
        load_recipe({**base, "steps": {"s": {"method": "task_arithmetic", "models": ["a"]}}})
    with pytest.raises(RecipeError, match="method `linear` takes no base model"):
        load_recipe({**base, "steps": {"s": {"method": "linear", "base": "base", "models": ["a"]}}})


def test_overrides_are_checked() -> None:
    r = {
        "inputs": {"base": "b", "a": "a"},
        "steps": {"s": {"method": "linear", "models": ["a", "base"]}, "t": "s + 0 * a"},
        "overrides": [
            {"glob": "*.mlp.*", "regex": "x", "weight": 1},
            {"glob": "*", "step": "t", "weight": 1},
            {"glob": "*", "input": "c", "wieght": 1},
        ],
    }
    with pytest.raises(RecipeError) as e:
        load_recipe(r)
    text = str(e.value)
    assert "overrides[0]: give exactly one of `glob:` or `regex:`" in text
    assert "overrides[1].step: step `t` calls no method" in text
    assert "overrides[2].input: no input named `c`" in text
    assert "overrides[2].wieght: no method call takes `wieght` (did you mean `weight`?)" in text


def test_vars_override_and_unknown_var() -> None:
    r = {
        "inputs": {"base": "b", "a": "a"},
        "vars": {"lam": 0.5},
        "steps": {"s": "base + lam * (a - base)"},
    }
    p = load_recipe(r, vars={"lam": 0.25})
    assert dict(p.output.terms) == {"base": 0.75, "a": 0.25}
    with pytest.raises(
        RecipeError,
        match=r"vars.lan: not declared in the recipe's `vars:` \(did you mean `lam`\?\)",
    ):
        load_recipe(r, vars={"lan": 1.0})


def test_newer_version_is_refused() -> None:
    with pytest.raises(RecipeError, match="recipe version 9 is newer"):
        load_recipe({"version": 9, "inputs": {"a": "a"}, "steps": {"s": "a"}})


def test_gradient_rule_matches_mergekit() -> None:
    # anchors spread evenly over [0, 1]: s = t (n - 1), linear between neighbours
    assert gradient_value([0.0, 1.0], 0.25) == 0.25
    assert gradient_value([0.0, 0.5, 1.0, 0.0], 0.5) == pytest.approx(0.75)  # s = 1.5
    assert gradient_value([0.2, 0.8], 1.0) == 0.8
    assert gradient_value([0.3], 0.7) == 0.3


def test_step_level_per_model_params_are_defaults_and_ranges_are_checked() -> None:
    r: dict = {
        "inputs": {"base": "b", "a": "a", "c": "c"},
        "steps": {
            "s": {
                "method": "ties",
                "base": "base",
                "models": {"a": {}, "c": {"density": 0.3}},
                "density": 0.5,
            }
        },
    }
    (call,) = load_recipe(r).output.calls()
    assert dict(call.model_params[0])["density"] == 0.5  # the step-level default
    assert dict(call.model_params[1])["density"] == 0.3  # a model's own value wins
    r["steps"]["s"]["density"] = 1.5
    with pytest.raises(RecipeError, match=r"`density` 1.5 \(model 1\) is outside \(0, 1\]"):
        load_recipe(r)
