"""The layer-slice recipes in recipes/ (our shape and a mergekit config) run on tiny Llamas and
give the hand-worked tensors name by name; the mergekit one also equals mergekit 0.1.5's output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mk_oracle import HAVE_MERGEKIT, run_mergekit, run_ours, tensors, tiny_llama
from transformers import AutoModelForCausalLM

from merge.methods.slerp import slerp

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    tiny_llama(tmp_path / "ft-a", 1, layers=4)
    tiny_llama(tmp_path / "ft-b", 2, layers=4)
    for name in ("slices-frankenmerge.yaml", "mergekit-slices.yml"):
        shutil.copy(RECIPES / name, tmp_path / name)
    return tmp_path


def _expected(a: dict, b: dict, middle) -> dict[str, torch.Tensor]:
    """a's layers 0-2, `middle(j, name)` for output layers 3-4 (layers 2+j of a and b), b's
    layer 3; embeddings from a, norm and lm_head from b."""
    want = {"model.embed_tokens.weight": a["model.embed_tokens.weight"]}
    parts = [k.removeprefix("model.layers.0.") for k in a if k.startswith("model.layers.0.")]
    for rest in parts:
        for j in range(3):
            want[f"model.layers.{j}.{rest}"] = a[f"model.layers.{j}.{rest}"]
        for j in range(2):
            want[f"model.layers.{3 + j}.{rest}"] = middle(j, rest)
        want[f"model.layers.5.{rest}"] = b[f"model.layers.3.{rest}"]
    want["model.norm.weight"] = b["model.norm.weight"]
    want["lm_head.weight"] = b["lm_head.weight"]
    return want


def _check(out: Path, got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, msg=k)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_our_slices_recipe(workdir):
    out = workdir / "franken"
    got = run_ours(workdir / "slices-frankenmerge.yaml", out)
    a, b = tensors(workdir / "ft-a"), tensors(workdir / "ft-b")

    def middle(j: int, rest: str) -> torch.Tensor:
        t = [0.2, 0.8][j]  # the slice's gradient [0.2, 0.8] over its two layers
        return slerp(
            [b[f"model.layers.{2 + j}.{rest}"]], base=a[f"model.layers.{2 + j}.{rest}"], t=t
        )

    _check(out, got, _expected(a, b, middle))


def test_mergekit_slices_config(workdir, monkeypatch):
    out = workdir / "franken"
    got = run_ours(workdir / "mergekit-slices.yml", out)
    a, b = tensors(workdir / "ft-a"), tensors(workdir / "ft-b")

    def middle(j: int, rest: str) -> torch.Tensor:
        wa, wb = [0.8, 0.2][j], [0.2, 0.8][j]  # per-source weight gradients, normalised
        xa, xb = a[f"model.layers.{2 + j}.{rest}"], b[f"model.layers.{2 + j}.{rest}"]
        return (wa * xa + wb * xb) / (wa + wb)

    _check(out, got, _expected(a, b, middle))
    if HAVE_MERGEKIT:  # the compare extra: mergekit's output is the same
        monkeypatch.chdir(workdir)  # mergekit resolves ./ft-a against the working directory
        config = yaml.safe_load((workdir / "mergekit-slices.yml").read_text())
        theirs = run_mergekit(config, workdir / "mk")
        assert sorted(theirs) == sorted(got)
        for k, v in theirs.items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)
