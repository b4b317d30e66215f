"""The method recipes in recipes/ run end to end on tiny checkpoints and give the direct result."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import merge.api as api
from merge.errors import MergeWarning
from merge.io import load_state_dict, save_state_dict
from merge.methods.model_stock import model_stock
from merge.methods.slerp import slerp
from merge.methods.ties import ties
from merge.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
NAMES = {
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.1.self_attn.q_proj.weight": (4, 4),
    "model.layers.2.mlp.down_proj.weight": (4, 6),
    "model.norm.weight": (4,),
}


def _inputs(tmp: Path, recipe_file: str) -> dict[str, dict[str, torch.Tensor]]:
    shutil.copy(RECIPES / recipe_file, tmp / recipe_file)
    text = (RECIPES / recipe_file).read_text()
    data = yaml.safe_load(text)
    paths = (
        list(data["inputs"].values())
        if "inputs" in data
        else [m["model"] for m in data["models"]] + [data["base_model"]]
    )
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in NAMES.items()}
    states = {}
    for p in paths:
        name = Path(p).name
        sd = (
            base
            if name == "base"
            else {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        )
        save_state_dict(dict(sd), tmp / p.removeprefix("./"), force=True)
        states[name] = sd
    return states


def test_ties_recipe(tmp_path):
    st = _inputs(tmp_path, "ties.yaml")
    out = load_state_dict(api.run_recipe(tmp_path / "ties.yaml", tmp_path / "out"))
    for k in NAMES:
        d = 0.3 if re.fullmatch(r".*\.mlp\..*", k) else 0.2
        skills = ties(
            [st["math"][k], st["code"][k]], base=st["base"][k], weight=[1.0, 0.8], density=[d, d]
        )
        want = skills - 0.5 * (st["toxic"][k] - st["base"][k])
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)


def test_dare_ties_recipe_is_reproducible(tmp_path):
    _inputs(tmp_path, "dare-ties.yaml")
    a = load_state_dict(api.run_recipe(tmp_path / "dare-ties.yaml", tmp_path / "a"))
    b = load_state_dict(api.run_recipe(tmp_path / "dare-ties.yaml", tmp_path / "b"))
    for k in NAMES:
        assert torch.equal(a[k], b[k])


def test_slerp_gradient_recipe(tmp_path):
    st = _inputs(tmp_path, "slerp-gradient.yaml")
    out = load_state_dict(api.run_recipe(tmp_path / "slerp-gradient.yaml", tmp_path / "out"))
    # 3 layers: t(layer 1) on the attention curve [0, .5, .3, .7, 1] at 1/2 → 0.3
    k = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(
        out[k], slerp([st["ft-b"][k]], base=st["ft-a"][k], t=0.3), rtol=1e-5, atol=1e-6
    )
    k = "model.norm.weight"  # no layer index, no filter match: t = 0.5
    torch.testing.assert_close(
        out[k], slerp([st["ft-b"][k]], base=st["ft-a"][k], t=0.5), rtol=1e-5, atol=1e-6
    )


def test_model_stock_and_iso_recipes(tmp_path):
    st = _inputs(tmp_path, "model-stock.yaml")
    # independent random fine-tunes: some tensors' task vectors point apart (cos < 0), where
    # model_stock keeps the base and says so
    with pytest.warns(MergeWarning, match="pointing apart"):
        out = load_state_dict(api.run_recipe(tmp_path / "model-stock.yaml", tmp_path / "out"))
    k = "model.layers.0.mlp.up_proj.weight"
    with pytest.warns(MergeWarning, match="pointing apart"):
        want = model_stock([st["run1"][k], st["run2"][k], st["run3"][k]], base=st["base"][k])
    torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)
    _inputs(tmp_path, "iso-c.yaml")
    out = load_state_dict(api.run_recipe(tmp_path / "iso-c.yaml", tmp_path / "iso"))
    assert set(out) == set(NAMES)


def test_mergekit_config_runs_with_compat_mergekit(tmp_path, capfd):
    st = _inputs(tmp_path, "mergekit-ties.yml")
    out = load_state_dict(api.run_recipe(tmp_path / "mergekit-ties.yml", tmp_path / "out"))
    # the library says so in the program (`merge run` prints it: test_core_cli), never on stderr
    assert load_recipe(tmp_path / "mergekit-ties.yml").translated_from == "mergekit"
    assert "compat: mergekit" not in capfd.readouterr().err
    k = "model.layers.1.self_attn.q_proj.weight"  # t = 1/2: math density 0.7, code weight 0.3
    # mergekit's arithmetic: inputs cast to the config's dtype (bf16) and merged in it.
    bf = torch.bfloat16
    want = ties(
        [st["math"][k].to(bf), st["code"][k].to(bf)],
        base=st["base"][k].to(bf),
        weight=[1.0, 0.3],
        density=[0.7, 0.5],
        compat="mergekit",
        compute_dtype="bfloat16",
    )
    assert want.dtype == bf
    torch.testing.assert_close(out[k], want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "recipe",
    [
        "ties.yaml",
        "dare-ties.yaml",
        # random task vectors: model_stock warns where they point apart (tested above)
        pytest.param(
            "model-stock.yaml",
            marks=pytest.mark.filterwarnings("ignore::merge.errors.MergeWarning"),
        ),
    ],
)
def test_streaming_equals_in_memory(tmp_path, recipe):
    _inputs(tmp_path, recipe)
    written = load_state_dict(api.run_recipe(tmp_path / recipe, tmp_path / "out"))
    in_memory = api.evaluate_recipe_in_memory(tmp_path / recipe)
    assert set(written) == set(in_memory)
    for k in written:
        assert torch.equal(written[k], in_memory[k].to(written[k].dtype)), k
