"""Layer slices: stack and cut decoder layers (frankenmerges, depth up-scaling, per-slice merges).

A recipe with `slices:` instead of `steps:` builds its output layer by layer:

    inputs: {a: ./pico-a, b: ./pico-b}
    slices:
      - sources: [{input: a, layers: [0, 12]}]          # one source: copied (passthrough)
      - sources: [{input: a, layers: [4, 8]}, {input: b, layers: [4, 8], weight: 0.3}]
        method: linear                                   # several aligned ranges: merged
        weight: 0.7                                      # slice-level parameters

Output layer j of slice s is layer `start + j` of each source, merged by the slice's method
with its `base` (one of its sources' inputs) and parameters (per source on the source entry).
Embeddings come from the first slice, the final norm and lm_head from the last (mergekit's
rule), merged by that slice's method. Layer gradients run over each slice's own layers.

The recipe side (the `slices:` schema, and each slice compiled into a method step `slice0`,
`slice1`, ...) is `merge.recipe`'s; this module plans them. Every source becomes a
`LayerView`, a lazy renaming view of its TensorSource that shows the chosen layers under the
output's layer numbers. Each slice is then an ordinary one-step merge of views, planned by
`plan.build_plan`, and the slices' jobs are concatenated, so the streaming loop does not know
slices exist. config.json comes out with the new layer count and layer-indexed lists
(`merge.arch`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

from merge.arch import Arch, detect_arch, sliced_config
from merge.errors import PlanError
from merge.expr import Affine, Call
from merge.io.sources import TensorMeta, TensorSource
from merge.plan import Plan, build_plan
from merge.recipe import Program, slice_step_name

# ---- views ---------------------------------------------------------------------------------------


class LayerView(TensorSource):
    """A lazy renaming view: tensor `shown` of the view is tensor `names[shown]` of `source`."""

    def __init__(self, source: TensorSource, names: Mapping[str, str], label: str):
        self.source = source
        self.names = dict(names)
        self.kind = source.kind
        self.path = source.path
        self.label = label

    def keys(self) -> list[str]:
        return list(self.names)

    def meta(self, name: str) -> TensorMeta:
        return self.source.meta(self.names[name])

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        return self.source.read_range(self.names[name], start, stop, out=out)

    def files(self) -> list[Path]:
        return self.source.files()

    def root(self) -> Path | None:
        return self.source.root()

    def fingerprint(self) -> dict[str, object]:
        return {"view_of": self.source.path, "tensors": len(self.names), "slice": self.label}

    def close(self) -> None:
        pass  # the underlying source belongs to the plan and is closed there


class SlicedLayout(LayerView):
    """The output's layout source: the layout input's files, with config.json rewritten for
    the sliced layer count (written to a temporary folder removed at close)."""

    def __init__(self, source: TensorSource, config: dict[str, Any] | None):
        super().__init__(source, {}, "layout")
        self._config = config
        self._tmp: Path | None = None

    def support_files(self) -> list[tuple[str, Path]]:
        files = self.source.support_files()
        if self._config is None:
            return files
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="merge-slices-"))
            (self._tmp / "config.json").write_text(json.dumps(self._config, indent=2) + "\n")
        return [
            (rel, self._tmp / "config.json" if rel == "config.json" else path)
            for rel, path in files
        ]

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def read_config(source: TensorSource) -> dict[str, Any] | None:
    """The Hugging Face config.json beside a checkpoint, or None."""
    root = source.root()
    path = root / "config.json" if root is not None and root.is_dir() else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else None


# ---- planning ------------------------------------------------------------------------------------


def _renamed(form: Affine, names: Mapping[str, str]) -> Affine:
    terms: list[tuple[str | Call, float]] = []
    for leaf, c in form.terms:
        if isinstance(leaf, str):
            terms.append((names.get(leaf, leaf), c))
        else:
            terms.append(
                (
                    replace(
                        leaf,
                        models=tuple(_renamed(m, names) for m in leaf.models),
                        base=_renamed(leaf.base, names) if leaf.base is not None else None,
                    ),
                    c,
                )
            )
    return Affine(tuple(terms))


def build_sliced_plan(
    program: Program,
    sources: dict[str, TensorSource],
    *,
    dtype: str | None = None,
    passthrough_from: str | None = None,
) -> Plan:
    """One sub-plan per slice over views numbered from 0 (so gradients run over the slice), its
    jobs renamed to the output's layer numbers and read through views numbered that way."""
    recipe = program.recipe
    slices = recipe.slices or []
    used = sorted({s.input for sl in slices for s in sl.sources}, key=list(recipe.inputs).index)
    configs = {u: read_config(sources[u]) for u in used}
    archs: dict[str, Arch] = {}
    for u in used:
        archs[u] = detect_arch(configs[u], sources[u].keys(), f"input `{u}` ({sources[u].path})")
    problems: list[str] = []
    for i, sl in enumerate(slices):
        for j, src in enumerate(sl.sources):
            have = archs[src.input].num_layers
            if src.layers[1] > have:
                problems.append(
                    f"slices[{i}].sources[{j}]: layers {list(src.layers)} reach past "
                    f"`{src.input}`'s {have} layers (its layers are 0..{have - 1}; stop is excluded)"
                )
    if problems:
        raise PlanError("cannot slice these inputs:\n  " + "\n  ".join(problems))

    all_sources: dict[str, TensorSource] = dict(sources)
    jobs = []
    notes: list[str] = []
    out_layers: list[tuple[Mapping[str, Any], int]] = []  # (config, source layer) per output layer
    offset = 0
    for i, sl in enumerate(slices):
        n = sl.length
        local: dict[str, TensorSource] = {}
        shown: dict[str, TensorSource] = {}
        view_of: dict[str, str] = {}
        for src in sl.sources:
            arch, source = archs[src.input], sources[src.input]
            start = src.layers[0]
            local_names: dict[str, str] = {}
            out_names: dict[str, str] = {}
            for key in source.keys():
                layer = arch.layer_of(key)
                if layer is None:
                    pre = arch.is_pre(key)
                    if (pre and i == 0) or (not pre and i == len(slices) - 1):
                        local_names[key] = out_names[key] = key
                elif start <= layer < start + n:
                    local_names[arch.rename(key, layer - start)] = key
                    out_names[arch.rename(key, offset + layer - start)] = key
            view = f"{src.input}[{slice_step_name(i)}]"
            view_of[src.input] = view
            local[view] = LayerView(source, local_names, view)
            shown[view] = LayerView(source, out_names, view)
        first = sl.sources[0]
        out_layers += [(configs[first.input] or {}, first.layers[0] + j) for j in range(n)]
        step = slice_step_name(i)
        layout = recipe.output.copy_files_from
        sub_recipe = recipe.model_copy(
            update={
                "inputs": {view_of[s.input]: recipe.inputs[s.input] for s in sl.sources},
                "slices": None,
                "output": recipe.output.model_copy(
                    update={"copy_files_from": view_of.get(layout or "")}
                ),
            }
        )
        sub = Program(
            sub_recipe,
            {step: _renamed(program.steps[step], view_of)},
            step,
            program.base_dir,
        )
        sub_plan = build_plan(
            sub,
            local,
            dtype=dtype,
            passthrough_from=view_of.get(passthrough_from or ""),
        )
        to_out = _local_to_output(local[view_of[first.input]], shown[view_of[first.input]])
        for job in sub_plan.jobs:
            jobs.append(replace(job, name=to_out.get(job.name, job.name)))
        notes += sub_plan.notes
        all_sources.update(shown)
        offset += n

    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise PlanError(f"slices produce `{dup[0]}` twice; report this as a bug")
    layout = recipe.output.copy_files_from or (
        "base" if "base" in used else slices[0].sources[0].input
    )
    if layout not in sources:
        layout = slices[0].sources[0].input
    arch = archs.get(layout) or archs[slices[0].sources[0].input]
    config = configs.get(layout)
    new_config = sliced_config(config, arch, out_layers) if config is not None else None
    layout_name = f"{layout}[layout]"
    all_sources[layout_name] = SlicedLayout(sources[layout], new_config)
    return Plan(program, all_sources, jobs, layout_name, notes)


def _local_to_output(local: TensorSource, shown: TensorSource) -> dict[str, str]:
    """{slice-numbered name: output-numbered name} of one source's two views (same keys)."""
    assert isinstance(local, LayerView) and isinstance(shown, LayerView)
    by_key = {key: name for name, key in shown.names.items()}
    return {name: by_key[key] for name, key in local.names.items()}
