"""The model card and recipe file written beside a merged model's weights.

`README.md` follows Hugging Face's card layout: YAML front matter (`base_model:` listing the
inputs, `library_name`, `tags:` with `merge`), then the method, the inputs and the recipe that
produced the weights, with the tool's name and version. `merge-recipe.yaml` is the recipe as it
ran (a mergekit config appears translated), so `merge run merge-recipe.yaml` redoes the merge
from the same inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from merge.methods import get_method
from merge.plan import Plan
from merge.recipe import all_calls
from merge.version import __version__

TOOL = "mergewright"
RECIPE_FILE = "merge-recipe.yaml"


def input_paths(plan: Plan) -> dict[str, str]:
    """Each input as an absolute, resolved path where it is local (a hub id as given), so the
    card and recipe file do not depend on how the inputs were spelled or where merge ran."""
    out = {}
    for name, raw in plan.program.recipe.inputs.items():
        path = Path(plan.program.input_path(name))
        out[name] = str(path.resolve()) if path.exists() else raw
    return out


def recipe_dict(plan: Plan) -> dict[str, Any]:
    """The recipe as it ran, as plain data (None values left out), inputs resolved."""
    data = plan.program.recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["inputs"] = input_paths(plan)
    return data


def recipe_yaml(plan: Plan) -> str:
    return yaml.safe_dump(recipe_dict(plan), sort_keys=False, allow_unicode=True)


def _methods(plan: Plan) -> list[tuple[str, str, str | None]]:
    """(step, method, base input) of every method call the output uses, in recipe order."""
    out = []
    seen = set()
    for step, form in plan.program.steps.items():
        for call in all_calls(form):
            if (step, call.method) in seen:
                continue
            seen.add((step, call.method))
            base = ", ".join(sorted(call.base.inputs())) if call.base is not None else None
            out.append((step, f"{call.method} ({get_method(call.method).reference})", base))
    return out


def model_card(plan: Plan) -> str:
    """README.md text for the merged model (independent of where it is written, so the same
    recipe gives the same bytes)."""
    recipe = plan.program.recipe
    title = recipe.description or "Merged model"
    used = plan.program.used_inputs()
    paths = input_paths(plan)
    front: dict[str, Any] = {"base_model": [paths[n] for n in used]}
    if any(rel == "config.json" for rel, _ in plan.sources[plan.layout_input].support_files()):
        front["library_name"] = "transformers"
    front["tags"] = ["merge", TOOL]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        f"# {title}",
        "",
        f"This model is a merge of pre-trained models made with {TOOL} {__version__} "
        f"(the `merge` command).",
        "",
        "## Method",
        "",
    ]
    methods = _methods(plan)
    if recipe.slices:
        lines.append(
            f"Layer slices: {len(recipe.slices)} slices stacked into the output's layers "
            "(see the recipe)."
        )
    for step, method, base in methods:
        lines.append(f"- step `{step}`: {method}" + (f", base `{base}`" if base else ""))
    if not methods:
        lines.append("- weighted sums of the inputs (task-vector arithmetic, see the recipe)")
    lines += ["", "## Inputs", "", "| name | model |", "| --- | --- |"]
    lines += [f"| {n} | {paths[n]} |" for n in used]
    lines += [
        "",
        "## Recipe",
        "",
        f"The recipe that produced these weights (also in `{RECIPE_FILE}`):",
        "",
        "```yaml",
        recipe_yaml(plan).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(plan: Plan, folder: Path) -> None:
    """Write README.md and merge-recipe.yaml into the output folder."""
    (folder / "README.md").write_text(model_card(plan))
    (folder / RECIPE_FILE).write_text(recipe_yaml(plan))
