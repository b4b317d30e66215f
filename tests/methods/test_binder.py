"""One binder for every place a method call is written: domains come from the signatures."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from merge.errors import RecipeError
from merge.methods import get_method, list_methods
from merge.methods._registry import DENSITY, MODEL, STATISTICS, bind_call
from merge.recipe import load_recipe

INPUTS = {"a": "a", "b": "b", "base": "base"}


def _problems(recipe: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    return str(e.value)


def test_domains_are_read_from_the_signatures() -> None:
    ties = get_method("ties")
    assert ties.domains["density"].interval == DENSITY
    assert ties.domains["elect"].choices == ("sum", "count")
    assert ties.domains["scope"].choices == ("tensor", "model")
    assert get_method("breadcrumbs").domains["gamma"].interval is not None
    assert get_method("consensus").domains["aggregate"].choices == ("sum", "ties")
    # the execution shape depends on the parameters where the method says so
    assert ties.shape_for({}) == STATISTICS and ties.shape_for({"scope": "model"}) == MODEL


def test_expression_call_typo_is_caught_at_validate_with_its_key() -> None:
    msg = _problems({"inputs": INPUTS, "steps": {"x": "ties(a, b, base=base, densty=0.5)"}})
    assert "steps.x: unknown parameter `densty` for method `ties` (did you mean `density`?)" in msg


def test_expression_call_value_and_count_are_checked() -> None:
    msg = _problems({"inputs": INPUTS, "steps": {"x": "ties(a, b, base=base, density=1.5)"}})
    assert "steps.x: method `ties`: `density` 1.5 (model 1) is outside (0, 1]" in msg
    msg = _problems({"inputs": INPUTS, "steps": {"x": "slerp(a, b, base, t=0.5)"}})
    assert "method `slerp` takes 1 to 2 models besides the base, got 3" in msg


def test_override_value_outside_its_domain_is_caught_at_validate() -> None:
    step = {"method": "ties", "base": "base", "models": ["a", "b"], "density": 0.5}
    msg = _problems(
        {"inputs": INPUTS, "steps": {"x": step}, "overrides": [{"glob": "*.mlp.*", "density": 1.5}]}
    )
    assert "overrides[0].density: method `ties`: `density` 1.5 is outside (0, 1]" in msg


def test_override_choice_is_checked() -> None:
    step = {"method": "ties", "base": "base", "models": ["a", "b"], "density": 0.5}
    msg = _problems(
        {"inputs": INPUTS, "steps": {"x": step}, "overrides": [{"glob": "*", "elect": "mass"}]}
    )
    assert "overrides[0].elect: method `ties`: `elect: mass` is not one of sum, count" in msg


def test_scope_model_conflicts_are_caught_at_validate() -> None:
    step = {"method": "ties", "base": "base", "models": ["a", "b"], "density": 0.5}
    step["scope"] = "model"
    msg = _problems(
        {"inputs": INPUTS, "steps": {"x": step}, "overrides": [{"glob": "*.mlp.*", "density": 0.3}]}
    )
    assert "overrides[0].density: method `ties` runs model-wide here" in msg
    step["density"] = [0.2, 0.5]
    msg = _problems({"inputs": INPUTS, "steps": {"x": step}})
    assert msg.count("is a layer gradient") == 1


def test_gradient_anchors_are_each_checked() -> None:
    problems = bind_call(
        get_method("dare_ties"), n_models=2, has_base=True, params={"density": [0.5, 0.0, 1.2]}
    )
    assert [p for p in problems if "outside" in p] == [
        "method `dare_ties`: `density` 0.0 is outside (0, 1]; it is the fraction of each task "
        "vector kept (e.g. 0.5), 1 keeps everything",
        "method `dare_ties`: `density` 1.2 is outside (0, 1]; it is the fraction of each task "
        "vector kept (e.g. 0.5), 1 keeps everything",
    ]


def test_no_method_name_outside_the_methods_package() -> None:
    """The planner and executor read shapes and folds from the registrations."""
    root = Path(__file__).resolve().parents[2] / "merge"
    names = [s.name for s in list_methods() if not s.name.startswith("_")]
    for f in ("plan.py", "execute.py", "model_scope.py"):
        text = (root / f).read_text()
        for n in names:
            assert not re.search(rf"[\"']{n}[\"']", text), f"{f} names method `{n}`"
