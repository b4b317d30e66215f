"""The Python API: build a merge from an expression or a recipe, stream it to disk or memory.

from merge.api import merge_expression
merge_expression("base + 0.7 * (math - base) - 0.4 * (toxic - base)",
                 {"base": "llama/", "math": "llama-math/", "toxic": "llama-toxic/"}, "out/")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

from merge.errors import UsageError
from merge.execute import Engine, write_plan
from merge.inputs import open_inputs
from merge.io.detect import open_checkpoint
from merge.io.sources import TensorSource
from merge.plan import Plan, build_plan
from merge.recipe import DEFAULT_SHARD_TEXT, Program, linear_recipe, load_recipe
from merge.slices import build_sliced_plan
from merge.vocab.attach import attach_vocab, finish_plan

__all__ = [
    "evaluate_expression_in_memory",
    "evaluate_recipe_in_memory",
    "linear_recipe",
    "merge_expression",
    "plan_recipe",
    "run_recipe",
]


def _split_inputs(inputs: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, TensorSource]]:
    """Paths go into the recipe; in-memory objects (dicts, modules, sources) are opened here."""
    paths: dict[str, str] = {}
    opened: dict[str, TensorSource] = {}
    for name, value in inputs.items():
        if isinstance(value, str | os.PathLike):
            paths[name] = str(value)
        else:
            src = open_checkpoint(value)
            if src.path == "<memory>" or src.path == type(value).__name__:
                src.path = f"<memory:{name}>"
            opened[name] = src
            paths[name] = src.path
    return paths, opened


def plan_recipe(
    recipe: str | Path | Mapping[str, Any] | Program,
    *,
    vars: Mapping[str, float] | None = None,
    dtype: str | None = None,
    keys: str | None = None,
    unsafe_pickle: bool = False,
    preopened: Mapping[str, TensorSource] | None = None,
    passthrough_from: str | None = None,
    mixed_architectures: bool = False,
) -> Plan:
    """Validate a recipe and plan it from the inputs' headers (no tensor is read)."""
    program = recipe if isinstance(recipe, Program) else load_recipe(recipe, vars=vars)
    if keys is not None or mixed_architectures:
        options = program.recipe.options.model_copy(
            update={"keys": keys or program.recipe.options.keys}
            | ({"mixed_architectures": True} if mixed_architectures else {})
        )
        program = replace(program, recipe=program.recipe.model_copy(update={"options": options}))
    sources = open_inputs(program, unsafe_pickle=unsafe_pickle, preopened=preopened)
    # `tokenizer:`: views align the embeddings before planning; its files are added after.
    vocab = attach_vocab(program, sources)
    if program.recipe.slices:  # layer slices: one plan per slice over renaming views
        plan = build_sliced_plan(program, sources, dtype=dtype, passthrough_from=passthrough_from)
    else:
        plan = build_plan(program, sources, dtype=dtype, passthrough_from=passthrough_from)
    return plan if vocab is None else finish_plan(vocab, plan)


def run_recipe(
    recipe: str | Path | Mapping[str, Any] | Program,
    output: str | Path | None = None,
    *,
    vars: Mapping[str, float] | None = None,
    force: bool = False,
    quiet: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    shard_size: str | int | None = None,
    keys: str | None = None,
    unsafe_pickle: bool = False,
    preopened: Mapping[str, TensorSource] | None = None,
    passthrough_from: str | None = None,
    mixed_architectures: bool = False,
    no_card: bool = False,
) -> Path:
    """Plan and execute a recipe into `output` (default: the recipe's `output.path`); a folder
    output gets a model card and the recipe file unless `no_card`."""
    plan = plan_recipe(
        recipe,
        vars=vars,
        dtype=dtype,
        keys=keys,
        unsafe_pickle=unsafe_pickle,
        preopened=preopened,
        passthrough_from=passthrough_from,
        mixed_architectures=mixed_architectures,
    )
    try:
        target = output or plan.program.recipe.output.path
        if target is None:
            raise UsageError("no output path: pass -o/--output or set `output.path` in the recipe")
        out = Path(target)
        if output is None and not out.is_absolute():
            out = plan.program.base_dir / out
        return write_plan(
            plan,
            out,
            force=force,
            shard_size=shard_size,
            device=device,
            quiet=quiet,
            card=not no_card,
        )
    finally:
        plan.close()


def evaluate_recipe_in_memory(
    recipe: str | Path | Mapping[str, Any] | Program,
    vars: Mapping[str, float] | None = None,
    *,
    preopened: Mapping[str, TensorSource] | None = None,
    device: str = "cpu",
) -> dict[str, Tensor]:
    """The recipe's output as an in-memory tensor dict (for sweeps and evaluation of small models)."""
    plan = plan_recipe(recipe, vars=vars, preopened=preopened)
    try:
        return Engine(plan, device=device, quiet=True).to_memory()
    finally:
        plan.close()


def expression_recipe(
    expression: str,
    inputs: Mapping[str, str],
    *,
    keys: str = "strict",
    seed: int = 0,
    **output: Any,
) -> dict[str, Any]:
    """A one-step recipe computing `expression` over `inputs` (output keys left out when None)."""
    return {
        "version": 1,
        "inputs": dict(inputs),
        "steps": {"result": expression},
        "output": {k: v for k, v in output.items() if v is not None},
        "options": {"keys": keys, "seed": seed},
    }


def merge_expression(
    expression: str,
    inputs: Mapping[str, Any],
    output: str | Path,
    *,
    dtype: str | None = None,
    shard_size: str | int = DEFAULT_SHARD_TEXT,
    copy_files_from: str | None = None,
    force: bool = False,
    quiet: bool = True,
    device: str = "cpu",
    keys: str = "strict",
    seed: int = 0,
) -> Path:
    """Evaluate a task-vector expression over named inputs (paths, state dicts, modules) and
    stream the result into `output`; returns the path written."""
    paths, opened = _split_inputs(inputs)
    recipe = expression_recipe(
        expression,
        paths,
        keys=keys,
        seed=seed,
        dtype=dtype,
        shard_size=shard_size,
        copy_files_from=copy_files_from,
    )
    return run_recipe(recipe, output, force=force, quiet=quiet, device=device, preopened=opened)


def evaluate_expression_in_memory(
    expression: str,
    inputs: Mapping[str, Any],
    *,
    dtype: str | None = None,
    device: str = "cpu",
    keys: str = "strict",
    seed: int = 0,
) -> dict[str, Tensor]:
    """`merge_expression`'s result as an in-memory tensor dict (nothing is written)."""
    paths, opened = _split_inputs(inputs)
    recipe = expression_recipe(expression, paths, keys=keys, seed=seed, dtype=dtype)
    return evaluate_recipe_in_memory(recipe, preopened=opened, device=device)
