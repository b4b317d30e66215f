"""A mergekit config without `dtype`: mergekit merges in the dtype it loads (bf16 inputs, bf16
arithmetic), so the import sets `options.compute_dtype` to the dtype the inputs share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mk_oracle import needs_mergekit, run_mergekit, run_ours, tensors, tiny_llama

from merge.api import run_recipe
from merge.mergekit_import import translate


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16")
    return {
        n: tiny_llama(root / n, s, dtype=torch.bfloat16) for n, s in (("a", 1), ("b", 2), ("c", 3))
    }


def _config(models: dict[str, Path], method: str) -> dict:
    return {
        "merge_method": method,
        "base_model": str(models["c"]),
        "models": [
            {"model": str(models["a"]), "parameters": {"weight": 0.6, "density": 0.3}},
            {"model": str(models["b"]), "parameters": {"weight": 0.4, "density": 0.3}},
        ],
    }


def test_compute_dtype_is_the_inputs_shared_dtype(bf16_models, tmp_path):
    recipe, problems = translate(_config(bf16_models, "ties"))
    assert problems == [] and recipe["options"]["compute_dtype"] == "bfloat16"
    assert "dtype" not in recipe["output"]  # written in the inputs' dtype, as mergekit
    f32 = tiny_llama(tmp_path / "f32", 4)
    mixed = {**bf16_models, "c": f32}
    recipe, _ = translate(_config(mixed, "ties"))
    assert "compute_dtype" not in recipe["options"]  # mixed: float32 math
    recipe, _ = translate(_config({"a": f32, "b": f32, "c": f32}, "ties"))
    assert recipe["options"]["compute_dtype"] == "float32"
    # relative paths resolve against the config's folder, as the recipe's inputs do
    rel = {n: Path(p.name) for n, p in bf16_models.items()}
    recipe, _ = translate(_config(rel, "ties"), base_dir=bf16_models["a"].parent)
    assert recipe["options"]["compute_dtype"] == "bfloat16"
    recipe, _ = translate(_config({n: Path("/nowhere") / n for n in "abc"}, "ties"))
    assert "compute_dtype" not in recipe["options"]  # not on disk: the plan says so later
    # an explicit dtype wins
    recipe, _ = translate({**_config(bf16_models, "ties"), "dtype": "float32"})
    assert recipe["options"]["compute_dtype"] == "float32"


@needs_mergekit
@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_no_dtype_bf16_inputs_match_mergekit(bf16_models, tmp_path, method):
    config = _config(bf16_models, method)
    got, want = run_ours(config, tmp_path / "ours"), run_mergekit(config, tmp_path / "mk")
    assert sorted(got) == sorted(want)
    worst = 0.0
    for k, ref in want.items():
        assert got[k].dtype == ref.dtype == torch.bfloat16, k
        span = float(ref.float().abs().max())
        worst = max(worst, float((got[k].float() - ref.float()).abs().max()) / span)
    # bf16 rounding only: mergekit rounds after every operation, we once (as with `dtype: bf16`)
    assert worst <= 2**-5, worst
    # Trimming float32 task vectors instead (the import before it looked at the inputs) keeps
    # other entries than mergekit's bf16 ties do: tensors then differ by a third or more.
    recipe, _ = translate(config)
    del recipe["options"]["compute_dtype"]
    f32 = tensors(run_recipe(recipe, tmp_path / "f32", quiet=True))
    off = max(
        float((f32[k].float() - ref.float()).abs().max()) / float(ref.float().abs().max())
        for k, ref in want.items()
    )
    assert off > 0.3, off
