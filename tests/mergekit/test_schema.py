"""mergekit's config schema, key by key (merge/mergekit_schema.py): the one table that the
importer, `merge run --help` and docs/methods.md share, and a named refusal for every key the
table lists as refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from merge.cli import cli
from merge.errors import MergeWarning, RecipeError, UsageError
from merge.mergekit_import import translate
from merge.mergekit_schema import SCHEMA, entry, markdown_table, top_level_keys
from merge.recipe import load_recipe

DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def _models(*models: Any, method: str = "linear", **top: Any) -> dict[str, Any]:
    return {"merge_method": method, "models": list(models), **top}


def _m(model: Any = "/m/a", **params: Any) -> dict[str, Any]:
    return {"model": model, "parameters": {"weight": 1.0, **params}}


# Every key the table refuses, with configs that use it and the key path the error must name.
REFUSED: dict[str, list[tuple[dict[str, Any], str]]] = {
    "modules": [
        (
            {"merge_method": "linear", "modules": {"text": {"models": [_m()]}}},
            "`modules`",
        )
    ],
    "lora": [
        (_models(_m("/m/a+/m/adapter")), "`models[0].model` (`/m/a+/m/adapter`)"),
        (_models(_m({"model": "/m/a", "lora": "/m/adapter"})), "`models[0].model.lora`"),
    ],
    "override_architecture": [
        (
            _models(_m({"model": "/m/a", "override_architecture": "MistralForCausalLM"})),
            "`models[0].model.override_architecture`",
        )
    ],
    "revision": [
        (_models(_m("org/model@v2")), "`models[0].model` (`org/model@v2`)"),
        (
            _models(_m({"model": {"path": "/m/a", "revision": "v2"}})),
            "`models[0].model.model.revision`",
        ),
    ],
    '<param>: [true, ...] / ["a", ...]': [
        (
            _models(
                _m(),
                _m("/m/b"),
                method="ties",
                base_model="/m/base",
                parameters={"normalize": [True, False]},
            ),
            "`parameters.normalize`",
        )
    ],
    "any other key": [
        (_models(_m(), dtyp="bfloat16"), "`dtyp`"),
        (_models({"model": "/m/a", "weight": 0.5}), "`models[0].weight`"),
        (
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [{"model": "/m/a", "layer_range": [0, 2]}], "layer_range": [0, 2]}
                ],
            },
            "`slices[0].layer_range`",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "/m/a", "layer_range": [0, 2], "weight": 1}]}],
            },
            "`slices[0].sources[0].weight`",
        ),
    ],
}


def test_every_refused_key_of_the_table_has_a_case():
    assert sorted(REFUSED) == sorted(k.key for k in SCHEMA if k.status == "refused")


@pytest.mark.parametrize(
    "key,config,named",
    [(key, config, named) for key, cases in REFUSED.items() for config, named in cases],
)
def test_refused_keys_are_usage_errors_naming_the_key(key, config, named, tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(config)
    assert isinstance(e.value, UsageError)
    text = str(e.value)
    assert named in text, text
    assert re.sub(r"\s+", " ", entry(key).note) in re.sub(r"\s+", " ", text)  # the table's text
    # and from the command line: exit 2, the key named
    import yaml

    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "c.yml"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and named in res.output, res.output


def test_misspelt_keys_get_a_suggestion():
    _, problems = translate(_models(_m(), out_dtyp="bfloat16"))
    assert problems == [
        "`out_dtyp`: " + entry("any other key").note + " (did you mean `out_dtype`?)"
    ]
    _, problems = translate(_models({"model": "/m/a", "weight": 0.5}))
    assert problems[0].endswith("(a parameter? put it under `models[0].parameters`)")


def test_the_importer_knows_the_tables_top_level_keys():
    assert top_level_keys() == {
        "merge_method", "base_model", "models", "parameters", "slices", "dtype", "out_dtype",
        "tokenizer_source", "tokenizer", "chat_template", "name",
    }  # fmt: skip
    _, problems = translate(_models(_m(), name="stage-1", tokenizer_source="/m/a"))
    assert problems == []


def test_ignored_keys_change_nothing():
    plain, _ = translate(_models(_m(), _m("/m/b"), method="ties", base_model="/m/base"))
    masked, problems = translate(
        _models(_m(), _m("/m/b"), method="ties", base_model="/m/base",
                parameters={"int8_mask": True}, name="x")
    )  # fmt: skip
    assert problems == [] and masked == plain
    sliced = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "/m/a", "layer_range": [0, 2]}]}],
    }
    want, _ = translate(sliced)
    sliced["slices"][0]["residual_weight"] = 0.5
    with pytest.warns(MergeWarning, match=r"`slices\[0\]\.residual_weight` has no effect"):
        got, problems = translate(sliced)
    assert problems == [] and got == want


def test_a_single_filter_mapping_is_a_filter_list():
    one, _ = translate(
        _models(_m(), _m("/m/b"), method="ties", base_model="/m/base",
                parameters={"density": {"filter": "mlp", "value": 0.3}})
    )  # fmt: skip
    listed, _ = translate(
        _models(_m(), _m("/m/b"), method="ties", base_model="/m/base",
                parameters={"density": [{"filter": "mlp", "value": 0.3}]})
    )  # fmt: skip
    assert one == listed and any(o.get("regex") == "mlp" for o in one["overrides"])


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_run_help_lists_the_table():
    res = CliRunner().invoke(cli, ["run", "--help"])
    assert res.exit_code == 0
    text = _squash(res.output)
    for k in SCHEMA:
        assert f"{k.key} {_squash(k.note)}" in text, k.key


def test_docs_hold_the_table_verbatim():
    assert markdown_table() in DOCS.read_text(), (
        "docs/methods.md: paste `python -c 'from merge.mergekit_schema import markdown_table; "
        "print(markdown_table())'` into its mergekit section"
    )
