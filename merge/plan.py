"""Recipe + input headers -> one job per output tensor. Reads no tensor data.

Key sets are reconciled, shapes checked and dtypes decided from headers alone, and every
mismatch is reported at once. Per-tensor parameters (overrides, layer gradients) are resolved
here, and the weighted-sum methods are folded into affine forms so the engine can stream them
chunk by chunk into reused buffers. The output's layout on disk (one file, a model or pipeline
folder, shard size, support files) is chosen here too (`output_layout`), from what the layout
input says it is; the writer follows it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge.dtypes import DTYPE_NAMES, Sized, dtype_name, mixed_dtype_note
from merge.errors import MergeWarning, PlanError, UsageError
from merge.expr import Affine, Call
from merge.io.layout import OutputLayout
from merge.io.sources import TensorSource
from merge.io.writer import DEFAULT_SHARD_SIZE, parse_size
from merge.keysets import output_key_problems, strict_hint
from merge.methods import get_method
from merge.recipe import Program, all_calls, unmatched_overrides

LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True, eq=False)  # hashed by identity: resolved forms are DAGs
class ResolvedCall:
    """A method call with every parameter resolved for one tensor."""

    method: str
    models: tuple[Affine, ...]
    base: Affine | None
    params: tuple[tuple[str, Any], ...]
    step: str


@dataclass(frozen=True)
class TensorJob(Sized):
    """One output tensor: what to read, how to combine it, and how to store it (`dtype`)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str  # "copy" (bytes as they are), "affine" (chunked Σ c·x), "graph" (method calls)
    form: Affine  # resolved: leaves are input names or ResolvedCall objects
    inputs: tuple[str, ...]


@dataclass
class Plan:
    program: Program
    sources: dict[str, TensorSource]
    jobs: list[TensorJob]
    layout_input: str  # whose folder layout and support files the output follows (output_layout)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_read(self) -> int:
        return sum(self.sources[i].meta(j.name).nbytes for j in self.jobs for i in j.inputs)

    @property
    def bytes_written(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    def close(self) -> None:
        for s in self.sources.values():
            s.close()


def float_dtypes(
    sources: Mapping[str, TensorSource], inputs: Sequence[str]
) -> dict[str, list[str]]:
    """{dtype name: inputs holding float tensors of it}, over the headers of `inputs`."""
    by_dtype: dict[str, list[str]] = {}
    for n in inputs:
        src = sources[n]
        seen = {src.meta(k).dtype for k in src.keys()}
        for dt in sorted((d for d in seen if d.is_floating_point), key=str):
            by_dtype.setdefault(dtype_name(dt), []).append(n)
    return by_dtype


def output_layout(
    plan: Plan, output: str | Path, *, shard_size: int | str | None = None
) -> OutputLayout:
    """How the output at `output` is laid out: one file for `x.safetensors`; else the layout
    input's shape (a pipeline folder for a pipeline, a Hugging Face folder otherwise) with its
    support files. `shard_size` (bytes or text like 5GB) overrides the recipe's."""
    size = parse_size(
        shard_size
        if shard_size is not None
        else plan.program.recipe.output.shard_size or DEFAULT_SHARD_SIZE
    )
    layout = plan.sources[plan.layout_input]
    if Path(output).suffix == ".safetensors":
        return OutputLayout(single_file=True, shard_size=size, source=layout.path)
    return OutputLayout(
        shard_size=size,
        components=layout.component_stems() or None,
        support_files=tuple(layout.support_files()),
        source=layout.path,
    )


def layer_index(name: str) -> int | None:
    m = LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def layer_position(layer: int | None, num_layers: int) -> float:
    """Where a tensor sits on a gradient, mergekit's way: layer i of n at i/(n − 1), the only
    layer of a one-layer model or slice at 1 (the last anchor), non-layer tensors at 0."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def gradient_value(anchors: Sequence[float], t: float) -> float:
    """mergekit's rule: anchors spread evenly over [0, 1], interpolated between neighbours."""
    n = len(anchors)
    if n == 1:
        return float(anchors[0])
    s = t * (n - 1)
    i0 = int(s)
    i1 = min(n - 1, i0 + 1)
    f = s - i0
    return (1 - f) * float(anchors[i0]) + f * float(anchors[i1])


def build_plan(
    program: Program,
    sources: dict[str, TensorSource],
    *,
    dtype: str | None = None,
    passthrough_from: str | None = None,
) -> Plan:
    """Check headers and produce one TensorJob per output tensor, in sequential-read order.

    A recipe with layer slices is planned by `merge.slices.build_sliced_plan`, one plan like
    this per slice."""
    recipe = program.recipe
    out_form = program.output
    used = program.used_inputs()
    checkpoints = [n for n in used if sources[n].kind == "checkpoint"]
    deltas = [n for n in used if sources[n].kind != "checkpoint"]
    problems: list[str] = []
    notes: list[str] = []
    if not checkpoints and not deltas:
        raise PlanError("the output uses no input")
    layout = recipe.output.copy_files_from or (
        "base" if "base" in checkpoints else (checkpoints or deltas)[0]
    )
    keys_by = {n: sources[n].key_set() for n in used}

    # Key reconciliation among checkpoints; deltas may cover any subset of them.
    mode = recipe.options.keys
    if checkpoints:
        first = keys_by[checkpoints[0]]
        all_keys = set().union(*(keys_by[n] for n in checkpoints))
        common = set(first).intersection(*(keys_by[n] for n in checkpoints))
        if mode == "strict":
            for n in checkpoints:
                extra = sorted(keys_by[n] - common)
                if extra:
                    problems.append(
                        f"`{n}` ({sources[n].path}) has {len(extra)} tensor(s) that other inputs lack: "
                        + ", ".join(extra[:6])
                        + (" ..." if len(extra) > 6 else "")
                    )
            if problems:
                problems.append(strict_hint(keys_by, checkpoints))
        names = [k for k in sources[checkpoints[0]].keys() if k in common]
        if mode == "union":
            names += sorted(all_keys - common)
        problems += output_key_problems(
            names,
            mode,
            layout,
            sources,
            checkpoints,
            mixed_architectures=recipe.options.mixed_architectures,
        )
    else:
        names = list(sources[deltas[0]].keys())
    for d in deltas:
        if checkpoints:
            stray = sorted(keys_by[d] - set(names))
            if stray:
                problems.append(
                    f"delta `{d}` ({sources[d].path}) targets {len(stray)} tensor(s) the checkpoints lack: {', '.join(stray[:6])}"
                )

    layers = [i for i in (layer_index(n) for n in names) if i is not None]
    num_layers = max(layers) + 1 if layers else 1
    asked = dtype or recipe.output.dtype
    out_dtype_forced = DTYPE_NAMES[asked] if asked else None
    dtype_note = (
        mixed_dtype_note(float_dtypes(sources, checkpoints), checkpoints[0], out_dtype_forced)
        if checkpoints
        else None
    )
    if dtype_note:
        notes.append(dtype_note)
        warnings.warn(dtype_note, MergeWarning, stacklevel=2)
    passthrough_from = passthrough_from or (
        "base" if "base" in checkpoints else (checkpoints[0] if checkpoints else None)
    )
    # Deltas whose effect at coefficient k is not k times their values (each says what it is)
    # only add to the base they were opened against: `base + k * x` reads x.at_strength(k).
    fixed = {n: what for n in deltas if (what := sources[n].not_additive)}
    fixed_base = "base" if "base" in checkpoints else (checkpoints[0] if checkpoints else "")
    position = {n: i for i, n in enumerate(used)}  # job inputs are read in recipe order
    for call in all_calls(out_form):
        inside = set(fixed) & set().union(
            *(m.inputs() for m in call.models), call.base.inputs() if call.base else set()
        )
        for n in sorted(inside):
            problems.append(
                f"`{n}` is {fixed[n]}, which is not a delta: it can only be added to the base it "
                f"was trained on, as `{fixed_base} + k * {n}`, not passed to `{call.method}` in step `{call.step}`"
            )
    jobs: list[TensorJob] = []
    resolve_errors: dict[str, list[str]] = {}
    for name in names:
        have = [n for n in used if name in keys_by[n]]
        metas = {n: sources[n].meta(name) for n in have}
        shapes = {n: m.shape for n, m in metas.items()}
        if len(set(shapes.values())) > 1:
            problems.append(
                f"`{name}` has different shapes: "
                + ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
            )
            continue
        first_ckpt = next((n for n in checkpoints if n in have), None)
        ref = metas[first_ckpt] if first_ckpt else metas[have[0]]
        if not ref.is_float:
            src = passthrough_from if passthrough_from in have else first_ckpt or have[0]
            jobs.append(TensorJob(name, ref.shape, ref.dtype, "copy", Affine.leaf(src), (src,)))
            continue
        missing_ckpts = [n for n in checkpoints if n not in have]
        if missing_ckpts:
            # union mode: a tensor some checkpoints lack passes through from the first that has it.
            src = first_ckpt or have[0]
            jobs.append(
                TensorJob(
                    name, ref.shape, out_dtype_forced or ref.dtype, "copy", Affine.leaf(src), (src,)
                )
            )
            continue
        t = layer_position(layer_index(name), num_layers)
        try:
            form = resolve_form(out_form, name, t, program, set(have), memo={})
        except (ValueError, UsageError) as e:
            # One line per distinct problem, not one per tensor (a zero weight sum hits all).
            resolve_errors.setdefault(str(e), []).append(name)
            continue
        if fixed:
            form = _at_strength(form, name, sources, fixed, fixed_base, problems, position)
        form_inputs = tuple(sorted(form_inputs_of(form), key=position.__getitem__))
        single = form.single_input()
        out_dt = out_dtype_forced or ref.dtype
        if single is not None:
            mode_ = "copy"
        elif all(isinstance(x, str) for x, _ in form.terms):
            mode_ = "affine"
        else:
            mode_ = "graph"
        jobs.append(TensorJob(name, ref.shape, out_dt, mode_, form, form_inputs))
    for msg, where in resolve_errors.items():
        problems.append(
            f"`{where[0]}`: {msg}"
            if len(where) == 1
            else f"{msg} (in {len(where)} tensors, e.g. `{where[0]}`)"
        )
    if problems:
        raise PlanError(
            f"cannot merge these inputs ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  "
            + "\n  ".join(problems)
        )

    # Sequential reads: follow the layout input's file and offset (so each output file, e.g. a
    # pipeline component, is written in one run), else the first input read.
    def order(j: TensorJob) -> tuple[str, int]:
        if not j.inputs:
            return ("", 0)
        lead = layout if layout in j.inputs else j.inputs[0]
        m = sources[lead].meta(j.name)
        return (m.file, m.offset)

    jobs.sort(key=order)
    _check_coefficients(program, sources, notes)
    for msg in unmatched_overrides(recipe, names):
        notes.append(msg)
        warnings.warn(msg, MergeWarning, stacklevel=2)
    return Plan(program, sources, jobs, layout, notes)


def _at_strength(
    form: Affine,
    tensor: str,
    sources: dict[str, TensorSource],
    fixed: Mapping[str, str],
    base: str,
    problems: list[str],
    position: dict[str, int],
) -> Affine:
    """Rewrite `k * x` as `1 * x@k`, where source `x@k` is `x.at_strength(k)`, for each source
    in `fixed` (what it is, by name); refuse it without its base beside it."""
    terms: list[tuple[object, float]] = []
    present = {x for x, _ in form.terms if isinstance(x, str)}
    for leaf, c in form.terms:
        if isinstance(leaf, str) and leaf in fixed:
            if base not in present:
                problems.append(
                    f"`{tensor}`: {fixed[leaf]} `{leaf}` must be added to `{base}`, the base it was "
                    f"opened against (write `{base} + {c:g} * {leaf}`)"
                )
            key = f"{leaf}@{c:g}"
            if key not in sources:
                sources[key] = sources[leaf].at_strength(c)
                position[key] = position[leaf]
            terms.append((key, 1.0))
        else:
            terms.append((leaf, c))
    return Affine(tuple(terms))  # type: ignore[arg-type]


def form_inputs_of(form: Affine, _seen: dict[int, set[str]] | None = None) -> set[str]:
    """The input names a resolved form reads (each shared call visited once)."""
    seen = {} if _seen is None else _seen
    out: set[str] = set()
    for x, _ in form.terms:
        if isinstance(x, str):
            out.add(x)
        elif isinstance(x, ResolvedCall):
            got = seen.get(id(x))
            if got is None:
                got = set()
                for m in (*x.models, *([x.base] if x.base else [])):
                    got |= form_inputs_of(m, seen)
                seen[id(x)] = got
            out |= got
    return out


def _param(value: Any, t: float) -> Any:
    return gradient_value(value, t) if isinstance(value, tuple) else value


def resolve_form(
    form: Affine,
    tensor: str,
    t: float,
    program: Program,
    present: set[str],
    memo: dict[int, Affine] | None = None,
) -> Affine:
    """The form for one tensor: overrides and gradients applied, weighted sums folded in.

    Delta inputs that do not cover this tensor contribute zero and are dropped. `memo` maps a
    call (by identity) to its resolved form, so a step used by several later steps is resolved
    once per tensor and the result is a DAG, not a tree that doubles with every such step.
    """
    memo = {} if memo is None else memo
    out = Affine()
    for leaf, c in form.terms:
        if isinstance(leaf, str):
            if leaf in present:
                out = out.plus(Affine(((leaf, c),)))
            continue
        assert isinstance(leaf, Call)
        got = memo.get(id(leaf))
        if got is None:
            got = memo[id(leaf)] = _resolve_call(leaf, tensor, t, program, present, memo)
        out = out.plus(got.scaled(c))
    return Affine(tuple((x, c) for x, c in out.terms if c != 0.0))


def _resolve_call(
    call: Call, tensor: str, t: float, program: Program, present: set[str], memo: dict[int, Affine]
) -> Affine:
    spec = get_method(call.method)
    params = dict(call.params)
    model_params = [dict(mp) for mp in call.model_params]
    for i in range(len(model_params)):
        for k, d in spec.per_model.items():
            model_params[i].setdefault(k, d)
    for ov in program.recipe.overrides:
        if (ov.step is not None and ov.step != call.step) or not ov.matches(tensor):
            continue
        for k, v in ov.params().items():
            v = tuple(v) if isinstance(v, list) else v
            if k in spec.per_model:
                for i, name in enumerate(call.model_names):
                    if ov.input is None or ov.input == name:
                        model_params[i][k] = v
            elif k in spec.global_params:
                params[k] = v
    params = {k: _param(v, t) for k, v in params.items()}
    per_model = {k: [_param(mp[k], t) for mp in model_params] for k in spec.per_model}
    if "compat" in spec.global_params and "compat" not in params:
        params["compat"] = program.recipe.options.compat
    if "compute_dtype" in spec.global_params and "compute_dtype" not in params:
        params["compute_dtype"] = program.recipe.options.compute_dtype
    models = tuple(resolve_form(m, tensor, t, program, present, memo) for m in call.models)
    base = (
        resolve_form(call.base, tensor, t, program, present, memo)
        if call.base is not None
        else None
    )
    if spec.affine is not None and (base is not None or not spec.needs_base):
        # A weighted sum (the registration says how): folded, so the engine streams it.
        coefs, base_coef = spec.affine(per_model, params)
        acc = Affine()
        if base is not None and base_coef != 0.0:
            acc = base.scaled(base_coef)
        for m, wi in zip(models, coefs):
            acc = acc.plus(m.scaled(wi))
        return acc
    all_params = tuple(sorted({**params, **{k: tuple(v) for k, v in per_model.items()}}.items()))
    return Affine.leaf(ResolvedCall(call.method, models, base, all_params, call.step))  # type: ignore[arg-type]


def checkpoint_weight(
    form: Affine, kinds: Mapping[str, str], _seen: dict[int, float] | None = None
) -> float:
    """Σ of the checkpoints' coefficients in a form (deltas count 0; a call counts as its inputs')."""
    seen = {} if _seen is None else _seen
    total = 0.0
    for leaf, c in form.terms:
        if isinstance(leaf, str):
            total += c if kinds.get(leaf) == "checkpoint" else 0.0
        else:
            got = seen.get(id(leaf))
            if got is None:
                inner = [checkpoint_weight(m, kinds, seen) for m in leaf.models]
                got = 1.0 if any(abs(w) > 1e-9 for w in inner) or leaf.base is not None else 0.0
                seen[id(leaf)] = got
            total += c * got
    return total


def _check_coefficients(
    program: Program, sources: Mapping[str, TensorSource], notes: list[str]
) -> None:
    kinds = {n: s.kind for n, s in sources.items()}
    for step, form in program.steps.items():
        if not form.inputs() <= set(kinds):
            continue
        w = checkpoint_weight(form, kinds)
        if abs(w - 1.0) > 1e-6 and abs(w) > 1e-6:
            msg = (
                f"step `{step}`: the checkpoints' coefficients sum to {w:g}, not 1, so its result is "
                "scaled away from the models (did you mean a task vector such as `a - base`?)"
            )
            notes.append(msg)
            warnings.warn(msg, MergeWarning, stacklevel=3)


def format_form(form: Affine, step: str | None = None) -> str:
    """A form as text; a call made in another step than `step` is shown by that step's name
    (so a chain of steps prints in size proportional to the recipe, not the size of its tree)."""
    parts = []
    for leaf, c in form.terms:
        if isinstance(leaf, str):
            what = leaf
        elif step is not None and leaf.step != step:
            what = leaf.step
        else:
            inner = step if step is not None else leaf.step
            args = [format_form(m, inner) for m in leaf.models]
            if leaf.base:
                args.append("base=" + format_form(leaf.base, inner))
            if not isinstance(leaf, Call):
                args += [f"{k}={v}" for k, v in leaf.params]
            what = f"{leaf.method}({', '.join(args)})"
        parts.append(what if c == 1.0 else f"{c:g}*{what}")
    return " + ".join(parts).replace("+ -", "- ") or "0"
