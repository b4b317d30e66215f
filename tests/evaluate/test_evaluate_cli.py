"""The evaluation commands end to end, and their messages for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import evaluate_entry as entry
import pytest
import torch
from click.testing import CliRunner

from merge.cli import cli
from merge.io import save_state_dict

E = str(Path(entry.__file__))


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args))
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def test_merge_path_writes_json_csv_plots_and_a_table(mlp_pair, tmp_path: Path) -> None:
    code, out = run(
        "path",
        str(mlp_pair.path_a),
        str(mlp_pair.path_b),
        "--model",
        f"{E}:make_model",
        "--data",
        f"{E}:test_data",
        "--steps",
        "5",
        "-o",
        str(tmp_path / "report"),
        "-q",
    )
    assert code == 0, out
    assert "barrier max−mean" in out and "endpoint a (naive at alpha=0.0000): ok" in out
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == ["path.csv", "path.json", "path.png", "path.svg"]
    data = json.loads((tmp_path / "report" / "path.json").read_text())
    assert data["inputs"] == {"a": str(mlp_pair.path_a), "b": str(mlp_pair.path_b)}
    assert len(data["curves"][0]["points"]) == 5


def test_merge_path_with_scales_and_a_custom_evaluator(mlp_pair, tmp_path: Path) -> None:
    code, out = run(
        "path",
        str(mlp_pair.path_a),
        str(mlp_pair.path_b),
        "--model",
        f"{E}:make_model",
        "--eval",
        f"{E}:score",
        "--scales=-0.5:1.5:5",
        "-o",
        str(tmp_path),
        "-q",
    )
    assert code == 0, out
    data = json.loads((tmp_path / "path.json").read_text())
    assert data["kind"] == "task_vector_path" and data["axes"] == ["lambda"]
    assert [p["coords"]["lambda"] for p in data["curves"][0]["points"]] == [
        -0.5,
        0.0,
        0.5,
        1.0,
        1.5,
    ]
    assert data["settings"]["evaluator"] == "custom"


def test_merge_path_bn_reset_on_a_batchnorm_cnn(cnn_pair, tmp_path: Path) -> None:
    code, out = run(
        "path",
        str(cnn_pair.path_a),
        str(cnn_pair.path_b),
        "--model",
        f"{E}:make_cnn",
        "--data",
        f"{E}:image_data",
        "--steps",
        "3",
        "-o",
        str(tmp_path),
        "-q",
    )
    assert code == 0 and "note: the model has BatchNorm layers" in out
    code, out = run(
        "path",
        str(cnn_pair.path_a),
        str(cnn_pair.path_b),
        "--model",
        f"{E}:make_cnn",
        "--data",
        f"{E}:image_data",
        "--steps",
        "3",
        "--bn-reset",
        "--bn-data",
        f"{E}:image_data",
        "-o",
        str(tmp_path),
        "-q",
    )
    assert code == 0 and "naive+bn_reset" in out and "note: the model has BatchNorm" not in out


def test_merge_negate_plane_and_probe(mlp_pair, tmp_path: Path) -> None:
    base = save_state_dict(entry.make_model().state_dict(), tmp_path / "base")
    a, b = str(mlp_pair.path_a), str(mlp_pair.path_b)
    code, out = run(
        "negate",
        str(base),
        a,
        "--model",
        f"{E}:make_model",
        "--target-data",
        f"{E}:test_data",
        "--control-data",
        f"{E}:test_data",
        "--lambdas",
        "0:1:3",
        "--save",
        str(tmp_path / "forgot"),
        "-o",
        str(tmp_path / "neg"),
        "-q",
    )
    assert code == 0, out
    assert "control ok" in out and (tmp_path / "neg" / "negate.png").is_file()
    code, out = run(
        "plane",
        str(base),
        a,
        b,
        "--model",
        f"{E}:make_model",
        "--data",
        f"{E}:test_data",
        "--grid",
        "3",
        "--range=-0.5:1",
        "-o",
        str(tmp_path / "plane"),
        "-q",
    )
    assert code == 0, out
    assert (
        len(json.loads((tmp_path / "plane" / "plane.json").read_text())["curves"][0]["points"]) == 9
    )
    code, out = run(
        "probe",
        "linearity",
        "--model",
        f"{E}:make_model",
        "--data",
        f"{E}:test_data",
        "--weights",
        a,
        "--layer",
        "layers.1",
        "--pairs",
        "64",
        "-o",
        str(tmp_path / "probe"),
    )
    assert code == 0, out
    assert "homogeneity" in out and "additivity" in out and "layers.1" in out
    code, out = run(
        "probe",
        "linearity",
        "--model",
        f"{E}:make_model",
        "--data",
        f"{E}:test_data",
        "--base",
        str(base),
        "--task",
        a,
        "--task",
        b,
        "--pairs",
        "64",
        "-o",
        str(tmp_path / "probe2"),
    )
    assert code == 0 and "weights:output" in out
    code, out = run(
        "probe",
        "disentanglement",
        str(base),
        a,
        b,
        "--model",
        f"{E}:make_model",
        "--data1",
        f"{E}:test_data",
        "--data2",
        f"{E}:test_data",
        "--grid",
        "3",
        "--examples",
        "64",
        "-o",
        str(tmp_path / "xi"),
    )
    assert code == 0 and (tmp_path / "xi" / "disentanglement.png").is_file()


def test_merge_greedy_soup(mlp_pair, tmp_path: Path) -> None:
    code, out = run(
        "greedy-soup",
        str(mlp_pair.path_a),
        str(mlp_pair.path_b),
        "--model",
        f"{E}:make_model",
        "--data",
        f"{E}:test_data",
        "--save",
        str(tmp_path / "soup"),
        "-o",
        str(tmp_path / "r"),
        "-q",
    )
    assert code == 0, out
    assert "greedy soup of 1" in out  # two different seeds: averaging them only hurts
    assert (tmp_path / "soup").is_dir()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["--model", "no_such_module_xyz:make", "--data", f"{E}:test_data"],
            2,
            "--model `no_such_module_xyz:make`: cannot import module `no_such_module_xyz`",
        ),
        (
            ["--model", f"{E}:make_modle", "--data", f"{E}:test_data"],
            2,
            "has no attribute `make_modle` (did you mean `make_model`?)",
        ),
        (
            ["--model", f"{E}:make_wide_model", "--data", f"{E}:test_data"],
            1,
            "the model from --model does not match a:\n  shape mismatches:",
        ),
        (
            ["--model", f"{E}:make_model", "--data", f"{E}:empty_data"],
            2,
            f"--data `{E}:empty_data` yielded no batches",
        ),
        (
            ["--model", f"{E}:make_model", "--eval", f"{E}:bad_score"],
            2,
            "returned ['accuracy']; it must include `loss`",
        ),
        (["--model", f"{E}:make_model"], 2, "nothing to evaluate with: give --data"),
        (["--data", f"{E}:test_data"], 2, "--model is required"),
        (
            ["--model", f"{E}:make_model", "--data", f"{E}:test_data", "--steps", "1"],
            2,
            "--steps must be at least 2",
        ),
    ],
)
def test_bad_input_gets_a_clear_message_and_exit_code(
    mlp_pair, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    got, out = run(
        "path", str(mlp_pair.path_a), str(mlp_pair.path_b), *args, "-o", str(tmp_path), "-q"
    )
    assert got == code, out
    assert message in out


def test_missing_checkpoint_is_a_usage_error(tmp_path: Path) -> None:
    code, out = run(
        "path",
        str(tmp_path / "nope"),
        str(tmp_path / "nope2"),
        "--model",
        f"{E}:make_model",
        "--data",
        f"{E}:test_data",
    )
    assert code == 2 and "does not exist" in out


def test_merge_sweep_over_a_recipe_var(mlp_pair, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"inputs: {{a: {mlp_pair.path_a}, b: {mlp_pair.path_b}}}\nvars: {{lam: 0.5}}\nsteps: {{mix: a + lam * (b - a)}}\n"
    )
    code, out = run(
        "sweep",
        str(recipe),
        "--param",
        "vars.lam=0:1:3",
        "--model",
        f"{E}:make_model",
        "--eval",
        f"{E}:score",
        "--metric",
        "accuracy",
        "-o",
        str(tmp_path / "sweep"),
        "-q",
    )
    assert code == 0, out
    assert "best by accuracy: vars.lam=" in out
    data = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert data["axes"] == ["vars.lam"] and data["settings"]["ranges"] == {
        "vars.lam": [0.0, 0.5, 1.0]
    }
    code, out = run(
        "sweep",
        str(recipe),
        "--param",
        "vars.lam=0:1",
        "--model",
        f"{E}:make_model",
        "--eval",
        f"{E}:score",
    )
    assert (
        code == 2
        and "--param `vars.lam=0:1`: `0:1` is not `start:stop:num` (num a positive integer)" in out
    )


@pytest.mark.parametrize("verb", ["path", "greedy-soup", "negate"])
def test_bad_device_is_a_clean_error_for_every_verb(verb: str, mlp_pair, tmp_path: Path) -> None:
    args = [verb, str(mlp_pair.path_a), str(mlp_pair.path_b), "--model", f"{E}:make_model"]
    data = ["--data", f"{E}:test_data"]
    if verb == "negate":
        data = ["--target-data", f"{E}:test_data", "--control-data", f"{E}:test_data"]
    code, out = run(*args, *data, "--device", "gpu", "-o", str(tmp_path / "r"), "-q")
    assert (code, out.strip()) == (
        2,
        "Error: --device `gpu` is not a device: use cpu, cuda, cuda:N or auto",
    )
    if not torch.cuda.is_available():
        code, out = run(*args, *data, "--device", "cuda", "-o", str(tmp_path / "r"), "-q")
        assert (code, out.strip()) == (
            1,
            "Error: --device cuda was asked for but torch sees no CUDA device; use --device cpu or auto",
        )
    assert not (tmp_path / "r").exists()
