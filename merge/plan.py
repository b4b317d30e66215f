"""Recipe + input headers -> one job per output tensor. Reads no tensor data.

Key sets are reconciled, shapes checked and dtypes decided from headers alone, and every
mismatch is reported at once. Per-tensor parameters (overrides, layer gradients) are resolved
here, and the weighted-sum methods are folded into affine forms so the engine can stream them
chunk by chunk into reused buffers.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge.dtypes import mixed_dtype_note
from merge.errors import MergeWarning, PlanError, UsageError
from merge.expr import Affine, Call
from merge.io.detect import open_checkpoint
from merge.io.sources import TensorSource
from merge.keysets import output_key_problems, strict_hint
from merge.methods import get_method
from merge.recipe import Program, all_calls, unmatched_overrides

DTYPE_NAMES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
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
class Job:
    """One output tensor: what to read, how to combine it, and how to store it."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    mode: str  # "copy" (bytes as they are), "affine" (chunked Σ c·x), "graph" (method calls)
    form: Affine  # resolved: leaves are input names or ResolvedCall objects
    inputs: tuple[str, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize


@dataclass
class Plan:
    program: Program
    sources: dict[str, TensorSource]
    jobs: list[Job]
    layout_input: str  # whose folder layout and support files the output follows
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


def open_inputs(
    program: Program,
    *,
    unsafe_pickle: bool = False,
    preopened: Mapping[str, TensorSource] | None = None,
) -> dict[str, TensorSource]:
    """Open every input the output uses: checkpoints first, then deltas (LoRAs) against the base."""
    from merge.io import lora_hook

    sources: dict[str, TensorSource] = dict(preopened or {})
    used = program.used_inputs()
    layout = program.recipe.output.copy_files_from
    if layout and layout not in used:
        used.append(layout)
    if program.recipe.tokenizer is not None:  # the base and tokens' sources give rows too
        used += [n for n in program.recipe.tokenizer.input_names() if n not in used]
    missing: list[str] = []
    deferred: list[str] = []
    for name in used:
        if name in sources:
            continue
        path = program.input_path(name)
        if lora_hook.looks_like_lora(path):
            deferred.append(name)
            continue
        if not Path(path).exists() and "/" not in path:
            missing.append(f"inputs.{name}: {path} does not exist")
            continue
        sources[name] = open_checkpoint(path, unsafe_pickle=unsafe_pickle)
    if missing:
        raise UsageError("missing inputs:\n  " + "\n  ".join(missing))
    base = sources.get("base") or next(
        (s for s in sources.values() if s.kind == "checkpoint"), None
    )
    for name in deferred:
        sources[name] = lora_hook.open_lora(program.input_path(name), base)
    options = program.recipe.options
    if options.compat == "mergekit" and options.compute_dtype:  # mergekit casts inputs first
        from merge.io.views import CastView

        for name in sources:
            if sources[name].kind == "checkpoint" and name not in (preopened or {}):
                sources[name] = CastView(sources[name], DTYPE_NAMES[options.compute_dtype])
    return sources


def layer_index(name: str) -> int | None:
    m = LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def gradient_value(anchors: Sequence[float], t: float) -> float:
    """mergekit's rule: anchors spread evenly over [0, 1], linear between neighbours."""
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
    """Check headers and produce one Job per output tensor, in sequential-read order."""
    if program.recipe.slices:  # layer slices: one plan per slice over renaming views
        from merge.slices import build_sliced_plan

        return build_sliced_plan(program, sources, dtype=dtype, passthrough_from=passthrough_from)
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
    dtype_name = dtype or recipe.output.dtype
    out_dtype_forced = DTYPE_NAMES[dtype_name] if dtype_name else None
    dtype_note = mixed_dtype_note(sources, checkpoints, out_dtype_forced)
    if dtype_note:
        notes.append(dtype_note)
        warnings.warn(dtype_note, MergeWarning, stacklevel=2)
    passthrough_from = passthrough_from or (
        "base" if "base" in checkpoints else (checkpoints[0] if checkpoints else None)
    )
    # DoRA adapters are not deltas: `base + k * dora` means peft's scale k applied inside the norm.
    nonlinear = {n for n in deltas if getattr(sources[n], "nonlinear", False)}
    dora_base = "base" if "base" in checkpoints else (checkpoints[0] if checkpoints else "")
    for call in all_calls(out_form):
        inside = nonlinear & set().union(
            *(m.inputs() for m in call.models), call.base.inputs() if call.base else set()
        )
        for n in sorted(inside):
            problems.append(
                f"`{n}` is a DoRA adapter, which is not a delta: it can only be added to the base it "
                f"was trained on, as `{dora_base} + k * {n}`, not passed to `{call.method}` in step `{call.step}`"
            )
    jobs: list[Job] = []
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
            jobs.append(Job(name, ref.shape, ref.dtype, "copy", Affine.leaf(src), (src,)))
            continue
        missing_ckpts = [n for n in checkpoints if n not in have]
        if missing_ckpts:
            # union mode: a tensor some checkpoints lack passes through from the first that has it.
            src = first_ckpt or have[0]
            jobs.append(
                Job(
                    name, ref.shape, out_dtype_forced or ref.dtype, "copy", Affine.leaf(src), (src,)
                )
            )
            continue
        t = (
            (layer_index(name) or 0) / max(num_layers - 1, 1)
            if layer_index(name) is not None
            else 0.0
        )
        try:
            form = resolve_form(out_form, name, t, program, set(have), memo={})
        except (ValueError, UsageError) as e:
            # One line per distinct problem, not one per tensor (a zero weight sum hits all).
            resolve_errors.setdefault(str(e), []).append(name)
            continue
        if nonlinear:
            form = _scale_nonlinear(form, name, sources, nonlinear, dora_base, problems)
        form_inputs = tuple(sorted(form_inputs_of(form), key=lambda n: used.index(n.split("@")[0])))
        single = form.single_input()
        out_dt = out_dtype_forced or ref.dtype
        if single is not None:
            mode_ = "copy"
        elif all(isinstance(x, str) for x, _ in form.terms):
            mode_ = "affine"
        else:
            mode_ = "graph"
        jobs.append(Job(name, ref.shape, out_dt, mode_, form, form_inputs))
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
    def order(j: Job) -> tuple[str, int]:
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


def _scale_nonlinear(
    form: Affine,
    tensor: str,
    sources: dict[str, TensorSource],
    nonlinear: set[str],
    base: str,
    problems: list[str],
) -> Affine:
    """Rewrite `k * dora` as `1 * dora.with_scale(k)`; refuse it without its base beside it."""
    terms: list[tuple[object, float]] = []
    present = {x for x, _ in form.terms if isinstance(x, str)}
    for leaf, c in form.terms:
        if isinstance(leaf, str) and leaf in nonlinear:
            if base not in present:
                problems.append(
                    f"`{tensor}`: DoRA adapter `{leaf}` must be added to `{base}`, the base it was "
                    f"opened against (write `{base} + {c:g} * {leaf}`)"
                )
            # The strength is absolute: the adapter's own scale (e.g. from `bake --scale`) times k.
            strength = c * float(getattr(sources[leaf], "scale", 1.0))
            key = f"{leaf}@{strength:g}"
            if key not in sources:
                sources[key] = sources[leaf].with_scale(strength)  # type: ignore[attr-defined]
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


def describe_plan(plan: Plan, limit: int = 12) -> str:
    """A human-readable summary: inputs, steps as affine forms, jobs by mode, bytes, memory."""
    from merge.execute import estimate_peak_bytes

    lines = ["inputs:"]
    for n, s in plan.sources.items():
        lines.append(f"  {n}: {s.path} ({s.kind}, {len(s.keys())} tensors)")
    lines.append("steps:")
    for name, form in plan.program.steps.items():
        lines.append(f"  {name} = {format_form(form, name)}")
    by_mode: dict[str, int] = {}
    for j in plan.jobs:
        by_mode[j.mode] = by_mode.get(j.mode, 0) + 1
    lines.append(
        f"output: {len(plan.jobs)} tensors ("
        + ", ".join(f"{v} {k}" for k, v in sorted(by_mode.items()))
        + ")"
    )
    for j in plan.jobs[:limit]:
        lines.append(
            f"  {j.name} {list(j.shape)} {str(j.out_dtype).replace('torch.', '')} [{j.mode}] = {format_form(j.form, plan.program.output_step)}"
        )
    if len(plan.jobs) > limit:
        lines.append(f"  ... {len(plan.jobs) - limit} more")
    lines.append(
        f"read {plan.bytes_read / 1e9:.3f} GB, write {plan.bytes_written / 1e9:.3f} GB, estimated peak memory {estimate_peak_bytes(plan) / 2**20:.0f} MiB"
    )
    lines += [f"warning: {n}" for n in plan.notes]
    return "\n".join(lines)


def format_form(form: Affine, step: str | None = None) -> str:
    """A form as text; a call made in another step than `step` is shown by that step's name
    (so a chain of steps prints in size linear in the recipe, not the size of its tree)."""
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
