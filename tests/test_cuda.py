"""`--device cuda` end to end: the same merges, paths and alignments as on the CPU, on a GPU.

Every test here carries the `cuda` marker and is skipped where torch sees no CUDA device (CI, the
development machines); `make gpu-check` runs them on a GPU machine. `MERGE_TEST_DEVICE=cpu`
runs the same comparisons with the CPU standing in for the GPU, to check the tests themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from merge.cli import cli
from merge.io import load_state_dict, save_state_dict

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get("MERGE_TEST_DEVICE", "cuda")

ENTRIES = Path(__file__).parent
EVAL_ENTRY = ENTRIES / "evaluate" / "evaluate_entry.py"
ALIGN_ENTRY = ENTRIES / "align" / "align_entry.py"


def invoke(*args: object) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def assert_same_tensors(cpu: Path, gpu: Path) -> None:
    a, b = load_state_dict(cpu), load_state_dict(gpu)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        # The GPU fuses multiply-adds, so the last float32 bit may differ from the CPU's.
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-6, msg=name)


def test_linear_on_cuda_equals_cpu(three_models: dict[str, Path], tmp_path: Path) -> None:
    for out, device in (("ref", "cpu"), ("dev", DEVICE)):
        invoke(
            "linear",
            three_models["a"],
            three_models["b"],
            "--weights",
            "0.3,0.7",
            "--device",
            device,
            "-o",
            tmp_path / out,
            "-q",
        )
    assert_same_tensors(tmp_path / "ref", tmp_path / "dev")


def test_auto_device_picks_cuda_and_matches_cpu(
    three_models: dict[str, Path], tmp_path: Path
) -> None:
    for out, device in (("ref", "cpu"), ("dev", "auto")):
        invoke(
            "linear",
            three_models["a"],
            three_models["b"],
            "--device",
            device,
            "-o",
            tmp_path / out,
            "-q",
        )
    assert_same_tensors(tmp_path / "ref", tmp_path / "dev")


@pytest.mark.parametrize(
    "step",
    [
        "{method: ties, base: base, models: [a, b], density: 0.5}",
        "{method: slerp, base: base, models: [a], t: 0.3}",
        "{method: dare_ties, base: base, models: [a, b], density: 0.5}",
        "base + 0.7 * (a - base) - 0.2 * (b - base)",
    ],
)
def test_recipe_on_cuda_equals_cpu(
    three_models: dict[str, Path], tmp_path: Path, step: str
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\ninputs: {"
        + ", ".join(f"{n}: {p}" for n, p in three_models.items())
        + "}\nsteps:\n  final: "
        + step
        + "\noptions: {seed: 3}\n"
    )
    for out, device in (("ref", "cpu"), ("dev", DEVICE)):
        invoke("run", recipe, "--device", device, "-o", tmp_path / out, "-q")
    assert_same_tensors(tmp_path / "ref", tmp_path / "dev")


def _random_mlp_checkpoints(tmp_path: Path, make_model: str, entry: Path) -> tuple[Path, Path]:
    import importlib.util

    spec = importlib.util.spec_from_file_location(entry.stem, entry)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = getattr(module, make_model)()
        paths.append(save_state_dict(model.state_dict(), tmp_path / f"m{seed}.safetensors"))
    return paths[0], paths[1]


def test_path_on_cuda_equals_cpu(tmp_path: Path) -> None:
    a, b = _random_mlp_checkpoints(tmp_path, "make_model", EVAL_ENTRY)
    reports = {}
    for out, device in (("ref", "cpu"), ("dev", DEVICE)):
        invoke(
            "path",
            a,
            b,
            "--model",
            f"{EVAL_ENTRY}:make_model",
            "--data",
            f"{EVAL_ENTRY}:test_data",
            "--steps",
            "5",
            "--device",
            device,
            "--no-plot",
            "-o",
            tmp_path / out,
            "-q",
        )
        reports[out] = json.loads((tmp_path / out / "path.json").read_text())
    cpu, gpu = (
        [p["metrics"]["loss"] for p in reports[out]["curves"][0]["points"]]
        for out in ("ref", "dev")
    )
    assert gpu == pytest.approx(cpu, rel=1e-4)


def test_align_on_cuda_equals_cpu(tmp_path: Path) -> None:
    a, b = _random_mlp_checkpoints(tmp_path, "make_model", ALIGN_ENTRY)
    for out, device in (("ref", "cpu"), ("dev", DEVICE)):
        invoke(
            "align",
            a,
            b,
            "--model",
            f"{ALIGN_ENTRY}:make_model",
            "--device",
            device,
            "-o",
            tmp_path / f"{out}.safetensors",
            "-q",
        )
    # The permutation is discrete: float64 costs on either device choose the same one.
    cpu = load_state_dict(tmp_path / "ref.safetensors")
    gpu = load_state_dict(tmp_path / "dev.safetensors")
    for name in cpu:
        assert torch.equal(cpu[name], gpu[name]), name
