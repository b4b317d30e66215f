"""Layer slices: frankenmerges, depth up-scaling and per-slice merges on tiny transformers models
built offline from configs, checked tensor by tensor and loaded with AutoModelForCausalLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from merge.api import run_recipe
from merge.errors import PlanError, RecipeError
from merge.recipe import load_recipe


def _save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def _llama(seed: int, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("slice-llamas")
    return _save(_llama(1), root / "a"), _save(_llama(2), root / "b")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _run(recipe: dict, out: Path) -> Path:
    return run_recipe(recipe, out, quiet=True)


def test_passthrough_stack_renumbers_every_layer_tensor(llamas, tmp_path):
    a, b = llamas
    out = _run(
        {
            "inputs": {"a": str(a), "b": str(b)},
            "slices": [
                {"sources": [{"input": "a", "layers": [0, 3]}]},
                {"sources": [{"input": "b", "layers": [1, 4]}]},
            ],
        },
        tmp_path / "out",
    )
    got, wa, wb = _weights(out), _weights(a), _weights(b)
    # Hand-worked mapping: output layers 0-2 are a's 0-2, output layers 3-5 are b's 1-3.
    expected = {"model.embed_tokens.weight": wa["model.embed_tokens.weight"]}
    for j in range(6):
        src, i = (wa, j) if j < 3 else (wb, j - 2)
        for k in wa:
            if k.startswith("model.layers.0."):
                rest = k.removeprefix("model.layers.0.")
                expected[f"model.layers.{j}.{rest}"] = src[f"model.layers.{i}.{rest}"]
    expected["model.norm.weight"] = wb["model.norm.weight"]
    expected["lm_head.weight"] = wb["lm_head.weight"]
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    assert model(ids).logits.shape == (1, 4, 64)


def test_depth_up_scaling_two_copies_of_12_layers_give_24(tmp_path):
    # SOLAR-style: the same model's layers [0, 8) and [4, 12) stacked; here two full copies.
    src = _save(_llama(3, layers=12), tmp_path / "m12")
    out = _run(
        {
            "inputs": {"m": str(src)},
            "slices": [
                {"sources": [{"input": "m", "layers": [0, 12]}]},
                {"sources": [{"input": "m", "layers": [0, 12]}]},
            ],
        },
        tmp_path / "out",
    )
    got, w = _weights(out), _weights(src)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 24
    for j in range(24):
        k = f"model.layers.{j}.mlp.down_proj.weight"
        assert torch.equal(got[k], w[f"model.layers.{j % 12}.mlp.down_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 24
    model(torch.tensor([[1, 2, 3]]))


def test_per_slice_method_base_and_parameters(llamas, tmp_path):
    a, b = llamas
    out = _run(
        {
            "inputs": {"a": str(a), "b": str(b)},
            "slices": [
                {"sources": [{"input": "a", "layers": [0, 2]}]},
                {
                    "sources": [
                        {"input": "a", "layers": [2, 4]},
                        {"input": "b", "layers": [2, 4], "weight": 0.25},
                    ],
                    "method": "linear",
                    "weight": 0.75,
                },
                {
                    "sources": [{"input": "a", "layers": [1, 3]}, {"input": "b", "layers": [0, 2]}],
                    "method": "task_arithmetic",
                    "base": "a",
                    "scale": 0.5,
                },
            ],
        },
        tmp_path / "out",
    )
    got, wa, wb = _weights(out), _weights(a), _weights(b)
    k = "self_attn.q_proj.weight"
    for j in range(2):
        assert torch.equal(got[f"model.layers.{j}.{k}"], wa[f"model.layers.{j}.{k}"])
        lin = 0.75 * wa[f"model.layers.{2 + j}.{k}"] + 0.25 * wb[f"model.layers.{2 + j}.{k}"]
        torch.testing.assert_close(got[f"model.layers.{2 + j}.{k}"], lin)
        base = wa[f"model.layers.{1 + j}.{k}"]
        ta = base + 0.5 * (wb[f"model.layers.{j}.{k}"] - base)
        torch.testing.assert_close(got[f"model.layers.{4 + j}.{k}"], ta)
    # post weights from the last slice, merged by its method
    torch.testing.assert_close(
        got["lm_head.weight"],
        wa["lm_head.weight"] + 0.5 * (wb["lm_head.weight"] - wa["lm_head.weight"]),
    )
    assert torch.equal(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[4, 2]]))


def test_gradients_run_over_each_slice_own_layers(llamas, tmp_path):
    a, b = llamas
    out = _run(
        {
            "inputs": {"a": str(a), "b": str(b)},
            "slices": [
                {
                    "sources": [{"input": "a", "layers": [1, 4]}, {"input": "b", "layers": [1, 4]}],
                    "method": "slerp",
                    "base": "a",
                    "t": [0.0, 1.0],
                }
            ],
        },
        tmp_path / "out",
    )
    got, wa, wb = _weights(out), _weights(a), _weights(b)
    k = "mlp.up_proj.weight"
    # t = 0, 0.5, 1 over the slice's three layers: first is a's, last is b's.
    torch.testing.assert_close(got[f"model.layers.0.{k}"], wa[f"model.layers.1.{k}"])
    torch.testing.assert_close(got[f"model.layers.2.{k}"], wb[f"model.layers.3.{k}"])


def _qwen2(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
    )
    return _save(Qwen2ForCausalLM(cfg).eval(), tmp_path / "qwen2")


def _gpt2(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=32)
    return _save(GPT2LMHeadModel(cfg).eval(), tmp_path / "gpt2")


def _phi(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = PhiConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    return _save(PhiForCausalLM(cfg).eval(), tmp_path / "phi")


@pytest.mark.parametrize(
    "make,count_key,prefix", [(_gpt2, "n_layer", "transformer.h"), (_phi, None, "model.layers")]
)
def test_other_architectures_stack_and_load(make, count_key, prefix, tmp_path):
    src = make(tmp_path)
    out = _run(
        {
            "inputs": {"m": str(src)},
            "slices": [
                {"sources": [{"input": "m", "layers": [0, 2]}]},
                {"sources": [{"input": "m", "layers": [1, 3]}]},
            ],
        },
        tmp_path / "out",
    )
    config = json.loads((out / "config.json").read_text())
    assert config[count_key or "num_hidden_layers"] == 4
    got, w = _weights(out), _weights(src)
    layer_keys = [k for k in w if k.startswith(f"{prefix}.1.")]
    for k in layer_keys:
        assert torch.equal(got[k.replace(".1.", ".3.", 1)], w[k.replace(".1.", ".2.", 1)])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    model(torch.tensor([[1, 2, 3]]))


def test_layer_indexed_config_lists_follow_the_layers(tmp_path):
    src = _qwen2(tmp_path)
    out = _run(
        {
            "inputs": {"m": str(src)},
            "slices": [
                {"sources": [{"input": "m", "layers": [0, 2]}]},
                {"sources": [{"input": "m", "layers": [1, 4]}]},
            ],
        },
        tmp_path / "out",
    )
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert config["layer_types"] == [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    model(torch.tensor([[1, 2, 3]]))


def test_unknown_architecture_is_refused_naming_what_is_missing(llamas, tmp_path):
    a, _ = llamas
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes())
    config = json.loads((a / "config.json").read_text())
    config["model_type"] = "mamba"
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match=r"model_type `mamba` \(LlamaForCausalLM\) is not known"):
        _run(
            {
                "inputs": {"m": str(odd)},
                "slices": [{"sources": [{"input": "m", "layers": [0, 2]}]}],
            },
            tmp_path / "out",
        )


def test_ranges_past_the_model_are_refused(llamas, tmp_path):
    a, _ = llamas
    with pytest.raises(PlanError, match=r"layers \[2, 6\] reach past `m`'s 4 layers"):
        _run(
            {"inputs": {"m": str(a)}, "slices": [{"sources": [{"input": "m", "layers": [2, 6]}]}]},
            tmp_path / "out",
        )


def test_slice_recipe_problems_are_reported_together():
    with pytest.raises(RecipeError) as e:
        load_recipe(
            {
                "inputs": {"a": "/m/a", "b": "/m/b"},
                "slices": [
                    {
                        "sources": [
                            {"input": "a", "layers": [0, 4]},
                            {"input": "c", "layers": [0, 3]},
                        ]
                    },
                    {"sources": [{"input": "a", "layers": [3, 1]}]},
                ],
            }
        )
    text = str(e.value)
    assert "slices[0].sources[1].input: no input named `c`" in text
    assert "slices[0].sources: the sources of one slice must span the same number" in text
    assert "slices[0].method: a slice with several sources needs a `method:`" in text
    assert "slices[1].sources[0].layers: [3, 1] is not a layer range" in text
