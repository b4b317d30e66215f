from __future__ import annotations

from pathlib import Path

import pytest

from merge.errors import RecipeError
from merge.plan import gradient_value
from merge.recipe import load_recipe


def test_all_problems_reported_together_with_key_paths(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "inputs: {base: b, math: m}\n"
        "stpes: {}\n"
        "steps:\n"
        "  one: {method: tie, models: [math]}\n"
        "  two: {method: linear, models: {math: {wieght: 1}}, normalise: true}\n"
        "  three: bse + math\n"
        "output: {from: four, dtpye: bfloat16}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    text = str(e.value)
    assert text.startswith(f"recipe {tmp_path / 'r.yaml'} is invalid")
    assert "stpes: unknown key (did you mean `steps`?)" in text
    assert "output.dtpye: unknown key (did you mean `dtype`?)" in text
    # Structural problems stop pydantic before semantics; fix them and the rest appear together.
    (tmp_path / "r.yaml").write_text(
        "inputs: {base: b, math: m}\n"
        "steps:\n"
        "  one: {method: tie, models: [math]}\n"
        "  two: {method: linear, models: {math: {wieght: 1}}, normalise: true}\n"
        "  three: bse + math\n"
        "output: {from: four}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    text = str(e.value)
    assert (
        "steps.one.method: unknown merge method `tie` (did you mean `ties`?)" in text
        or "steps.one.method: unknown merge method `tie`" in text
    )
    assert (
        "steps.two.models.math.wieght: `wieght` is not a per-model parameter of `linear` (did you mean `weight`?)"
        in text
    )
    assert (
        "steps.two: unknown parameter `normalise` for method `linear` (did you mean `normalize`?)"
        in text
    )
    assert "steps.three: unknown name `bse` (did you mean `base`?)" in text
    assert "output.from: no step named `four`" in text
    assert "(5 problems)" in text


def test_method_step_rules() -> None:
    base = {"inputs": {"base": "b", "a": "a"}}
    with pytest.raises(RecipeError, match="method `task_arithmetic` needs a base model"):
        load_recipe({**base, "steps": {"s": {"method": "task_arithmetic", "models": ["a"]}}})
    with pytest.raises(RecipeError, match="method `linear` takes no base model"):
        load_recipe({**base, "steps": {"s": {"method": "linear", "base": "base", "models": ["a"]}}})


def test_overrides_are_checked() -> None:
    r = {
        "inputs": {"base": "b", "a": "a"},
        "steps": {"s": {"method": "linear", "models": ["a", "base"]}, "t": "s + 0 * a"},
        "overrides": [
            {"glob": "*.mlp.*", "regex": "x", "weight": 1},
            {"glob": "*", "step": "t", "weight": 1},
            {"glob": "*", "input": "c", "wieght": 1},
        ],
    }
    with pytest.raises(RecipeError) as e:
        load_recipe(r)
    text = str(e.value)
    assert "overrides[0]: give exactly one of `glob:` or `regex:`" in text
    assert "overrides[1].step: step `t` calls no method" in text
    assert "overrides[2].input: no input named `c`" in text
    assert "overrides[2].wieght: no method call takes `wieght` (did you mean `weight`?)" in text


def test_vars_override_and_unknown_var() -> None:
    r = {
        "inputs": {"base": "b", "a": "a"},
        "vars": {"lam": 0.5},
        "steps": {"s": "base + lam * (a - base)"},
    }
    p = load_recipe(r, vars={"lam": 0.25})
    assert dict(p.output.terms) == {"base": 0.75, "a": 0.25}
    with pytest.raises(
        RecipeError,
        match=r"vars.lan: not declared in the recipe's `vars:` \(did you mean `lam`\?\)",
    ):
        load_recipe(r, vars={"lan": 1.0})


def test_newer_version_is_refused() -> None:
    with pytest.raises(RecipeError, match="recipe version 9 is newer"):
        load_recipe({"version": 9, "inputs": {"a": "a"}, "steps": {"s": "a"}})


def test_gradient_rule_matches_mergekit() -> None:
    # anchors spread evenly over [0, 1]: s = t (n - 1), linear between neighbours
    assert gradient_value([0.0, 1.0], 0.25) == 0.25
    assert gradient_value([0.0, 0.5, 1.0, 0.0], 0.5) == pytest.approx(0.75)  # s = 1.5
    assert gradient_value([0.2, 0.8], 1.0) == 0.8
    assert gradient_value([0.3], 0.7) == 0.3


def test_step_level_per_model_params_are_defaults_and_ranges_are_checked() -> None:
    r: dict = {
        "inputs": {"base": "b", "a": "a", "c": "c"},
        "steps": {
            "s": {
                "method": "ties",
                "base": "base",
                "models": {"a": {}, "c": {"density": 0.3}},
                "density": 0.5,
            }
        },
    }
    (call,) = load_recipe(r).output.calls()
    assert dict(call.model_params[0])["density"] == 0.5  # the step-level default
    assert dict(call.model_params[1])["density"] == 0.3  # a model's own value wins
    r["steps"]["s"]["density"] = 1.5
    with pytest.raises(RecipeError, match=r"`density` 1.5 \(model 1\) is outside \(0, 1\]"):
        load_recipe(r)


# ---- issue 14.21: every problem at once -----------------------------------------------------


SEVEN_TYPOS = """\
inputs: {base: ./b, math: ./m, code: ./c}
stepz: {}
steps:
  final: tv + 0.5 * (mix - base)
  tv: {method: task_arithmetc, base: base, models: [math, code]}
  mix:
    method: ties
    base: bse
    models: {math: {weight: 1, densty: 0.5}, code: {weight: 1, density: 0.5}}
  f2: 0.5 * lam * final
output: {from: final, dtype: bfloat17}
overrides:
  - {glob: "*.mlp.*", step: tv, scale: 0.3}
  - {glob: "*", step: mix, densit: 0.2}
"""


def test_seven_typos_in_one_report(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(SEVEN_TYPOS)
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert e.value.problems == [
        (
            "output.dtype",
            "Input should be 'float32', 'float16', 'bfloat16' or 'float64'",
        ),
        (
            "stepz",
            "unknown key (did you mean `steps`?); valid keys: version, description, inputs, "
            "vars, steps, slices, output, overrides, options, tokenizer",
        ),
        ("steps.tv.method", e.value.problems[2][1]),
        (
            "steps.mix.models.math.densty",
            "`densty` is not a per-model parameter of `ties` (did you mean `density`?); "
            "per-model parameters: weight, density, threshold",
        ),
        ("steps.mix.base", "no input or step named `bse` (did you mean `base`?)"),
        ("steps.f2", "unknown name `lam`"),
        (
            "overrides[1].densit",
            "method `ties` of step mix takes no `densit` (did you mean `density`?)",
        ),
    ]
    assert e.value.problems[2][1].startswith(
        "unknown merge method `task_arithmetc` (did you mean `task_arithmetic`?)"
    )
    # `final` uses the broken `tv` and `mix`: not reported as unknown names, and the override
    # of the (valid but broken) step `tv` is not told that `tv` "calls no method".
    text = str(e.value)
    assert "unknown name `tv`" not in text and "calls no method" not in text


def test_steps_may_use_later_steps_and_cycles_are_named() -> None:
    base = {"inputs": {"a": "a", "b": "b"}}
    program = load_recipe(
        {**base, "steps": {"out": "0.5 * mid + 0.5 * b", "mid": "0.5 * a + 0.5 * b"}}
    )
    assert list(program.steps) == ["out", "mid"]
    assert dict(program.steps["out"].terms) == {"a": 0.25, "b": 0.75}
    with pytest.raises(RecipeError) as e:
        load_recipe({**base, "steps": {"x": "y + a", "y": "x + b"}})
    assert e.value.problems == [("steps.x", "steps use each other in a cycle: x -> y -> x")]


def test_mergekit_lambda_gets_a_scale_hint() -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(
            {
                "inputs": {"base": "b", "m": "m"},
                "steps": {
                    "tv": {
                        "method": "task_arithmetic",
                        "base": "base",
                        "models": ["m"],
                        "lambda": 0.5,
                    }
                },
            }
        )
    assert e.value.problems[0][1].endswith(
        "; `lambda` is mergekit's name for what merge calls `scale`"
    )


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("5G", "cannot read size `5G`; write it like 5GB, 500MB or 2GiB"),
        (
            "5B",
            "a shard size of 5 bytes (`5B`) is surely a mistake; shards must be at least 1MB "
            "(write e.g. 5GB or 500MB)",
        ),
        (
            "1e400GB",
            "size `1e400GB` is too large",
        ),
    ],
)
def test_shard_size_is_checked_by_validate(tmp_path: Path, size: str, message: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: {{a: a}}\nsteps: {{s: a}}\noutput: {{shard_size: {size}}}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    assert e.value.problems == [("output.shard_size", message)]
    recipe.write_text("inputs: {a: a}\nsteps: {s: a}\noutput: {shard_size: 2MB}\n")
    assert load_recipe(recipe)
    # Programs (the Python API, sharding tests) may ask for tiny shards.
    assert load_recipe({"inputs": {"a": "a"}, "steps": {"s": "a"}, "output": {"shard_size": "1KB"}})


# ---- issue 15.6: non-finite numbers ---------------------------------------------------------


def test_non_finite_coefficients_are_refused_with_their_key(tmp_path: Path) -> None:
    from merge.recipe import linear_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(linear_recipe(["x", "y"], [float("nan"), 1.0]))
    assert e.value.problems == [("steps.soup.models.m0.weight", "must be a finite number, got nan")]
    (tmp_path / "r.yaml").write_text(
        "inputs: {a: a, b: b}\nvars: {lam: .nan}\nsteps: {s: lam * a + b}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert e.value.problems == [("vars.lam", "Input should be a finite number")]
    (tmp_path / "r.yaml").write_text(
        "inputs: {a: a, b: b}\nvars: {lam: 1}\nsteps: {s: lam * a + b}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml", vars={"lam": float("inf")})
    assert e.value.problems == [("vars.lam", "must be a finite number, got inf")]
    base = {"inputs": {"a": "a", "b": "b"}}
    cases = {
        "1e400 * a + b": "the number `1e400` is too large for a float",
        "1e300 * 1e300 * a": "`1e+300 * 1e+300` overflows to infinity",
        "ties(a, b, base=a, density=1e400)": "the number `1e400` is too large for a float",
        ("1" + "0" * 400) + " * a": "the number `1000000000",
    }
    for expr, message in cases.items():
        with pytest.raises(RecipeError) as e:
            load_recipe({**base, "steps": {"s": expr}})
        assert e.value.problems[0][0] == "steps.s"
        assert e.value.problems[0][1].startswith(message), e.value.problems
    with pytest.raises(RecipeError) as e:
        load_recipe(
            {
                **base,
                "steps": {
                    "s": {"method": "ties", "base": "a", "models": ["b"], "density": float("inf")}
                },
            }
        )
    assert ("steps.s.density", "must be a finite number, got inf") in e.value.problems


# ---- issue 15.8, 15.13: hostile and broken recipe files ------------------------------------


def test_yaml_alias_bomb_fails_fast_with_a_short_message(tmp_path: Path) -> None:
    import resource
    import time

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
        prev = name
    lines.append("inputs: *i")
    text = "\n".join(lines) + "\n"
    assert len(text) < 700
    (tmp_path / "bomb.yaml").write_text(text)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "bomb.yaml")
    assert time.perf_counter() - t < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    assert len(str(e.value)) < 400
    assert "aliases (*name) expand the document past 100,000 values" in str(e.value)


def test_recipe_files_that_are_not_text_or_not_files(tmp_path: Path) -> None:
    import os

    from merge.errors import UsageError

    (tmp_path / "latin1.yaml").write_bytes("inputs: {a: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(byte 0xe9 at offset 15\)"):
        load_recipe(tmp_path / "latin1.yaml")
    os.mkfifo(tmp_path / "fifo.yaml")
    for p in [tmp_path / "fifo.yaml", Path("/dev/zero")]:
        with pytest.raises(UsageError, match=rf"recipe {p} is not a regular file"):
            load_recipe(p)


def test_deep_and_huge_recipes_are_clear_errors(tmp_path: Path) -> None:
    base = {"inputs": {"a": "a", "b": "b"}}
    cases = {
        "sum": " + ".join(["a"] * 5000),
        "minus": "-" * 1000 + "a",
        "parens": "(" * 1000 + "a" + ")" * 1000,
    }
    for label, expr in cases.items():
        with pytest.raises(RecipeError) as e:
            load_recipe({**base, "steps": {"s": expr}})
        assert e.value.problems[0][0] == "steps.s", label
        assert (
            "too deeply nested" in e.value.problems[0][1]
            or "too many nested" in e.value.problems[0][1]
        ), (label, e.value.problems)
        assert len(str(e.value)) < 1000
    (tmp_path / "deep.yaml").write_text(
        "inputs: {a: a}\nsteps: {s: a}\ndescription: " + "[" * 1200 + "]" * 1200 + "\n"
    )
    with pytest.raises(RecipeError, match="(nests too deeply|exceeded maximum nesting depth)"):
        load_recipe(tmp_path / "deep.yaml")


def test_tilde_user_that_does_not_exist() -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe({"inputs": {"a": "~nosuchuser_xyz/model"}, "steps": {"s": "a"}})
    assert e.value.problems[0][0] == "inputs.a"
    assert e.value.problems[0][1].startswith("cannot expand `~nosuchuser_xyz/model`")


def test_wrongly_typed_override_values_name_their_key() -> None:
    recipe = {
        "inputs": {"base": "b", "m": "m", "n": "n"},
        "steps": {"s": {"method": "ties", "base": "base", "models": ["m", "n"], "density": 0.5}},
    }
    for value, message in [
        ({"x": 1}, "must be a number, a list of numbers, true/false or text, not dict"),
        (None, "must be a number, a list of numbers, true/false or text, not NoneType"),
        (["a", 1], "a list must hold numbers only, got ['a', 1]"),
        ([], "an empty list; give one number per layer block"),
        (float("nan"), "must be a finite number, got nan"),
    ]:
        with pytest.raises(RecipeError) as e:
            load_recipe({**recipe, "overrides": [{"glob": "*", "density": value}]})
        assert e.value.problems == [("overrides[0].density", message)]


def test_catastrophic_regex_override_fails_fast() -> None:
    import time

    from merge.errors import UsageError
    from merge.recipe import Override

    ov = Override.model_validate({"regex": r"(a|aa)+$", "density": 0.5})
    t = time.perf_counter()
    with pytest.raises(
        UsageError,
        match=r"override regex `\(a\|aa\)\+\$` took more than 50 ms on tensor `a{40}!` "
        r"\(catastrophic backtracking\)",
    ):
        ov.matches("a" * 40 + "!")
    assert time.perf_counter() - t < 2
    assert Override.model_validate({"regex": r"layers\.(\d+)\.mlp", "d": 1}).matches(
        "x.layers.3.mlp.w"
    )


def test_cli_shard_size_of_5_bytes_is_refused() -> None:
    from click.testing import CliRunner

    from merge.cli import cli

    res = CliRunner().invoke(cli, ["linear", "a", "b", "-o", "x", "--shard-size", "5B"])
    assert res.exit_code == 2
    assert (
        "Invalid value for '--shard-size': a shard size of 5 bytes (`5B`) is surely a mistake; "
        "shards must be at least 1MB (write e.g. 5GB or 500MB)" in res.output
    )


def test_override_matching_no_tensor_warns_with_the_nearest_names(
    three_models: dict[str, Path],
) -> None:
    from merge.api import plan_recipe
    from merge.errors import MergeWarning

    recipe = {
        "inputs": {k: str(v) for k, v in three_models.items()},
        "steps": {"s": {"method": "ties", "base": "base", "models": ["a", "b"], "density": 0.5}},
        "overrides": [
            {"glob": "*.mlp.up_proj.weight", "density": 0.3},
            {"glob": "*.mpl.up_proj.weight", "density": 0.3},
            # Tables shared by several layouts say so and are not warned about.
            {"glob": "*.mpl.down_proj.weight", "density": 0.3, "optional": True},
        ],
    }
    with pytest.warns(MergeWarning) as record:
        plan = plan_recipe(recipe)
    messages = [str(w.message) for w in record if "overrides[" in str(w.message)]
    assert messages == [
        "overrides[1]: glob `*.mpl.up_proj.weight` matches no tensor, so it changes nothing; "
        "nearest names: model.layers.0.mlp.up_proj.weight, model.layers.1.mlp.up_proj.weight, "
        "model.layers.2.mlp.up_proj.weight"
    ]
    assert messages[0] in plan.notes


def test_cli_non_finite_weights_and_vars_are_refused(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from merge.cli import cli

    res = CliRunner().invoke(cli, ["linear", "a", "b", "--weights", "nan,1", "-o", "x"])
    assert res.exit_code == 2
    assert "--weights must be finite numbers; got nan in `nan,1`" in res.output
    (tmp_path / "r.yaml").write_text(
        "inputs: {a: a, b: b}\nvars: {lam: 1}\nsteps: {s: lam * a + b}\n"
    )
    res = CliRunner().invoke(
        cli, ["validate", str(tmp_path / "r.yaml"), "--var", "lam=inf", "--no-inputs"]
    )
    assert res.exit_code == 2
    assert "vars.lam: must be a finite number, got inf" in res.output
