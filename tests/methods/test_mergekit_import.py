"""mergekit configs translated into recipes: exact dict equality and named refusals."""

from __future__ import annotations

import pytest
import yaml

from merge.errors import MergeWarning
from merge.mergekit_import import is_mergekit_config, translate
from merge.methods import get_method

TIES_YML = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

SLERP_YML = """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""

FRANKEN_YML = """
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
"""


def test_ties_example_translates_exactly():
    d = yaml.safe_load(TIES_YML)
    assert is_mergekit_config(d)
    recipe, problems = translate(d)
    assert problems == []
    assert recipe == {
        "version": 1,
        "description": "translated from a mergekit `ties` config",
        "inputs": {
            "base": "TheBloke/Llama-2-13B-fp16",
            "orca_mini_v3_13b": "psmathur/orca_mini_v3_13b",
            "platypus2_13b": "garage-bAInd/Platypus2-13B",
            "wizardmath_13b_v1_0": "WizardLM/WizardMath-13B-V1.0",
        },
        "steps": {
            "merged": {
                "method": "ties",
                "base": "base",
                "normalize": True,
                "models": {
                    "orca_mini_v3_13b": {"density": [1.0, 0.7, 0.1], "weight": 1.0},
                    "platypus2_13b": {"density": 0.5, "weight": [0.0, 0.3, 0.7, 1.0]},
                    "wizardmath_13b_v1_0": {"density": 0.33, "weight": 0},
                },
            }
        },
        "output": {"from": "merged", "dtype": "float16"},
        "options": {"compat": "mergekit", "compute_dtype": "float16"},
        "overrides": [
            {"regex": "mlp", "step": "merged", "input": "wizardmath_13b_v1_0", "weight": 0.5}
        ],
    }


def test_slerp_slices_with_filters_become_overrides_in_reverse_order():
    recipe, problems = translate(yaml.safe_load(SLERP_YML))
    assert problems == []
    assert recipe["inputs"] == {
        "base": "psmathur/orca_mini_v3_13b",
        "platypus2_13b": "garage-bAInd/Platypus2-13B",
    }
    assert recipe["slices"] == [
        {
            "sources": [
                {"input": "base", "layers": [0, 40]},
                {"input": "platypus2_13b", "layers": [0, 40]},
            ],
            "method": "slerp",
            "base": "base",
            "t": 0.5,
        }
    ]
    # mergekit: first matching filter wins; recipe: last matching override wins
    assert recipe["overrides"] == [
        {"regex": "mlp", "step": "slice0", "t": [1.0, 0.5, 0.7, 0.3, 0.0]},
        {"regex": "self_attn", "step": "slice0", "t": [0.0, 0.5, 0.3, 0.7, 1.0]},
    ]


def test_model_level_fallback_shadows_top_level_filters():
    recipe, problems = translate(
        {
            "merge_method": "dare_ties",
            "base_model": "/m/base",
            "models": [
                {"model": "/m/a", "parameters": {"weight": 1.0, "density": 0.4}},
                {
                    "model": "/m/b",
                    "parameters": {"weight": 0.5, "density": [{"filter": "attn", "value": 0.9}]},
                },
            ],
            "parameters": {
                "density": [{"filter": "mlp", "value": 0.2}, {"value": 0.6}],
                "lambda": 0.8,
            },
        }
    )
    assert problems == []
    step = recipe["steps"]["merged"]
    assert step["scale"] == 0.8
    assert step["models"] == {
        "a": {"density": 0.4, "weight": 1.0},
        "b": {"density": 0.6, "weight": 0.5},
    }
    assert recipe["overrides"] == [
        {"regex": "mlp", "step": "merged", "input": "b", "density": 0.2},
        {"regex": "attn", "step": "merged", "input": "b", "density": 0.9},
    ]


def test_karcher_takes_the_base_as_a_peer_and_tokenizer_base_copies_files():
    recipe, problems = translate(
        {
            "merge_method": "karcher",
            "base_model": "/m/base",
            "models": [{"model": "/m/a"}, {"model": "/m/b"}],
            "parameters": {"max_iter": 20},
            "tokenizer_source": "base",
        }
    )
    assert problems == []
    assert recipe["steps"]["merged"] == {
        "method": "karcher",
        "max_iter": 20,
        "models": {"a": {}, "b": {}, "base": {}},
    }
    assert recipe["output"] == {"from": "merged", "copy_files_from": "base"}


def test_frankenmerge_slices_translate_to_recipe_slices():
    recipe, problems = translate(yaml.safe_load(FRANKEN_YML))
    assert problems == []
    assert recipe["inputs"] == {
        "orca_mini_v3_13b": "psmathur/orca_mini_v3_13b",
        "platypus2_13b": "garage-bAInd/Platypus2-13B",
    }
    assert recipe["slices"] == [
        {"sources": [{"input": "orca_mini_v3_13b", "layers": [0, 24]}], "method": "passthrough"},
        {"sources": [{"input": "platypus2_13b", "layers": [20, 40]}], "method": "passthrough"},
    ]
    assert recipe["output"] == {"dtype": "float16"}


def test_per_slice_base_and_parameters_translate():
    recipe, problems = translate(
        {
            "merge_method": "ties",
            "base_model": "/m/base",
            "parameters": {"density": 0.5},
            "slices": [
                {
                    "sources": [
                        {"model": "/m/base", "layer_range": [0, 2]},
                        {"model": "/m/a", "layer_range": [0, 2], "parameters": {"weight": 0.3}},
                    ],
                    "parameters": {"weight": 0.7, "density": [{"filter": "mlp", "value": 0.2}]},
                },
                {
                    "sources": [
                        {"model": "/m/a", "layer_range": [2, 4]},
                        {"model": "/m/b", "layer_range": [2, 4]},
                    ],
                    "base_model": "/m/a",
                    "parameters": {"weight": 1.0},
                },
            ],
        }
    )
    assert problems == []
    assert recipe["slices"] == [
        {
            "sources": [
                {"input": "base", "layers": [0, 2]},
                {"input": "a", "layers": [0, 2], "density": 0.5, "weight": 0.3},
            ],
            "method": "ties",
            "base": "base",
        },
        {
            "sources": [
                {"input": "a", "layers": [2, 4]},
                {"input": "b", "layers": [2, 4], "density": 0.5, "weight": 1.0},
            ],
            "method": "ties",
            "base": "a",
        },
    ]
    assert recipe["overrides"] == [{"regex": "mlp", "step": "slice0", "input": "a", "density": 0.2}]
    _, problems = translate(
        {
            "merge_method": "ties",
            "base_model": "/m/base",
            "slices": [{"sources": [{"model": "/m/a", "layer_range": [0, 2]}]}],
        }
    )
    assert problems == [
        "slices[0]: the base model `/m/base` is not among this slice's sources; list it with "
        "the same `layer_range` as the others"
    ]


def test_untranslatable_keys_are_each_named():
    with pytest.warns(MergeWarning, match="takes no parameter `densty`"):
        _, problems = translate(
            {
                "merge_method": "ties",
                "base_model": "/m/base",
                "models": [{"model": "/m/a", "parameters": {"densty": 0.5}}],
                "tokenizer_source": "union",
                "chat_template": "chatml",
            }
        )
    assert problems == [
        "`chat_template`: not translated yet; remove it",
        "tokenizer_source: union builds a merged vocabulary and re-maps embedding rows, which merge does not do; merge models that share a vocabulary, or use `tokenizer_source: base`",
    ]
    _, problems = translate({"merge_method": "model_breadcrumbs", "models": [{"model": "/m/a"}]})
    assert problems[0].startswith("merge_method `model_breadcrumbs` has no counterpart in merge")


@pytest.mark.parametrize("method", ["slerp", "sce", "ram", "model_stock", "nearswap"])
def test_unused_mergekit_parameters_warn_once_each_and_are_dropped(method):
    config = {
        "merge_method": method,
        "base_model": "/m/base",
        "models": [
            {"model": "/m/a", "parameters": {"weight": 0.5}},
            {"model": "/m/b", "parameters": {"weight": 0.5, "densty": 0.3}},
        ],
        "parameters": {"t": 0.5} if method in ("slerp", "nearswap") else {},
    }
    if method in ("slerp", "nearswap"):
        config["models"] = [*config["models"][:1], {"model": "/m/base"}]
    with pytest.warns(MergeWarning) as record:
        recipe, problems = translate(config)
    assert problems == []
    messages = sorted(str(w.message) for w in record)
    takes = ", ".join(
        sorted(set(get_method(method).per_model) | set(get_method(method).global_params))
    )
    expected = [
        f"mergekit config: `{method}` takes no parameter `weight`; ignored as mergekit ignores it "
        f"(models[0].parameters.weight{', models[1].parameters.weight' if method not in ('slerp', 'nearswap') else ''}; `{method}` takes: {takes})"
    ]
    if method not in ("slerp", "nearswap"):
        expected.insert(
            0,
            f"mergekit config: `{method}` takes no parameter `densty`{' (did you mean `density`?)' if 'density' in takes else ''}; "
            f"ignored as mergekit ignores it (models[1].parameters.densty; `{method}` takes: {takes})",
        )
    assert messages == expected
    assert all("weight" not in p for p in recipe["steps"]["merged"]["models"].values())
    import merge.recipe as recipe_mod

    recipe_mod.compile_recipe(recipe_mod.Recipe.model_validate(recipe))


def test_our_recipes_stay_strict_about_unused_parameters():
    from merge.errors import RecipeError
    from merge.recipe import load_recipe

    with pytest.raises(RecipeError, match="`weight` is not a per-model parameter of `slerp`"):
        load_recipe(
            {
                "inputs": {"base": "/m/base", "a": "/m/a"},
                "steps": {
                    "s": {
                        "method": "slerp",
                        "base": "base",
                        "t": 0.5,
                        "models": {"a": {"weight": 1.0}},
                    }
                },
            }
        )


def test_lora_references_are_refused():
    _, problems = translate(
        {
            "merge_method": "linear",
            "models": [{"model": "/m/a+/l/lora", "parameters": {"weight": 1}}],
        }
    )
    assert problems[0].startswith("`models[0].model` (`/m/a+/l/lora`): LoRA model references")


@pytest.mark.parametrize(
    "text,last", [(TIES_YML, "merged"), (SLERP_YML, "slice0"), (FRANKEN_YML, "slice1")]
)
def test_translations_validate_as_recipes(text, last):
    import merge.recipe as recipe_mod

    recipe, _ = translate(yaml.safe_load(text))
    program = recipe_mod.compile_recipe(recipe_mod.Recipe.model_validate(recipe))
    assert program.output_step == last


def test_recipes_are_not_mergekit_configs():
    assert not is_mergekit_config({"version": 1, "inputs": {}, "steps": {}})
