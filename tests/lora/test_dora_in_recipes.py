"""`base + k * dora` in a recipe means peft's scale k inside the DoRA norm; other uses are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge.api import merge_expression
from merge.errors import PlanError


def test_k_times_dora_in_an_expression_equals_peft_at_scale_k(llama: dict, work: Path) -> None:
    inputs = {"base": str(llama["base"]), "dora": str(llama["adapters"]["dora"])}
    out = merge_expression("base + 0.8 * dora", inputs, work / "expr_dora08", force=True)
    got = load_file(out / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[key], llama["merged08"]["dora"][key], atol=1e-6, rtol=1e-5)


def test_dora_inside_a_method_or_without_its_base_is_refused(llama: dict, work: Path) -> None:
    inputs = {"base": str(llama["base"]), "dora": str(llama["adapters"]["dora"])}
    with pytest.raises(PlanError, match="`dora` is a DoRA adapter, which is not a delta"):
        merge_expression(
            "linear(base, base + dora, weight=[1, 1])", inputs, work / "bad1", force=True
        )
    assert not (work / "bad1").exists()
