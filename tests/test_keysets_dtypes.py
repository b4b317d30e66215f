"""Different architectures and mixed dtypes (14.17, 14.18): no output that no config describes,
the dtype a mixed merge writes is said, float16 overflow is refused by tensor name."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from merge.cli import cli
from merge.errors import MergeWarning


def invoke(*args: object) -> tuple[int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergeWarning)
        r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama, a tiny GPT-2, and the Llama with one extra tensor (saved differently)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("arch")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=32,
        )
    )
    llama.save_pretrained(d / "llama")
    GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=8)
    ).save_pretrained(d / "gpt2")
    (d / "llama_extra").mkdir()
    state = load_file(d / "llama" / "model.safetensors")
    save_file(state | {"extra.weight": torch.ones(2)}, d / "llama_extra" / "model.safetensors")
    (d / "llama_extra" / "config.json").write_bytes((d / "llama" / "config.json").read_bytes())
    return {"llama": d / "llama", "gpt2": d / "gpt2", "llama_extra": d / "llama_extra", "dir": d}


def test_different_architectures_are_refused_with_no_misleading_hint(models: dict) -> None:
    out = models["dir"] / "out"
    code, text = invoke("linear", models["llama"], models["gpt2"], "-o", out)
    assert code == 1
    assert "these look like different architectures (they share 0% of their tensor names)" in text
    assert "use `options: {keys: intersection}`" not in text
    code, text = invoke(
        "linear", models["llama"], models["gpt2"], "--keys", "intersection", "-o", out
    )
    assert code == 1
    assert "--keys intersection leaves no tensor to write: `m0`" in text
    assert "share no tensor names (different architectures?); there is nothing to merge" in text
    code, text = invoke("linear", models["llama"], models["gpt2"], "--keys", "union", "-o", out)
    assert code == 1
    assert (
        "--keys union adds 16 tensor(s) that `m0`'s model does not have (transformer.h.0.attn.c_attn.bias"
        in text
    )
    assert "under `m0`'s config.json" in text
    assert (
        "pass --mixed-architectures (recipe: `options: {mixed_architectures: true}`) to write it anyway"
        in text
    )
    assert not out.exists()
    # said explicitly: written
    code, text = invoke(
        "linear",
        models["llama"],
        models["gpt2"],
        "--keys",
        "union",
        "--mixed-architectures",
        "-o",
        out,
    )
    assert code == 0, text
    llama, gpt2 = (load_file(models[m] / "model.safetensors") for m in ("llama", "gpt2"))
    assert len(gpt2) == 16
    assert sorted(load_file(out / "model.safetensors")) == sorted([*llama, *gpt2])


def test_one_architecture_saved_differently_keeps_the_hint(models: dict) -> None:
    out = models["dir"] / "out2"
    code, text = invoke("linear", models["llama"], models["llama_extra"], "-o", out)
    assert code == 1
    assert "`m1` (" in text and "has 1 tensor(s) that other inputs lack: extra.weight" in text
    assert (
        "if these are one architecture saved differently (a tied lm_head, an extra buffer), use"
        in text
    )
    code, text = invoke(
        "linear", models["llama"], models["llama_extra"], "--keys", "intersection", "-o", out
    )
    assert code == 0, text
    assert "extra.weight" not in load_file(out / "model.safetensors")
    # union would put `extra.weight` under a config that has no such tensor
    code, text = invoke(
        "linear", models["llama"], models["llama_extra"], "--keys", "union", "-o", out, "--force"
    )
    assert (
        code == 1
        and "--keys union adds 1 tensor(s) that `m0`'s model does not have (extra.weight)" in text
    )


def _mixed(tmp_path: Path, big: float) -> tuple[Path, Path]:
    save_file(
        {"w": torch.ones(3, dtype=torch.float16), "v": torch.ones(2, dtype=torch.float16)},
        tmp_path / "a.safetensors",
    )
    b = {
        "w": torch.tensor([big, 1.0, 2.0], dtype=torch.bfloat16),
        "v": torch.ones(2, dtype=torch.bfloat16),
    }
    save_file(b, tmp_path / "b.safetensors")
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors"


def test_mixed_dtypes_say_the_output_dtype(tmp_path: Path) -> None:
    from merge.api import plan_recipe
    from merge.recipe import load_recipe

    a, b = _mixed(tmp_path, 3.0)
    recipe = {
        "inputs": {"a": str(a), "b": str(b)},
        "steps": {"m": {"method": "linear", "models": {"a": {}, "b": {}}}},
    }
    with pytest.warns(MergeWarning) as caught:
        plan = plan_recipe(load_recipe(recipe))
    note = (
        "the inputs mix float dtypes (float16: `a`; bfloat16: `b`); the output is float16, as in "
        "the first input `a` (choose with --dtype or `output.dtype`); values beyond float16's range "
        "(±65504) are refused, not written as inf"
    )
    assert [str(w.message) for w in caught] == [note]
    assert plan.notes == [note]
    assert {j.dtype for j in plan.jobs} == {torch.float16}
    plan.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)  # a chosen dtype: nothing to say
        plan_recipe(load_recipe(recipe), dtype="bfloat16").close()


def test_float16_overflow_is_refused_by_name(tmp_path: Path) -> None:
    a, b = _mixed(tmp_path, 3e5)  # (1 + 3e5) / 2 > 65504
    code, text = invoke("linear", a, b, "-o", tmp_path / "m.safetensors")
    assert code == 1
    assert (
        "`w`: 1 value(s) are beyond float16's range (±65504) and would be written as inf; write "
        "bfloat16 or float32 instead (--dtype bfloat16, or `output.dtype` in the recipe)"
    ) in text
    assert not (tmp_path / "m.safetensors").exists()
    code, text = invoke("linear", a, b, "--dtype", "bfloat16", "-o", tmp_path / "m.safetensors")
    assert code == 0, text
    got = load_file(tmp_path / "m.safetensors")["w"]
    assert got.dtype == torch.bfloat16 and float(got[0]) == pytest.approx(150000.5, rel=1e-2)


def test_float16_copies_are_not_checked(tmp_path: Path) -> None:
    """A float16 tensor copied as it is keeps its values (even ±inf in a mask buffer); a float16
    output computed or cast from another dtype is checked."""
    from merge.api import plan_recipe
    from merge.execute import float16_checked

    a, b = _mixed(tmp_path, 3.0)
    plan = plan_recipe({"inputs": {"a": str(a), "b": str(b)}, "steps": {"m": "a"}})
    assert {j.mode for j in plan.jobs} == {"copy"} and float16_checked(plan) == set()
    plan.close()
    plan = plan_recipe({"inputs": {"a": str(a), "b": str(b)}, "steps": {"m": "b"}}, dtype="float16")
    assert float16_checked(plan) == {"w", "v"}
    plan.close()
