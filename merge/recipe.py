"""YAML recipes: validated with pydantic, then compiled into affine forms per step.

Every problem is collected with its key path and reported together in one RecipeError;
misspelt names get a "did you mean" suggestion. Nothing here reads a tensor.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merge.errors import RecipeError, UsageError, did_you_mean
from merge.expr import Affine, Call, ExprError, fold, parse
from merge.methods import get_method

ParamValue = float | int | bool | str | list[float]
CURRENT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16", "float64")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class OutputSpec(_Strict):
    from_: str | None = Field(None, alias="from")
    path: str | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    shard_size: str | int = "5GB"
    copy_files_from: str | None = None


class MethodStep(BaseModel):
    """`{method: ties, base: base, models: {...}, <method params>}`; extra keys are method params."""

    model_config = ConfigDict(extra="allow")
    method: str
    base: str | None = None
    models: list[str] | dict[str, dict[str, ParamValue] | None] = Field(default_factory=list)


class Override(BaseModel):
    """Per-tensor parameter values: `glob:` or `regex:` selects tensors; extra keys are params."""

    model_config = ConfigDict(extra="allow")
    glob: str | None = None
    regex: str | None = None
    step: str | None = None
    input: str | None = None

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def matches(self, tensor: str) -> bool:
        if self.glob is not None:
            return fnmatch.fnmatchcase(tensor, self.glob)
        return self.regex is not None and re.search(self.regex, tensor) is not None


class Options(_Strict):
    keys: Literal["strict", "intersection", "union"] = "strict"
    seed: int = 0
    compat: Literal["paper", "mergekit"] = "paper"


class Recipe(_Strict):
    version: int = CURRENT_VERSION
    description: str | None = None
    inputs: dict[str, str]
    vars: dict[str, float] = Field(default_factory=dict)
    steps: dict[str, str | MethodStep]
    output: OutputSpec = Field(default_factory=lambda: OutputSpec.model_validate({}))
    overrides: list[Override] = Field(default_factory=list)
    options: Options = Field(default_factory=Options)


@dataclass(frozen=True)
class Program:
    """A compiled recipe: each step folded to an affine form over inputs and method calls."""

    recipe: Recipe
    steps: dict[str, Affine]
    output_step: str
    base_dir: Path

    @property
    def output(self) -> Affine:
        return self.steps[self.output_step]

    def input_path(self, name: str) -> str:
        raw = self.recipe.inputs[name]
        p = Path(raw).expanduser()
        if not p.is_absolute() and (self.base_dir / p).exists():
            return str(self.base_dir / p)
        return raw

    def used_inputs(self) -> list[str]:
        used = self.output.inputs()
        return [n for n in self.recipe.inputs if n in used]


def load_recipe(
    source: str | Path | Mapping[str, Any], *, vars: Mapping[str, float] | None = None
) -> Program:
    """Read, validate and compile a recipe (a YAML path or a dict); raise RecipeError listing all problems."""
    name: str | None = None
    base_dir = Path.cwd()
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"recipe {path} does not exist")
        name, base_dir = str(path), path.resolve().parent
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"not valid YAML: {e}", name) from None
    else:
        data = dict(source)
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping with `inputs:` and `steps:`", name)
    if "merge_method" in data:  # a mergekit config: translate it (implies compat: mergekit)
        import click

        from merge.mergekit_import import translate

        data, untranslated = translate(data)
        click.echo("note: this is a mergekit config; translated with `compat: mergekit`", err=True)
        if untranslated:
            raise RecipeError([("", m) for m in untranslated], name)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError([_pydantic_problem(err, data) for err in e.errors()], name) from None
    if vars:
        unknown = [k for k in vars if k not in recipe.vars]
        if unknown:
            raise RecipeError(
                [
                    (
                        f"vars.{k}",
                        f"not declared in the recipe's `vars:`{did_you_mean(k, recipe.vars)}",
                    )
                    for k in unknown
                ],
                name,
            )
        recipe = recipe.model_copy(update={"vars": {**recipe.vars, **vars}})
    return compile_recipe(recipe, name=name, base_dir=base_dir)


def _pydantic_problem(err: Any, data: Any) -> tuple[str, str]:
    loc = [str(x) for x in err["loc"] if not str(x).startswith(("function-", "str", "MethodStep"))]
    path = ".".join(loc)
    if err["type"] == "extra_forbidden":
        parent = data
        for part in loc[:-1]:
            parent = parent.get(part, {}) if isinstance(parent, dict) else {}
        siblings = _valid_keys(loc[:-1])
        return (
            path,
            f"unknown key{did_you_mean(loc[-1], siblings)}; valid keys: {', '.join(siblings)}",
        )
    if err["type"] == "missing":
        return path, "required key is missing"
    return path, err["msg"]


def _valid_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    if loc[:1] == ["output"]:
        model = OutputSpec
    elif loc[:1] == ["options"]:
        model = Options
    return [f.alias or n for n, f in model.model_fields.items()]


def compile_recipe(
    recipe: Recipe, *, name: str | None = None, base_dir: Path | None = None
) -> Program:
    problems: list[tuple[str, str]] = []
    if recipe.version > CURRENT_VERSION:
        problems.append(
            (
                "version",
                f"recipe version {recipe.version} is newer than this merge understands ({CURRENT_VERSION}); upgrade merge",
            )
        )
    inputs = set(recipe.inputs)
    if not recipe.inputs:
        problems.append(("inputs", "a recipe needs at least one input"))
    if not recipe.steps:
        problems.append(("steps", "a recipe needs at least one step"))
    for clash in sorted(
        (inputs & set(recipe.steps))
        | (inputs & set(recipe.vars))
        | (set(recipe.steps) & set(recipe.vars))
    ):
        problems.append(
            (
                f"steps.{clash}",
                f"`{clash}` is used for more than one of inputs, steps and vars; rename one",
            )
        )
    folded: dict[str, Affine] = {}
    for step_name, step in recipe.steps.items():
        where = f"steps.{step_name}"
        try:
            if isinstance(step, str):
                value = fold(
                    parse(step), inputs=inputs, steps=folded, vars=recipe.vars, step=step_name
                )
                if not isinstance(value, Affine):
                    raise ExprError(f"`{step}` is a number, not a model")
                folded[step_name] = value
            else:
                call, step_problems = _method_call(step, step_name, inputs, folded)
                problems += [(f"{where}.{p}" if p else where, m) for p, m in step_problems]
                if call is not None:
                    folded[step_name] = Affine.leaf(call)
        except ExprError as e:
            problems.append((where, str(e)))
        except UsageError as e:
            problems.append((where, str(e)))
    output_step = recipe.output.from_ or (list(recipe.steps)[-1] if recipe.steps else "")
    if recipe.steps and output_step not in recipe.steps:
        problems.append(
            (
                "output.from",
                f"no step named `{output_step}`{did_you_mean(output_step, recipe.steps)}",
            )
        )
    if recipe.output.copy_files_from and recipe.output.copy_files_from not in inputs:
        problems.append(
            (
                "output.copy_files_from",
                f"no input named `{recipe.output.copy_files_from}`{did_you_mean(recipe.output.copy_files_from, inputs)}",
            )
        )
    for i, ov in enumerate(recipe.overrides):
        problems += [
            (f"overrides[{i}]{'.' + p if p else ''}", m)
            for p, m in _override_problems(ov, recipe, folded)
        ]
    if problems:
        raise RecipeError(problems, name)
    return Program(recipe, folded, output_step, base_dir or Path.cwd())


def _method_call(
    step: MethodStep, step_name: str, inputs: set[str], folded: Mapping[str, Affine]
) -> tuple[Call | None, list[tuple[str, str]]]:
    problems: list[tuple[str, str]] = []
    try:
        spec = get_method(step.method)
    except UsageError as e:
        return None, [("method", str(e))]

    def ref(n: str, where: str) -> Affine | None:
        if n in folded:
            return folded[n]
        if n in inputs:
            return Affine.leaf(n)
        problems.append(
            (where, f"no input or earlier step named `{n}`{did_you_mean(n, [*inputs, *folded])}")
        )
        return None

    models_map = (
        {m: None for m in step.models} if isinstance(step.models, list) else dict(step.models)
    )
    params = dict(step.model_extra or {})
    # A per-model parameter given at step level is every model's default.
    step_level = {k: v for k, v in params.items() if k in spec.per_model}
    models: list[Affine] = []
    names: list[str] = []
    model_params: list[tuple[tuple[str, object], ...]] = []
    given_all: list[dict[str, Any]] = []
    for m, mp in models_map.items():
        a = ref(m, f"models.{m}")
        if a is None:
            continue
        models.append(a)
        names.append(m)
        own = dict(mp or {})
        for k in own:
            if k not in spec.per_model:
                problems.append(
                    (
                        f"models.{m}.{k}",
                        f"`{k}` is not a per-model parameter of `{spec.name}`{did_you_mean(k, spec.per_model)}; per-model parameters: {', '.join(spec.per_model) or 'none'}",
                    )
                )
        given = {**step_level, **own}
        for k, default in spec.per_model.items():
            if k not in given and default is None:
                problems.append(
                    (f"models.{m}", f"method `{spec.name}` needs per-model parameter `{k}`")
                )
        given_all.append({k: v for k, v in given.items() if k in spec.per_model})
        model_params.append(tuple((k, _freeze(v)) for k, v in given.items() if k in spec.per_model))
    base = ref(step.base, "base") if step.base else None
    from merge.methods.validate import call_problems

    # Model count, base, parameter names, ranges and choices: the method catalogue's own checks.
    global_given = {k: v for k, v in params.items() if k not in spec.per_model}
    for msg in call_problems(
        spec.name,
        len(models_map),
        has_base=step.base is not None,
        params=global_given,
        per_model_params=given_all,
    ):
        problems.append(("", msg))
    if problems:
        return None, problems
    return Call(
        spec.name,
        tuple(models),
        base,
        tuple((k, _freeze(v)) for k, v in params.items() if k in spec.global_params),
        tuple(model_params),
        step_name,
        tuple(names),
    ), []


def _freeze(v: object) -> object:
    return tuple(v) if isinstance(v, list) else v


def _override_problems(
    ov: Override, recipe: Recipe, folded: Mapping[str, Affine]
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if (ov.glob is None) == (ov.regex is None):
        out.append(("", "give exactly one of `glob:` or `regex:` to select tensors"))
    if ov.regex is not None:
        try:
            re.compile(ov.regex)
        except re.error as e:
            out.append(("regex", f"not a valid regular expression: {e}"))
    if ov.input is not None and ov.input not in recipe.inputs:
        out.append(("input", f"no input named `{ov.input}`{did_you_mean(ov.input, recipe.inputs)}"))
    calls = [c for a in folded.values() for c in _all_calls(a)]
    if ov.step is not None:
        if ov.step not in recipe.steps:
            out.append(("step", f"no step named `{ov.step}`{did_you_mean(ov.step, recipe.steps)}"))
            return out
        calls = [c for c in calls if c.step == ov.step]
        if not calls:
            out.append(
                ("step", f"step `{ov.step}` calls no method, so it has no parameters to override")
            )
            return out
    if not ov.params():
        out.append(("", "an override needs at least one parameter to set"))
    valid: set[str] = set()
    for c in calls:
        spec = get_method(c.method)
        valid |= set(spec.global_params) | set(spec.per_model)
    for k in ov.params():
        if k not in valid:
            out.append(
                (
                    k,
                    f"no method call{' in step ' + ov.step if ov.step else ''} takes `{k}`{did_you_mean(k, valid)}",
                )
            )
    return out


def _all_calls(a: Affine) -> list[Call]:
    out = []
    for c in a.calls():
        out.append(c)
        for m in (*c.models, *([c.base] if c.base else [])):
            out += _all_calls(m)
    return out


def all_calls(a: Affine) -> list[Call]:
    """Every method call reachable from an affine form (nested calls included)."""
    return _all_calls(a)


def linear_recipe(
    paths: Sequence[str],
    weights: Sequence[float] | None,
    *,
    normalize: bool = True,
    prefix: str = "m",
    step: str = "soup",
) -> dict[str, Any]:
    """A weighted sum of checkpoints as a recipe: the `linear` method over inputs m0, m1, ..."""
    names = [f"{prefix}{i}" for i in range(len(paths))]
    w = list(weights) if weights is not None else [1.0] * len(paths)
    return {
        "version": CURRENT_VERSION,
        "inputs": dict(zip(names, paths)),
        "steps": {
            step: {
                "method": "linear",
                "models": {n: {"weight": wi} for n, wi in zip(names, w)},
                "normalize": normalize,
            }
        },
        "output": {"copy_files_from": names[0]},
    }
