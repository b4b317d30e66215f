"""The model card and recipe file beside the weights (and --no-card)."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from merge import __version__
from merge.cli import cli


def test_card_front_matter_method_inputs_and_recipe(three_models: dict[str, Path], tmp_path: Path):
    recipe = {
        "inputs": {k: str(v) for k, v in three_models.items()},
        "steps": {
            "merged": {
                "method": "ties",
                "base": "base",
                "models": {"a": {"density": 0.5}, "b": {"density": 0.5}},
            }
        },
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(
        cli, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "-q"]
    )
    assert res.exit_code == 0, res.output
    text = (tmp_path / "out" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta == {
        # in the recipe's input order (safe_dump sorted them: a, b, base)
        "base_model": [str(three_models["a"]), str(three_models["b"]), str(three_models["base"])],
        "library_name": "transformers",
        "tags": ["merge", "mergewright"],
    }
    assert f"made with mergewright {__version__}" in body
    assert (
        "- step `merged`: ties (Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)), base `base`"
        in body
    )
    assert f"| a | {three_models['a']} |" in body
    saved = yaml.safe_load((tmp_path / "out" / "merge-recipe.yaml").read_text())
    assert saved["steps"] == {
        "merged": {
            "method": "ties",
            "base": "base",
            "models": {"a": {"density": 0.5}, "b": {"density": 0.5}},
        }
    }
    assert yaml.safe_dump(saved, sort_keys=False).strip() in body
    # The recipe file redoes the merge: same tensors.
    res = CliRunner().invoke(
        cli,
        ["run", str(tmp_path / "out" / "merge-recipe.yaml"), "-o", str(tmp_path / "again"), "-q"],
    )
    assert res.exit_code == 0, res.output
    first, again = load_file_tree(tmp_path / "out"), load_file_tree(tmp_path / "again")
    assert first.keys() == again.keys() and all((first[k] == again[k]).all() for k in first)


def load_file_tree(path: Path) -> dict:
    out = {}
    for f in path.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_no_card_writes_only_the_model(three_models: dict[str, Path], tmp_path: Path):
    res = CliRunner().invoke(
        cli,
        [
            "linear",
            str(three_models["a"]),
            str(three_models["b"]),
            "-o",
            str(tmp_path / "o"),
            "-q",
            "--no-card",
        ],
    )
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "o" / "README.md").exists()
    assert not (tmp_path / "o" / "merge-recipe.yaml").exists()
