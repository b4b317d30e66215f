"""Merged tiny Llamas load with from_pretrained and give the logits the formula predicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from merge.cli import cli


def tiny_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llamas(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Path], bool]:
    root = tmp_path_factory.mktemp("llama")
    tied = bool(request.param)
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(tiny_config(tied)).to(torch.bfloat16)
        m.save_pretrained(root / f"m{seed}")
        paths.append(root / f"m{seed}")
    return root, paths, tied


def logits_of(state: dict[str, torch.Tensor], tied: bool, ids: torch.Tensor) -> torch.Tensor:
    m = LlamaForCausalLM(tiny_config(tied)).to(torch.bfloat16)
    m.load_state_dict(state, strict=False)
    if tied:
        m.tie_weights()
    return m.eval()(ids).logits


def test_linear_merge_loads_and_matches_the_formula(llamas: tuple[Path, list[Path], bool]) -> None:
    root, paths, tied = llamas
    out = root / f"linear-{tied}"
    res = CliRunner().invoke(
        cli,
        [
            "linear",
            str(paths[0]),
            str(paths[1]),
            "--weights",
            "0.3,0.7",
            "-o",
            str(out),
            "-q",
            "--force",
        ],
    )
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (
        json.loads((out / "config.json").read_text()).get(
            "dtype", json.loads((out / "config.json").read_text()).get("torch_dtype")
        )
        == "bfloat16"
    )
    sds = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in paths[:2]]
    # The formula in float64, rounded once to bf16. The engine computes in float32 (as a fused
    # weighted sum), so a rare element may land one bf16 step away; nothing more.
    expected = {k: (0.3 * sds[0][k].double() + 0.7 * sds[1][k].double()).bfloat16() for k in sds[0]}
    got = merged.state_dict()
    for k, v in expected.items():
        diff = (got[k].float() - v.float()).abs()
        assert float((diff > 0).float().mean()) < 0.01, k
        torch.testing.assert_close(got[k], v, rtol=2**-7, atol=0)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        ref_logits = logits_of(got, tied, ids)  # the same weights in a model built by hand
        torch.testing.assert_close(merged(ids).logits, ref_logits, rtol=0, atol=0)
        torch.testing.assert_close(ref_logits, logits_of(expected, tied, ids), rtol=0.05, atol=2e-3)
    if tied:
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
        from safetensors import safe_open

        with safe_open(out / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()  # tied: stored once, as in the inputs


def test_task_arithmetic_recipe_on_llamas(
    llamas: tuple[Path, list[Path], bool], tmp_path: Path
) -> None:
    _, paths, _ = llamas
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"inputs: {{base: {paths[0]}, math: {paths[1]}, toxic: {paths[2]}}}\n"
        "steps:\n  final: base + 0.7 * (math - base) - 0.4 * (toxic - base)\n"
        "output: {dtype: float32}\n"
    )
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    sds = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in paths]
    b, m, t = ({k: v.float() for k, v in sd.items()} for sd in sds)
    for k, v in merged.state_dict().items():
        if k in b:
            torch.testing.assert_close(
                v, b[k] + 0.7 * (m[k] - b[k]) - 0.4 * (t[k] - b[k]), rtol=1e-6, atol=1e-6
            )
