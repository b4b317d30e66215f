"""The command line: values, messages and exit codes (2 usage/recipe, 1 merge errors)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from core_fixtures import tensors

from merge.cli import cli
from merge.io import load_state_dict, save_state_dict

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.output


def test_linear_values_and_default_normalization(
    three_models: dict[str, Path], tmp_path: Path
) -> None:
    code, out = invoke(
        "linear",
        three_models["a"],
        three_models["b"],
        "--weights",
        "1,3",
        "-o",
        tmp_path / "o",
        "-q",
    )
    assert code == 0, out
    got = load_state_dict(tmp_path / "o")
    a, b = tensors(1), tensors(2)
    k = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(got[k], 0.25 * a[k] + 0.75 * b[k])
    code, out = invoke(
        "linear", three_models["a"], three_models["b"], "--weights", "1,-1", "-o", tmp_path / "z"
    )
    assert code == 1 and "weights [1.0, -1.0] sum to zero" in out
    code, out = invoke(
        "linear",
        three_models["a"],
        three_models["b"],
        "--weights",
        "1,-1",
        "--no-normalize",
        "-o",
        tmp_path / "z",
        "-q",
    )
    assert code == 0 and torch.allclose(load_state_dict(tmp_path / "z")[k], a[k] - b[k])


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["linear", "A", "B", "--weights", "1,2,3", "-o", "OUT"],
            2,
            "--weights has 3 values for 2 models; give one weight per model",
        ),
        (["linear", "A", "NOPE", "-o", "OUT"], 2, "input NOPE does not exist; check the path"),
        (["linear", "A", "B"], 2, "merge linear needs -o/--output"),
        (
            ["linear", "A", "B", "--weights", "x", "-o", "OUT"],
            2,
            "--weights takes comma-separated numbers",
        ),
        (["linear", "A", "B", "-o", "A"], 1, "refusing to write the output to"),
        (["ema", "A", "B", "-o", "OUT"], 2, "choose exactly one of --decay, --step-decay or --swa"),
        (["ema", "A", "B", "--decay", "1.5", "-o", "OUT"], 2, "--decay must be in [0, 1); got 1.5"),
        (["run", "missing.yaml"], 2, "recipe missing.yaml does not exist"),
        (["run", "R", "--var", "lam"], 2, "--var takes NAME=NUMBER"),
    ],
)
def test_user_mistakes_get_one_clear_message(
    three_models: dict[str, Path], tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    (tmp_path / "r.yaml").write_text(
        f"inputs: {{a: {three_models['a']}}}\nvars: {{lam: 1}}\nsteps: {{s: a}}\n"
    )
    subs = {
        "A": str(three_models["a"]),
        "B": str(three_models["b"]),
        "OUT": str(tmp_path / "out"),
        "NOPE": str(tmp_path / "NOPE"),
        "R": str(tmp_path / "r.yaml"),
    }
    got_code, out = invoke(*[subs.get(a, a) for a in args])
    assert got_code == code, out
    assert message.replace("NOPE", str(tmp_path / "NOPE")) in out
    assert "Traceback" not in out
    assert not (tmp_path / "out").exists()


def test_existing_output_exit_1_and_debug_traceback(
    three_models: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    code, out = invoke("linear", three_models["a"], three_models["b"], "-o", tmp_path / "out")
    assert code == 1 and "already exists; pass --force" in out
    res = CliRunner().invoke(
        cli,
        [
            "--debug",
            "linear",
            str(three_models["a"]),
            str(three_models["b"]),
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert res.exception is not None and type(res.exception).__name__ == "PlanError"


def test_invalid_recipe_exit_2_lists_problems(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("inputs: {a: x}\nsteps: {s: a + bb}\noutput: {frm: s}\n")
    code, out = invoke("validate", tmp_path / "r.yaml")
    assert code == 2
    assert "output.frm: unknown key (did you mean `from`?)" in out


def test_validate_prints_the_resolved_plan(three_models: dict[str, Path], tmp_path: Path) -> None:
    r = tmp_path / "r.yaml"
    r.write_text(
        f"inputs: {{base: {three_models['base']}, a: {three_models['a']}}}\nvars: {{lam: 0.5}}\nsteps: {{s: base + lam * (a - base)}}\n"
    )
    code, out = invoke("validate", r)
    assert code == 0, out
    assert "s = 0.5*base + 0.5*a" in out
    assert "output: 11 tensors (10 affine, 1 copy)" in out
    assert "model.position_ids [10] int64 [copy] = base" in out


def test_inspect_lists_tensors_and_task_vector_norms(three_models: dict[str, Path]) -> None:
    code, out = invoke("inspect", three_models["a"])
    assert code == 0
    assert (
        "11 tensors in" in out and "model.layers.0.mlp.up_proj.weight       float32   12x8" in out
    )
    code, out = invoke(
        "inspect", three_models["a"], three_models["b"], "--base", three_models["base"], "-q"
    )
    assert code == 0, out
    b, a, c = tensors(0), tensors(1), tensors(2)
    fl = [k for k in b if b[k].is_floating_point()]
    ta = torch.cat([(a[k] - b[k]).reshape(-1) for k in fl]).double()
    tc = torch.cat([(c[k] - b[k]).reshape(-1) for k in fl]).double()
    assert f"‖τ‖ = {float(ta.norm()):.6g}" in out
    assert f"{float(ta @ tc / (ta.norm() * tc.norm())):+.4f}" in out


def test_ema_command_weights(tmp_path: Path) -> None:
    paths = [save_state_dict(tensors(i), tmp_path / f"ckpt-{(i + 1) * 100:04d}") for i in range(3)]
    code, out = invoke("ema", *paths, "--decay", "0.5", "-o", tmp_path / "ema")
    assert code == 0, out
    assert "weights: 0.25, 0.25, 0.5" in out
    k = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(
        load_state_dict(tmp_path / "ema")[k],
        0.25 * tensors(0)[k] + 0.25 * tensors(1)[k] + 0.5 * tensors(2)[k],
    )
    code, out = invoke("ema", *paths, "--step-decay", "0.99", "-o", tmp_path / "ema2")
    d = 0.99**100
    assert code == 0 and f"weights: {d * d:.6g}, {(1 - d) * d:.6g}, {1 - d:.6g}" in out


# The stand-in tensors are Llama-shaped: an SD recipe's block overrides match none of them.
@pytest.mark.filterwarnings("ignore:overrides.*matches no tensor:merge.errors.MergeWarning")
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_example_recipe_validates_and_runs(recipe: Path, tmp_path: Path) -> None:
    code, out = invoke("validate", recipe, "--no-inputs")
    assert code == 0, out
    data = yaml.safe_load(recipe.read_text())
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("#"), "every recipe starts with a comment saying how to run it"
    inputs = data.get("inputs", {})
    if (
        "merge_method" in data
        or "slices" in data
        or any(
            str(p).endswith((".safetensors", ".pt")) or "lora" in str(p) for p in inputs.values()
        )
    ):
        return  # recipes over adapters, layer slices or mergekit configs: their areas' tests
    for i, name in enumerate(inputs):
        save_state_dict(tensors(i), tmp_path / f"in-{name}")
        data["inputs"][name] = str(tmp_path / f"in-{name}")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    code, out = invoke("run", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q")
    assert code == 0, out
    assert len(load_state_dict(tmp_path / "out")) == 11


def test_demo_shows_task_arithmetic(tmp_path: Path) -> None:
    code, out = invoke("demo", "--workdir", tmp_path / "demo", "-q")
    assert code == 0, out
    rows = {
        line[:22].strip(): [float(x) for x in line[22:].split()]
        for line in out.splitlines()
        if line[:4] in ("base", "fine", "aver", "task", "nega") and len(line[22:].split()) == 5
    }
    base, neg = rows["base"], rows["negate task0"]
    assert neg[0] < base[0] - 15  # the negated task is forgotten
    assert all(abs(n - b) < 5 for n, b in zip(neg[1:4], base[1:4]))  # the others hold
    for t in range(4):
        assert rows[f"fine-tune task{t}"][t] > base[t] + 10  # each fine-tune learned its task
    assert (tmp_path / "demo" / "task-arithmetic.yaml").is_file() and (
        tmp_path / "demo" / "merged-negate-task0" / "model.safetensors"
    ).is_file()
    assert not math.isnan(sum(rows["average"]))


def test_a_mergekit_config_is_noted_by_the_cli_not_the_library(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from merge.recipe import load_recipe

    recipe = Path(__file__).parent.parent / "recipes" / "mergekit-ties.yml"
    assert load_recipe(recipe).translated_from == "mergekit"
    assert capsys.readouterr() == ("", "")  # library code prints nothing
    code, out = invoke("validate", recipe, "--no-inputs")
    assert code == 0, out
    assert "note: this is a mergekit config; translated with `compat: mergekit`" in out


def test_the_cli_option_tables_match_the_recipe_layer() -> None:
    """merge.cli.options keeps copies (the CLI loads without torch); they must not drift."""
    from merge.cli import options
    from merge.dtypes import DTYPE_NAMES
    from merge.io.writer import DEFAULT_SHARD_SIZE, parse_size
    from merge.recipe import DEFAULT_SHARD_TEXT

    assert tuple(DTYPE_NAMES) == options.DTYPES
    assert options.DEFAULT_SHARD_TEXT == DEFAULT_SHARD_TEXT
    assert parse_size(DEFAULT_SHARD_TEXT) == DEFAULT_SHARD_SIZE
