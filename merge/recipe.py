"""YAML recipes: validated with pydantic, then compiled into affine forms per step (a recipe
with layer `slices:` compiles to one method step per slice; `merge.slices` plans them).

Every problem is collected with its key path and reported together in one RecipeError;
misspelt names get a "did you mean" suggestion. Nothing here reads a tensor.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import regex
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from merge.dtypes import DtypeName
from merge.errors import RecipeError, UsageError, did_you_mean
from merge.expr import Affine, Call, ExprError, HiddenNameError, fold, names_in, parse
from merge.methods import get_method
from merge.vocab.spec import TokenizerSpec, TokenSpec, tokenizer_problems

ParamValue = float | int | bool | str | list[float]
CURRENT_VERSION = 1
DEFAULT_SHARD_TEXT = "5GB"  # `merge.io.writer.DEFAULT_SHARD_SIZE`, as a recipe writes it
# A shard below this is surely a typo (`5B` for `5GB`): a 7B model would become ~14,000 files.
MIN_SHARD_SIZE = 10**6
MIN_SHARD_TEXT = "1MB"
# Tensors matched by one regex override: a name is searched in at most this long, so a
# pattern with catastrophic backtracking fails fast instead of hanging the merge.
REGEX_TIMEOUT_S = 0.05
# A recipe is a few hundred YAML nodes; aliases that expand past this are a mistake or a bomb.
MAX_YAML_NODES = 100_000
# Each problem's text is clipped: messages quote the user's values, which can be huge.
MAX_PROBLEM_CHARS = 600


def parse_shard_size(value: str | int, *, typed: bool = True) -> int:
    """Bytes of a shard size written like 5GB, 500MB or 2GiB.

    Sizes a person typed (`typed`: a recipe file, `--shard-size`) must be at least 1 MB;
    programs (the Python API, tests of sharding) may ask for smaller shards. Raises UsageError
    (the recipe layer adds the key path).
    """
    from merge.errors import PlanError
    from merge.io.writer import parse_size

    if isinstance(value, bool) or not isinstance(value, str | int):
        raise UsageError(f"a shard size is text like 5GB or 500MB, not {value!r}")
    try:
        size = parse_size(value)
    except (PlanError, OverflowError) as e:
        text = str(e) if isinstance(e, PlanError) else f"size `{value}` is too large"
        raise UsageError(text) from None
    if size < 1:
        raise UsageError(f"a shard size must be positive, not `{value}`")
    if typed and size < MIN_SHARD_SIZE:
        raise UsageError(
            f"a shard size of {size} bytes (`{value}`) is surely a mistake; shards must be at "
            f"least {MIN_SHARD_TEXT} (write e.g. 5GB or 500MB)"
        )
    return size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class OutputSpec(_Strict):
    from_: str | None = Field(None, alias="from")
    path: str | None = None
    dtype: DtypeName | None = None
    shard_size: str | int = DEFAULT_SHARD_TEXT
    copy_files_from: str | None = None

    @field_validator("shard_size")
    @classmethod
    def _shard_size_reads(cls, v: str | int) -> str | int:
        try:
            parse_shard_size(v, typed=False)
        except UsageError as e:
            raise ValueError(str(e)) from None
        return v


class MethodStep(BaseModel):
    """`{method: ties, base: base, models: {...}, <method params>}`; extra keys are method params."""

    model_config = ConfigDict(extra="allow", frozen=True)
    method: str
    base: str | None = None
    models: list[str] | dict[str, dict[str, ParamValue] | None] = Field(default_factory=list)


class SliceSource(BaseModel):
    """`{input: a, layers: [start, stop], <per-model params>}`: layers start..stop-1 of `a`."""

    model_config = ConfigDict(extra="allow")
    input: str
    layers: tuple[int, int]

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SliceSpec(BaseModel):
    """One output slice: aligned layer ranges of its sources, merged by `method` (extra keys are
    the method's parameters)."""

    model_config = ConfigDict(extra="allow")
    sources: list[SliceSource] = Field(min_length=1)
    method: str | None = None
    base: str | None = None

    @property
    def length(self) -> int:
        start, stop = self.sources[0].layers
        return stop - start


def slice_step_name(i: int) -> str:
    return f"slice{i}"


class Override(BaseModel):
    """Per-tensor parameter values: `glob:` or `regex:` selects tensors; extra keys are params."""

    model_config = ConfigDict(extra="allow", frozen=True)
    glob: str | None = None
    regex: str | None = None
    step: str | None = None
    input: str | None = None
    # True for overrides that may select nothing (tables shared by several layouts): no warning.
    optional: bool = False

    _compiled: Any = PrivateAttr(default=None)

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def matches(self, tensor: str) -> bool:
        if self.glob is not None:
            return fnmatch.fnmatchcase(tensor, self.glob)
        if self.regex is None:
            return False
        if isinstance(self._compiled, UsageError):  # timed out before: fail at once
            raise self._compiled
        if self._compiled is None:
            self._compiled = regex.compile(self.regex)
        # The `regex` engine (a dependency of transformers, which we require) takes the same
        # syntax as `re` and, unlike it, a timeout.
        try:
            return self._compiled.search(tensor, timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            self._compiled = UsageError(
                f"override regex `{_clip(self.regex, 100)}` took more than "
                f"{REGEX_TIMEOUT_S * 1000:.0f} ms on tensor `{_clip(tensor, 200)}` (catastrophic "
                "backtracking); simplify it, e.g. avoid nested repeats like `(a+)+`, or use `glob:`"
            )
            raise self._compiled from None


class Options(_Strict):
    keys: Literal["strict", "intersection", "union"] = "strict"
    mixed_architectures: bool = False  # allow --keys outputs no copied config describes
    seed: int = 0
    compat: Literal["paper", "mergekit"] = "paper"
    # mergekit's compute dtype (its config's `dtype`): task vectors are rounded to it before
    # trimming under `compat: mergekit`. Set by the mergekit import; float32 math otherwise.
    compute_dtype: DtypeName | None = None


class Recipe(_Strict):
    version: int = CURRENT_VERSION
    description: str | None = None
    inputs: dict[str, str]
    vars: dict[str, FiniteFloat] = Field(default_factory=dict)
    steps: dict[str, str | MethodStep] = Field(default_factory=dict)
    slices: list[SliceSpec] | None = None  # layer slices instead of steps (compile_slices)
    output: OutputSpec = Field(default_factory=lambda: OutputSpec.model_validate({}))
    overrides: list[Override] = Field(default_factory=list)
    options: Options = Field(default_factory=Options)
    # The output's vocabulary, tokenizer and chat template (merge/vocab/spec.py).
    tokenizer: TokenizerSpec | None = None


@dataclass(frozen=True)
class Program:
    """A compiled recipe: each step folded to an affine form over inputs and method calls."""

    recipe: Recipe
    steps: dict[str, Affine]
    output_step: str
    base_dir: Path
    translated_from: str | None = None  # "mergekit": the recipe was a mergekit config

    @property
    def output(self) -> Affine:
        return self.steps[self.output_step]

    def input_path(self, name: str) -> str:
        raw = self.recipe.inputs[name]
        try:
            p = Path(raw).expanduser()
        except RuntimeError as e:  # `~nouser` (compile_recipe reports it; this is a fallback)
            raise UsageError(f"inputs.{name}: cannot expand `{raw}` ({e})") from None
        try:
            if not p.is_absolute() and (self.base_dir / p).exists():
                return str(self.base_dir / p)
        except (OSError, ValueError):  # a name too long, or with a NUL: opening it says so
            pass
        return raw

    def used_inputs(self) -> list[str]:
        used = (
            set().union(*(a.inputs() for a in self.steps.values()))
            if self.recipe.slices
            else self.output.inputs()
        )
        return [n for n in self.recipe.inputs if n in used]


def load_recipe(
    source: str | Path | Mapping[str, Any], *, vars: Mapping[str, float] | None = None
) -> Program:
    """Read, validate and compile a recipe (a YAML path or a dict); raise RecipeError listing all problems.

    A mergekit config is translated first (`Program.translated_from` says so; the CLI prints a note).
    """
    data, name, base_dir = read_mapping(
        source, "a recipe must be a mapping with `inputs:` and `steps:`"
    )
    translated_from = None
    if "experts" in data and "base_model" in data and "merge_method" not in data:
        raise RecipeError(
            "this is a mergekit-moe config (`base_model:` and `experts:`); build it with "
            "`merge moe CONFIG -o OUT`",
            name,
        )
    if "merge_method" in data:  # a mergekit config: translate it (implies compat: mergekit)
        from merge.mergekit_import import translate

        data, untranslated = translate(data, base_dir=base_dir)
        translated_from = "mergekit"
        if untranslated:
            raise RecipeError([("", _clip(m)) for m in untranslated], name)
    problems: list[tuple[str, str]] = []
    broken: set[str] = set()
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        problems = [_pydantic_problem(err, data) for err in errors]
        salvaged = _salvage(data, errors, broken)
        try:
            recipe = Recipe.model_validate(salvaged)
        except ValidationError:
            raise RecipeError(_clipped(problems), name) from None
    except RecursionError:
        raise RecipeError("the recipe nests too deeply to validate", name) from None
    if name is not None and "shard_size" in recipe.output.model_fields_set:
        try:
            parse_shard_size(recipe.output.shard_size)
        except UsageError as e:
            problems.append(("output.shard_size", str(e)))
    if vars:
        unknown = [k for k in vars if k not in recipe.vars]
        problems += [
            (f"vars.{k}", f"not declared in the recipe's `vars:`{did_you_mean(k, recipe.vars)}")
            for k in unknown
        ]
        problems += [
            (f"vars.{k}", f"must be a finite number, got {v}")
            for k, v in vars.items()
            if not _finite(v)
        ]
        if not problems:
            recipe = recipe.model_copy(update={"vars": {**recipe.vars, **vars}})
    program = compile_recipe(recipe, name=name, base_dir=base_dir, problems=problems, broken=broken)
    return replace(program, translated_from=translated_from) if translated_from else program


def read_mapping(
    source: str | Path | Mapping[str, Any], shape: str
) -> tuple[dict[str, Any], str | None, Path]:
    """A recipe or config (a YAML path, or a mapping given as is) as (mapping, its file name or
    None, the folder its relative paths start from). RecipeError with `shape` (what the mapping
    should hold) when the YAML is not a mapping."""
    name: str | None = None
    base_dir = Path.cwd()
    if isinstance(source, str | Path):
        path = Path(source)
        name, base_dir = str(path), path.resolve().parent
        data = _read_yaml(path, name)
    else:
        data = dict(source)
    if not isinstance(data, dict):
        raise RecipeError(shape, name)
    return data, name, base_dir


def _read_yaml(path: Path, name: str) -> Any:
    try:
        if not path.exists():
            raise UsageError(f"recipe {path} does not exist")
        if not path.is_file():
            raise UsageError(f"recipe {path} is not a regular file (a folder, FIFO or device)")
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read recipe {path} ({e.strerror})") from None
    except ValueError as e:  # a NUL in the name
        raise UsageError(f"recipe {path!r} is not a usable path ({e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); save the recipe as UTF-8",
            name,
        ) from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise RecipeError(f"not valid YAML: {_clip(str(e))}", name) from None
    except RecursionError:
        raise RecipeError("the YAML nests too deeply (hundreds of levels) to read", name) from None


# libyaml's parser when PyYAML has it: it fails a 1,200-deep document in milliseconds where the
# pure-Python composer recurses for seconds before its RecursionError.
_SafeLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _BoundedLoader(_SafeLoader):  # type: ignore[misc,valid-type]
    """SafeLoader that refuses documents whose aliases expand past MAX_YAML_NODES nodes.

    Aliases share one Python object, so loading a "billion laughs" document is cheap, but
    anything that walks it (validation, error messages) pays for every expansion.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expanded_size(node)
        return super().construct_document(node)


def _check_expanded_size(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}
    # Iterative post-order walk; `sizes` memoises shared (aliased) nodes.
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes and not done:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [x for pair in node.value for x in pair]
        if not done:
            if key in on_path:
                raise yaml.YAMLError("an alias refers to itself (a recursive structure)")
            on_path.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        on_path.discard(key)
        sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
        if sizes[key] > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"aliases (*name) expand the document past {MAX_YAML_NODES:,} values; a recipe "
                "is far smaller, so this looks like an alias bomb"
            )


def _salvage(data: dict[str, Any], errors: list[Any], broken: set[str]) -> dict[str, Any]:
    """`data` without the parts that failed the schema, so the rest can still be checked.

    Names of steps, inputs and vars that were dropped go into `broken`: they are defined (and
    already reported), so references to them are not reported again as unknown names.
    """
    out: dict[str, Any] = {
        k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
        for k, v in data.items()
    }
    drop_overrides: set[int] = set()
    for err in errors:
        loc = [x for x in err["loc"] if not str(x).startswith(("function-", "str", "MethodStep"))]
        if not loc:
            continue
        top = loc[0]
        if len(loc) == 1 or not isinstance(out.get(top), dict | list):
            if top in ("inputs", "steps") and isinstance(out.get(top), dict):
                continue
            out.pop(top, None)
            continue
        if top == "overrides" and isinstance(loc[1], int):
            drop_overrides.add(loc[1])
        elif isinstance(out[top], dict):
            if top in ("steps", "inputs", "vars"):
                broken.add(str(loc[1]))
            out[top].pop(loc[1], None)
    if drop_overrides and isinstance(out.get("overrides"), list):
        out["overrides"] = [o for i, o in enumerate(out["overrides"]) if i not in drop_overrides]
    for key in ("inputs", "steps"):
        out.setdefault(key, {})
    return out


def _clip(text: str, limit: int = MAX_PROBLEM_CHARS) -> str:
    return (
        text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"
    )


def _clipped(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(_clip(p, 200), _clip(m)) for p, m in problems]


def _finite(v: object) -> bool:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return True
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


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
    return path, str(err["msg"]).removeprefix("Value error, ")


def _valid_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    if loc[:1] == ["output"]:
        model = OutputSpec
    elif loc[:1] == ["options"]:
        model = Options
    elif loc[:1] == ["tokenizer"]:
        model = TokenSpec if loc[1:2] == ["tokens"] else TokenizerSpec
    return [f.alias or n for n, f in model.model_fields.items()]


def compile_recipe(
    recipe: Recipe,
    *,
    name: str | None = None,
    base_dir: Path | None = None,
    problems: list[tuple[str, str]] | None = None,
    broken: set[str] | None = None,
) -> Program:
    """Fold every step into an affine form; raise RecipeError with every problem at once.

    `problems` and `broken` carry what schema validation already found (and the names of the
    steps, inputs and vars it had to drop), so those are reported once, with the rest.
    """
    problems = list(problems or [])
    broken = set(broken or ())
    problems += tokenizer_problems(recipe.tokenizer, list(recipe.inputs), base_dir or Path.cwd())
    if recipe.slices is not None:
        return compile_slices(recipe, name=name, base_dir=base_dir or Path.cwd(), problems=problems)
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
    for input_name, raw in recipe.inputs.items():
        try:
            Path(raw).expanduser().exists()
        except RuntimeError as e:  # `~nouser`
            problems.append(
                (
                    f"inputs.{input_name}",
                    f"cannot expand `{_clip(raw, 200)}` ({e}); write the path out",
                )
            )
        except (OSError, ValueError) as e:  # a name too long, a NUL in it
            reason = e.strerror if isinstance(e, OSError) else str(e)
            problems.append(
                (f"inputs.{input_name}", f"`{_clip(raw, 200)}` is not a usable path ({reason})")
            )
    folded = _compile_steps(recipe, inputs, problems, broken)
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
            for p, m in _override_problems(ov, recipe, folded, broken)
        ]
    if problems:
        raise RecipeError(_clipped(problems), name)
    return Program(recipe, folded, output_step, base_dir or Path.cwd())


def compile_slices(
    recipe: Recipe,
    *,
    name: str | None,
    base_dir: Path,
    problems: list[tuple[str, str]] | None = None,
) -> Program:
    """A recipe with `slices:` as a Program whose steps are `slice0`, `slice1`, ... (one method
    call each over the input names); ranges are checked against the models at planning."""
    assert recipe.slices is not None
    problems = list(problems or [])  # what schema validation already found
    if recipe.steps:
        problems.append(("steps", "give `steps:` or `slices:`, not both"))
    if recipe.output.from_ is not None:
        problems.append(("output.from", "a sliced recipe's output is its slices; remove `from`"))
    if not recipe.slices:
        problems.append(("slices", "a sliced recipe needs at least one slice"))
    inputs = set(recipe.inputs)
    folded: dict[str, Affine] = {}
    for i, sl in enumerate(recipe.slices):
        where = f"slices[{i}]"
        lengths = set()
        for j, src in enumerate(sl.sources):
            start, stop = src.layers
            if src.input not in inputs:
                problems.append(
                    (
                        f"{where}.sources[{j}].input",
                        f"no input named `{src.input}`{did_you_mean(src.input, inputs)}",
                    )
                )
            if not 0 <= start < stop:
                problems.append(
                    (
                        f"{where}.sources[{j}].layers",
                        f"[{start}, {stop}] is not a layer range: give [start, stop] with "
                        "0 <= start < stop (stop excluded, as in Python and mergekit)",
                    )
                )
            lengths.add(stop - start)
        if len(lengths) > 1:
            problems.append(
                (
                    f"{where}.sources",
                    "the sources of one slice must span the same number of layers (layer j of "
                    f"the slice merges layer start+j of each); got {sorted(lengths)}",
                )
            )
        names = [s.input for s in sl.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(
                (
                    f"{where}.sources",
                    f"input `{dup[0]}` is listed twice in one slice; a slice merges different "
                    "models (use two slices to stack two ranges of one model)",
                )
            )
            continue
        method = sl.method or ("passthrough" if len(sl.sources) == 1 else None)
        if method is None:
            problems.append(
                (f"{where}.method", "a slice with several sources needs a `method:` to merge them")
            )
            continue
        if sl.base is not None and sl.base not in names:
            problems.append(
                (
                    f"{where}.base",
                    f"`{sl.base}` is not one of this slice's sources ({', '.join(names)}); "
                    "the base contributes its own layers of the same range, so list it there",
                )
            )
            continue
        step = MethodStep.model_validate(
            {
                **(sl.model_extra or {}),
                "method": method,
                "base": sl.base,
                "models": {s.input: s.params() for s in sl.sources if s.input != sl.base},
            }
        )
        call, step_problems = _method_call(step, slice_step_name(i), inputs, folded)
        problems += [(f"{where}.{p}" if p else where, m) for p, m in step_problems]
        if call is not None:
            folded[slice_step_name(i)] = Affine.leaf(call)
    if recipe.output.copy_files_from and recipe.output.copy_files_from not in inputs:
        problems.append(
            ("output.copy_files_from", f"no input named `{recipe.output.copy_files_from}`")
        )
    # Overrides may name a slice's step (`step: slice1`): check them against the slice steps.
    as_steps = recipe.model_copy(update={"steps": dict.fromkeys(folded, "")})
    for i, ov in enumerate(recipe.overrides):
        problems += [
            (f"overrides[{i}]{'.' + p if p else ''}", m)
            for p, m in _override_problems(ov, as_steps, folded)
        ]
    if problems:
        raise RecipeError(problems, name)
    last = slice_step_name(len(recipe.slices) - 1)
    return Program(recipe, folded, last, base_dir)


def _step_deps(step: str | MethodStep, parsed: object, steps: set[str]) -> set[str]:
    if isinstance(step, str):
        return (names_in(parsed) & steps) if parsed is not None else set()  # type: ignore[arg-type]
    models = step.models if isinstance(step.models, list) else list(step.models)
    return {m for m in [*models, step.base] if isinstance(m, str) and m in steps}


def _compile_steps(
    recipe: Recipe, inputs: set[str], problems: list[tuple[str, str]], broken: set[str]
) -> dict[str, Affine]:
    """Each step folded once, in dependency order (a step may use any other step, not only
    earlier ones). A step that uses a broken step is skipped without a second report."""
    names = set(recipe.steps)
    found: list[tuple[str, str]] = []  # reported in recipe order, not compile order
    outer, problems = problems, found
    parsed: dict[str, object] = {}
    for step_name, step in recipe.steps.items():
        if isinstance(step, str):
            try:
                parsed[step_name] = parse(step)
            except ExprError as e:
                problems.append((f"steps.{step_name}", str(e)))
                broken.add(step_name)
    deps = {n: _step_deps(st, parsed.get(n), names) for n, st in recipe.steps.items()}
    order: list[str] = []
    state: dict[str, int] = {}  # 1: being visited, 2: done
    for start in recipe.steps:
        stack = [(start, iter(sorted(deps[start])))] if start not in state else []
        if stack:
            state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[node] = 2
                order.append(node)
            elif state.get(nxt) == 1:
                path = [n for n, _ in stack]
                cycle = [*path[path.index(nxt) :], nxt]
                problems.append(
                    (f"steps.{nxt}", f"steps use each other in a cycle: {' -> '.join(cycle)}")
                )
                broken.update(cycle)
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(deps[nxt]))))
    folded: dict[str, Affine] = {}
    for step_name in order:
        step = recipe.steps[step_name]
        where = f"steps.{step_name}"
        if step_name in broken or deps[step_name] & broken:
            # Skipped, but names it uses that exist nowhere are still typos worth reporting.
            if step_name not in broken:
                problems += _unknown_names(
                    step_name, step, parsed.get(step_name), recipe, inputs, broken
                )
            broken.add(step_name)
            continue
        before = len(problems)
        try:
            if isinstance(step, str):
                value = fold(
                    parsed[step_name],  # type: ignore[arg-type]
                    inputs=inputs,
                    steps=folded,
                    vars=recipe.vars,
                    step=step_name,
                    hidden=broken,
                )
                if not isinstance(value, Affine):
                    raise ExprError(f"`{_clip(step, 200)}` is a number, not a model")
                folded[step_name] = value
            else:
                call, step_problems = _method_call(step, step_name, inputs, folded, broken)
                problems += [(f"{where}.{p}" if p else where, m) for p, m in step_problems]
                if call is not None:
                    folded[step_name] = Affine.leaf(call)
        except HiddenNameError:
            pass  # uses a broken input or var, reported on its own
        except (ExprError, UsageError) as e:
            problems.append((where, str(e)))
        except (RecursionError, MemoryError):
            problems.append((where, "the expression is too deeply nested; split it into steps"))
        if len(problems) > before or step_name not in folded:
            broken.add(step_name)
    rank = {n: i for i, n in enumerate(recipe.steps)}
    outer += sorted(found, key=lambda p: rank.get(p[0].split(".")[1], 0))
    return {n: folded[n] for n in recipe.steps if n in folded}


def _unknown_names(
    step_name: str,
    step: str | MethodStep,
    node: object,
    recipe: Recipe,
    inputs: set[str],
    broken: set[str],
) -> list[tuple[str, str]]:
    known = {*inputs, *recipe.steps, *recipe.vars, *broken}
    where = f"steps.{step_name}"
    if isinstance(step, str):
        return [
            (where, f"unknown name `{n}`{did_you_mean(n, known)}")
            for n in sorted(names_in(node) - known)  # type: ignore[arg-type]
        ]
    models = step.models if isinstance(step.models, list) else list(step.models)
    out = [
        (f"{where}.models.{m}", f"no input or step named `{m}`{did_you_mean(m, known)}")
        for m in models
        if m not in known
    ]
    if step.base is not None and step.base not in known:
        out.append(
            (
                f"{where}.base",
                f"no input or step named `{step.base}`{did_you_mean(step.base, known)}",
            )
        )
    return out


def _method_call(
    step: MethodStep,
    step_name: str,
    inputs: set[str],
    folded: Mapping[str, Affine],
    broken: set[str] = frozenset(),  # type: ignore[assignment]
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
        if n in broken:  # defined, and its own problem is already reported
            problems.append(("", ""))
            return None
        problems.append(
            (where, f"no input or step named `{n}`{did_you_mean(n, [*inputs, *folded])}")
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
        problems.append(("", _hint_mergekit_names(msg, spec)))
    for k, v in params.items():
        problems += [(k, m) for m in _value_problems(v)]
    for m, mp in models_map.items():
        for k, v in (mp or {}).items():
            problems += [(f"models.{m}.{k}", msg) for msg in _value_problems(v)]
    if problems:
        return None, [p for p in problems if p != ("", "")]
    return Call(
        spec.name,
        tuple(models),
        base,
        tuple((k, _freeze(v)) for k, v in params.items() if k in spec.global_params),
        tuple(model_params),
        step_name,
        tuple(names),
    ), []


def _hint_mergekit_names(msg: str, spec: Any) -> str:
    if "unknown parameter `lambda`" in msg and "scale" in spec.global_params:
        return msg + "; `lambda` is mergekit's name for what merge calls `scale`"
    return msg


def _value_problems(v: object) -> list[str]:
    """Why a parameter value is unusable: a non-finite number, or not a number, flag or text."""
    if isinstance(v, list):
        if not v:
            return ["an empty list; give one number per layer block"]
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
            return [f"a list must hold numbers only, got {_clip(repr(v), 120)}"]
        if not all(_finite(x) for x in v):
            return [f"must hold finite numbers, got {_clip(repr(v), 120)}"]
        return []
    if isinstance(v, dict) or v is None:
        return [f"must be a number, a list of numbers, true/false or text, not {type(v).__name__}"]
    if not _finite(v):
        return [f"must be a finite number, got {_clip(repr(v), 60)}"]
    return []


def _freeze(v: object) -> object:
    return tuple(v) if isinstance(v, list) else v


def _override_problems(
    ov: Override,
    recipe: Recipe,
    folded: Mapping[str, Affine],
    broken: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if (ov.glob is None) == (ov.regex is None):
        out.append(("", "give exactly one of `glob:` or `regex:` to select tensors"))
    if ov.regex is not None:
        try:
            re.compile(ov.regex)
            regex.compile(ov.regex)
        except (re.error, regex.error) as e:
            out.append(("regex", f"not a valid regular expression: {e}"))
        except (RecursionError, MemoryError, OverflowError):
            out.append(("regex", "the regular expression is too large or deeply nested"))
    for k, v in ov.params().items():
        out += [(k, m) for m in _value_problems(v)]
    if ov.input is not None and ov.input not in recipe.inputs and ov.input not in broken:
        out.append(("input", f"no input named `{ov.input}`{did_you_mean(ov.input, recipe.inputs)}"))
    calls = [c for a in folded.values() for c in all_calls(a)]
    if ov.step is not None:
        if ov.step in broken:
            # The step's own problems are reported; check the keys against its method if known.
            st = recipe.steps.get(ov.step)
            try:
                spec = get_method(st.method) if isinstance(st, MethodStep) else None
            except UsageError:
                spec = None
            if spec is not None:
                valid_keys = {*spec.global_params, *spec.per_model}
                out += [
                    (
                        k,
                        f"method `{spec.name}` of step {ov.step} takes no `{k}`{did_you_mean(k, valid_keys)}",
                    )
                    for k in ov.params()
                    if k not in valid_keys
                ]
            return out
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
    if broken & set(recipe.steps) and ov.step is None:
        return out  # a broken step may be the one that takes these parameters
    for k in ov.params():
        if k not in valid:
            hint = (
                "; `lambda` is mergekit's name for what merge calls `scale`"
                if k == "lambda" and "scale" in valid
                else ""
            )
            out.append(
                (
                    k,
                    f"no method call{' in step ' + ov.step if ov.step else ''} takes `{k}`{did_you_mean(k, valid)}{hint}",
                )
            )
    # Values: each call's own domains, through the methods' one binder.
    from merge.methods._registry import override_problems

    for c in calls:
        for k, m in override_problems(get_method(c.method), ov.params(), dict(c.params), ov.glob):
            if (k, m) not in out:
                out.append((k, m))
    return out


def unmatched_overrides(recipe: Recipe, tensors: Sequence[str]) -> list[str]:
    """A message for each override whose `glob:`/`regex:` selects none of `tensors`, with the
    nearest tensor names (the planner warns with them: such an override silently does nothing)."""
    out = []
    for i, ov in enumerate(recipe.overrides):
        if (ov.glob is None and ov.regex is None) or ov.optional:
            continue
        if any(ov.matches(t) for t in tensors):
            continue
        kind, pattern = ("glob", ov.glob) if ov.glob is not None else ("regex", ov.regex)
        probe = re.sub(r"[*?\[\]^$()+|\\{}]", "", pattern or "")
        matcher = difflib.SequenceMatcher(b=probe, autojunk=False)
        scored = []
        for t in list(tensors)[:20_000]:
            matcher.set_seq1(t)
            scored.append((-matcher.ratio(), t))
        near = [t for _, t in sorted(scored)[:3]]
        out.append(
            f"overrides[{i}]: {kind} `{_clip(pattern or '', 200)}` matches no tensor, so it changes "
            "nothing" + (f"; nearest names: {', '.join(near)}" if near else "")
        )
    return out


def all_calls(a: Affine) -> list[Call]:
    """Each method call reachable from `a`, nested calls included, once (a step used twice is
    one call, not a subtree per use)."""
    out: dict[int, Call] = {}
    stack = [a]
    while stack:
        for c in stack.pop().calls():
            if id(c) not in out:
                out[id(c)] = c
                stack += [*c.models, *([c.base] if c.base else [])]
    return list(out.values())


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
