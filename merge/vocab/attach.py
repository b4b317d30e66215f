"""A recipe's `tokenizer:` section, attached to a merge in two places.

Before planning, `attach_vocab` builds the output vocabulary from the inputs' tokenizers
(`merge.vocab.build`) and replaces each merged checkpoint's source with a `VocabView`, so the
planner and the engine see embedding and lm_head tensors with the output's rows, filled by
mergekit's rules (`merge.vocab.fill`), and merge them like any other tensor. After planning,
`finish_plan` wraps the layout input so the output gets the tokenizer's files (with the chat
template) and config.json the new vocab size, and applies `embed_slerp`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge.errors import MergeWarning, PlanError, UsageError
from merge.io.sources import TensorSource
from merge.vocab.build import OutputVocab, build_vocab, load_tokenizer
from merge.vocab.chat import resolve_template
from merge.vocab.fill import RowPlan, padded_size, plan_rows
from merge.vocab.spec import UNION, TokenizerSpec
from merge.vocab.tensors import INPUT_NAMES, VocabTensors, find_vocab_tensors, tied_aliases
from merge.vocab.view import TokenizerLayout, VocabTable, VocabView

if TYPE_CHECKING:
    from merge.expr import Affine
    from merge.plan import Plan
    from merge.recipe import Program


@dataclass
class VocabSetup:
    """What `attach_vocab` decided, for `finish_plan`."""

    spec: TokenizerSpec
    vocab: OutputVocab | None  # None: only a chat template, the layout's tokenizer kept
    tensors: frozenset[str]  # token-indexed tensor names, as the views show them
    size: int | None  # output rows (padding included), None when the vocabulary is kept
    roots: dict[str, Path | None]  # the inputs' folders, in input order (chat template `auto`)


def _root(src: TensorSource | None, path: str) -> Path | None:
    root = src.root() if src is not None else Path(path)
    return root if root is not None and root.is_dir() else None


def _source_root(spec: TokenizerSpec, program: Program) -> Path | None:
    """The folder of a `tokenizer.source` that is a path (a `model:` prefix is mergekit's)."""
    if spec.source in (None, UNION) or spec.source in program.recipe.inputs:
        return None
    raw = str(spec.source).removeprefix("model:")
    path = Path(raw).expanduser()
    if not path.is_absolute() and (program.base_dir / path).exists():
        path = program.base_dir / path
    if path.exists():
        return path
    from merge.io.detect import resolve_hub_id

    return resolve_hub_id(raw)


def attach_vocab(program: Program, sources: dict[str, TensorSource]) -> VocabSetup | None:
    """Build the output vocabulary and wrap the merged checkpoints of `sources` (in place) in
    views showing it; None when the recipe has no `tokenizer:` section."""
    spec = program.recipe.tokenizer
    if spec is None:
        return None
    inputs = list(program.recipe.inputs)
    roots = {n: _root(sources.get(n), program.input_path(n)) for n in inputs}
    if spec.source is None:
        return VocabSetup(spec, None, frozenset(), None, roots)
    checkpoints = [n for n in inputs if n in sources and sources[n].kind == "checkpoint"]
    used = set(program.used_inputs())
    merged = [n for n in checkpoints if n in used or n == spec.base]
    if spec.base is not None and spec.base not in checkpoints:
        raise UsageError(
            f"tokenizer.base: input `{spec.base}` is not a checkpoint (a LoRA or other delta "
            "has no embeddings of its own); name a full model"
        )
    if spec.base is not None:  # the base leads the union
        merged = [spec.base, *[n for n in merged if n != spec.base]]
    if not merged:
        raise UsageError("tokenizer: the merge reads no full checkpoint whose vocabulary to align")
    found: dict[str, VocabTensors] = {}
    for n in merged:
        src = sources[n]
        vt = find_vocab_tensors({k: src.meta(k).shape for k in src.keys()})
        if vt is None:
            raise UsageError(
                f"tokenizer: input `{n}` ({src.path}) has no token embedding tensor (a 2-D tensor "
                f"named *{', *'.join(INPUT_NAMES)}), so its rows cannot be aligned to the output "
                "vocabulary; remove `tokenizer.source` or merge models with embeddings"
            )
        found[n] = vt
    _refuse_deltas(sources, [n for n in inputs if n in sources and n not in checkpoints], found)
    names: dict[str, dict[str, str]] = {}
    for n, vt in found.items():
        others = [found[m] for m in merged if m != n]
        names[n] = {**{x: x for x in vt.names}, **tied_aliases(vt, others)}
    _check_row_shapes(sources, names)
    rows = {n: vt.rows for n, vt in found.items()}
    vocab = build_vocab(
        str(spec.source),
        order=merged,
        base=merged[0],
        roots=roots,
        rows=rows,
        source_root=_source_root(spec, program),
        extra_tokens=list(spec.tokens),
    )
    size = padded_size(vocab.size, spec.pad_to_multiple_of)
    group_of = _groups(program, merged)

    def plans(group: Sequence[str]) -> dict[str, RowPlan]:
        return plan_rows(
            vocab.ids,
            vocab.inputs,
            list(group),
            base=spec.base,
            tokens=spec.tokens,
            originals=vocab.originals,
            rows=rows,
            size=size,
        )

    table = VocabTable({n: sources[n] for n in merged}, names, plans, group_of, size)
    # Every per-token problem (a source naming a model without the token...) is found now,
    # before any tensor is read.
    table.plan_groups(sorted({group_of(x) for ns in names.values() for x in ns}))
    for n in merged:
        sources[n] = VocabView(n, table)
    tensors = frozenset(x for ns in names.values() for x in ns)
    return VocabSetup(spec, vocab, tensors, size, roots)


def _groups(program: Program, merged: list[str]) -> Callable[[str], tuple[str, ...]]:
    """The models merged into each token-indexed tensor: all of them, or for layer slices the
    first slice's sources for the input embeddings and the last's for the rest (mergekit's)."""
    slices = program.recipe.slices
    if not slices:
        everyone = tuple(merged)
        return lambda name: everyone
    from merge.arch import Arch

    first = tuple(s.input for s in slices[0].sources)
    last = tuple(s.input for s in slices[-1].sources)
    return lambda name: first if Arch.is_pre(name) else last


def _refuse_deltas(
    sources: Mapping[str, TensorSource], deltas: list[str], found: Mapping[str, Any]
) -> None:
    token_indexed = {x for vt in found.values() for x in vt.names}
    for d in deltas:
        hit = sorted(token_indexed & sources[d].key_set())
        if hit:
            raise UsageError(
                f"tokenizer: input `{d}` is a delta (a LoRA or task vector) that changes "
                f"`{hit[0]}`, whose rows follow its base's vocabulary; apply it to its base first "
                "(`merge lora bake`), then merge the result"
            )


def _check_row_shapes(
    sources: Mapping[str, TensorSource], names: Mapping[str, Mapping[str, str]]
) -> None:
    """Every model's rows of one token-indexed tensor must have one shape (hidden size)."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for n, ns in names.items():
        for shown, real in ns.items():
            shapes.setdefault(shown, {})[n] = sources[n].meta(real).shape[1:]
    problems = [
        f"`{x}`: rows of different shapes ("
        + ", ".join(f"{n} {list(s)}" for n, s in by.items())
        + ")"
        for x, by in shapes.items()
        if len(set(by.values())) > 1
    ]
    if problems:
        raise PlanError(
            "cannot align vocabularies: the token-indexed tensors differ past the vocabulary "
            "axis (different hidden sizes?):\n  " + "\n  ".join(problems)
        )


def finish_plan(setup: VocabSetup, plan: Plan) -> Plan:
    """Give the output the tokenizer (with its chat template) and, when the vocabulary changed,
    config.json's new vocab size; lerp embedding rows of slerp calls if `embed_slerp: false`."""
    spec = setup.spec
    layout = plan.sources[plan.layout_input]
    if setup.vocab is not None:
        tokenizer = setup.vocab.tokenizer
    else:
        root = layout.root()
        if root is None or not root.is_dir():
            raise UsageError(
                f"tokenizer.chat_template: the output's layout input ({layout.path}) is not a "
                "model folder, so it has no tokenizer to hold the template"
            )
        tokenizer = load_tokenizer(root, f"tokenizer.chat_template (layout input {layout.path})")
    if spec.chat_template is not None:
        _set_template(tokenizer, spec.chat_template, setup.roots)
    plan.sources[plan.layout_input] = TokenizerLayout(layout, tokenizer, setup.size)
    if spec.embed_slerp is not None:
        _apply_embed_slerp(plan, setup.tensors, spec.embed_slerp)
    return plan


def _set_template(tokenizer: Any, value: str, roots: Mapping[str, Path | None]) -> None:
    found: list[str | dict[str, str] | None] = []
    if value == "auto":
        for name, root in roots.items():
            if root is None:
                continue
            try:
                found.append(load_tokenizer(root, f"input `{name}`").chat_template)
            except UsageError:
                continue  # no tokenizer: no template to count (mergekit skips it too)
    text = resolve_template(value, found)
    if text is None:
        warnings.warn(
            "tokenizer.chat_template: `auto` found no chat template among the inputs; the "
            "output keeps its tokenizer's own (if any)",
            MergeWarning,
            stacklevel=3,
        )
        return
    tokenizer.chat_template = text


def _apply_embed_slerp(plan: Plan, tensors: frozenset[str], embed_slerp: bool) -> None:
    """mergekit 0.0.4's `embed_slerp`: embeddings of a slerp merge are slerped (true) or lerped
    with the same t (false, its default then); mergekit 0.1.5 ignores the flag and slerps."""
    from merge.execute import form_calls

    jobs = [j for j in plan.jobs if j.name in tensors]
    if not any(c.method == "slerp" for j in jobs for c in form_calls(j.form)):
        methods = sorted({c.method for j in jobs for c in form_calls(j.form)}) or ["a copy"]
        raise UsageError(
            "tokenizer.embed_slerp: only a slerp merge's embeddings can be slerped or lerped; "
            f"this merge's token-indexed tensors are made by {', '.join(methods)}; remove it"
        )
    if embed_slerp:
        return  # what slerp does anyway
    for i, job in enumerate(plan.jobs):
        if job.name not in tensors:
            continue
        form = _lerped(job.form, {})
        if all(isinstance(x, str) for x, _ in form.terms):
            mode = "copy" if form.single_input() is not None else "affine"
            reads = tuple(x for x in job.inputs if x in form.inputs())
            plan.jobs[i] = replace(job, form=form, mode=mode, inputs=reads)


def _lerped(form: Affine, memo: dict[int, Affine]) -> Affine:
    """`form` with every slerp call replaced by (1 - t)·v0 + t·v1 (v0 the base, as slerp's)."""
    from merge.expr import Affine
    from merge.plan import ResolvedCall

    out = Affine()
    for leaf, c in form.terms:
        if not isinstance(leaf, ResolvedCall):
            out = out.plus(Affine(((leaf, c),)))
            continue
        got = memo.get(id(leaf))
        if got is None:
            models = tuple(_lerped(m, memo) for m in leaf.models)
            base = _lerped(leaf.base, memo) if leaf.base is not None else None
            if leaf.method == "slerp":
                t = float(dict(leaf.params)["t"])
                v0, v1 = (base, models[0]) if base is not None else models
                got = v0.scaled(1.0 - t).plus(v1.scaled(t))
            else:
                got = Affine.leaf(replace(leaf, models=models, base=base))  # type: ignore[arg-type]
            memo[id(leaf)] = got
        out = out.plus(got.scaled(c))
    return Affine(tuple((x, c) for x, c in out.terms if c != 0.0))


__all__ = ["VocabSetup", "attach_vocab", "finish_plan"]
