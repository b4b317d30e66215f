"""Translate a mergekit YAML config into a merge recipe (implies `options.compat: mergekit`).

    recipe, problems = translate(yaml.safe_load(open("config.yml")))

`problems` names every key that cannot be translated (empty when the translation is faithful).
What maps and how (mergekit's semantics, see docs/methods.md):

- `models[*].model` and `base_model` become `inputs` (the base is named `base`, the others after
  the last component of their path); `merge_method` becomes one step `merged`.
- parameters a method does not take (mergekit ignores them, e.g. `weight` given to `slerp`)
  are dropped with one MergeWarning per name; our own recipes refuse them.
- parameters: scalars and gradient lists pass through (our gradients follow mergekit's rule);
  `lambda` becomes `scale`, `nuslerp_flatten`/`nuslerp_row_wise` become `flatten`/`row_wise`,
  `int8_mask` is dropped (it only changes the dtype of mergekit's sign mask).
- filters (`[{filter, value}, ...]`, first substring match wins, then the next level:
  model → slice → top level) become `overrides` with `regex:` on the escaped substring,
  emitted in reverse order because in a recipe the last matching override wins.
- `dtype`/`out_dtype` become `output.dtype`; `dtype` is also `options.compute_dtype`: the
  trimming methods (ties, breadcrumbs) round task vectors to it as mergekit computes in it;
  the rest of the math stays float32, so outputs agree within that dtype's rounding;
  `tokenizer_source: base` (or a model) becomes `output.copy_files_from`.
- `slices` become the recipe's `slices` (merge/slices.py): each source's `layer_range` its
  `layers`, a slice's `base_model` (else the top-level one) its `base`, which must be one of
  its sources; slice-level parameters sit between the model's and the top level's, and
  filters become overrides on step `slice<i>`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merge.dtypes import DTYPE_NAMES, dtype_name
from merge.errors import MergeWarning, did_you_mean
from merge.mergekit_schema import MERGE_METHODS as _METHODS
from merge.mergekit_schema import refusal, top_level_keys

_RENAME = {"lambda": "scale", "nuslerp_flatten": "flatten", "nuslerp_row_wise": "row_wise"}
_DROP = {"int8_mask"}  # no effect on the values
_DTYPES = frozenset(DTYPE_NAMES)
_TOP_KEYS = top_level_keys()
STEP = "merged"


def is_mergekit_config(d: Mapping[str, Any]) -> bool:
    """A mergekit config names `merge_method` and has none of a recipe's `steps`/`inputs`."""
    return isinstance(d, Mapping) and "merge_method" in d and "steps" not in d and "inputs" not in d


_REF_KEYS = {"model", "lora", "override_architecture"}  # a ModelReference written out


def _model_path(ref: Any, where: str, problems: list[str]) -> str | None:
    """A model reference (`path`, `{model: path}` or `{model: {path}}`) as a path, or None
    with the refusal of what it carries that is not translated (LoRA, revision, ...)."""
    if isinstance(ref, Mapping):
        for key in ref:
            if key not in _REF_KEYS:
                problems.append(refusal("any other key", f"{where}.{key}"))
        if ref.get("lora"):
            problems.append(refusal("lora", f"{where}.lora"))
            return None
        if ref.get("override_architecture"):
            problems.append(refusal("override_architecture", f"{where}.override_architecture"))
            return None
        inner = ref.get("model")
        if isinstance(inner, Mapping):
            for key in inner:
                if key not in ("path", "revision"):
                    problems.append(refusal("any other key", f"{where}.model.{key}"))
            if inner.get("revision"):
                problems.append(refusal("revision", f"{where}.model.revision"))
                return None
            inner = inner.get("path")
        ref = inner
    if not isinstance(ref, str) or not ref:
        problems.append(f"`{where}`: expected a model path, got {ref!r}")
        return None
    if "+" in ref:
        problems.append(refusal("lora", where, ref))
        return None
    if "@" in ref:  # mergekit splits `path@revision` wherever the `@` is
        problems.append(refusal("revision", where, ref))
        return None
    return ref


_SLICE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}


def _known_keys(entry: Any, where: str, known: set[str], problems: list[str]) -> None:
    """Name each key of a list entry that mergekit's schema does not have there (mergekit drops
    them silently, so `models[0].weight` would do nothing)."""
    if isinstance(entry, Mapping):
        for key in entry:
            if key not in known:
                hint = did_you_mean(str(key), known)
                if not hint and "parameters" in known:
                    hint = f" (a parameter? put it under `{where}.parameters`)"
                problems.append(refusal("any other key", f"{where}.{key}") + hint)


def _stored_dtype(paths: list[str], base_dir: Path | None) -> str | None:
    """The one floating dtype every input stores (mergekit without `dtype` merges in what it
    loads), or None: mixed dtypes, or an input not on disk here (the plan reports it)."""
    from merge.errors import MergeError
    from merge.io.detect import open_checkpoint

    found: set[str] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path  # as `Program.input_path` resolves it
        if not path.exists():
            return None
        try:
            source = open_checkpoint(str(path))
        except (MergeError, OSError, ValueError):
            return None
        try:
            for key in source.keys():
                meta = source.meta(key)
                if meta.is_float:
                    found.add(dtype_name(meta.dtype))
        finally:
            source.close()
    return found.pop() if len(found) == 1 and found <= _DTYPES else None


def _input_name(path: str, taken: set[str]) -> str:
    stem = (
        re.sub(r"[^0-9a-zA-Z_]+", "_", path.rstrip("/").rsplit("/", 1)[-1]).strip("_").lower()
        or "model"
    )
    if stem[0].isdigit():
        stem = f"m_{stem}"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


def _entries(value: Any, where: str, problems: list[str]) -> list[tuple[str | None, Any]] | None:
    """A parameter setting as [(filter or None, value)], or None when it cannot be translated."""
    if isinstance(value, Mapping):  # one {filter, value}, as mergekit also accepts
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        out: list[tuple[str | None, Any]] = []
        for i, cond in enumerate(value):
            f = cond.get("filter")
            v = _value(cond.get("value"), f"{where}[{i}].value", problems)
            if v is None:
                return None
            out.append((None if f in (None, "*") else str(f), v))
        return out
    v = _value(value, where, problems)
    return None if v is None else [(None, v)]


def _value(v: Any, where: str, problems: list[str]) -> Any:
    if isinstance(v, bool | int | float | str):
        return v
    if (
        isinstance(v, list)
        and v
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
    ):
        return [float(x) for x in v]
    if isinstance(v, list) and v and all(isinstance(x, bool | str) for x in v):
        problems.append(refusal('<param>: [true, ...] / ["a", ...]', where, v))
        return None
    problems.append(
        f"{where}: value {v!r} cannot be translated (only numbers, booleans, strings and lists of numbers)"
    )
    return None


def _resolve(levels: list[list[tuple[str | None, Any]]]) -> tuple[Any, list[tuple[str, Any]]]:
    """First-match-wins across levels -> (fallback value or None, [(filter, value)] in priority order)."""
    filtered: list[tuple[str, Any]] = []
    for entries in levels:
        for f, v in entries:
            if f is None:
                return v, filtered
            filtered.append((f, v))
    return None, filtered


def translate(
    d: Mapping[str, Any], *, base_dir: Path | None = None
) -> tuple[dict[str, Any], list[str]]:
    """mergekit config -> (recipe dict, messages naming every key that cannot be translated).

    `base_dir` (the config's folder) resolves relative input paths when `dtype` is absent and
    the inputs' own dtype is looked up."""
    problems: list[str] = []
    for key in d:
        if key not in _TOP_KEYS and key != "modules":
            problems.append(refusal("any other key", str(key)) + did_you_mean(str(key), _TOP_KEYS))
    if "chat_template" in d:  # until the tokenizer import handles it
        problems.append("`chat_template`: not translated yet; remove it")
    mk_method = str(d.get("merge_method", ""))
    if mk_method not in _METHODS:
        problems.append(
            f"merge_method `{mk_method}` has no counterpart in merge "
            f"(translated: {', '.join(sorted(_METHODS))})"
        )
        return {}, problems
    method, base_role = _METHODS[mk_method]

    # One group per output step: (where, [(model ref, params, layer range or None)], slice
    # parameters, slice base ref or None). `models:` is one group; `slices:` one per slice.
    groups: list[tuple[str, list[tuple[Any, Mapping[str, Any], Any]], Mapping[str, Any], Any]] = []
    if "modules" in d:
        problems.append(refusal("modules"))
    if "slices" in d and "models" in d:
        problems.append("give `models` or `slices`, not both")
    sliced_config = "slices" in d and "models" not in d
    if "models" in d:
        ms = [m if isinstance(m, Mapping) else {"model": m} for m in d.get("models") or []]
        for i, m in enumerate(ms):
            _known_keys(m, f"models[{i}]", {"model", "parameters"}, problems)
        groups.append(
            ("models", [(m.get("model"), m.get("parameters") or {}, None) for m in ms], {}, None)
        )
    elif sliced_config:
        for i, sl in enumerate(d.get("slices") or []):
            _known_keys(sl, f"slices[{i}]", _SLICE_KEYS, problems)
            if sl.get("residual_weight") is not None:
                warnings.warn(
                    f"mergekit config: `slices[{i}].residual_weight` has no effect (mergekit "
                    "0.1.5 reads it nowhere); ignored",
                    MergeWarning,
                    stacklevel=2,
                )
            for j, src in enumerate(sl.get("sources") or []):
                _known_keys(src, f"slices[{i}].sources[{j}]", _SOURCE_KEYS, problems)
            srcs = [
                (s.get("model"), s.get("parameters") or {}, s.get("layer_range"))
                for s in sl.get("sources") or []
            ]
            groups.append((f"slices[{i}]", srcs, sl.get("parameters") or {}, sl.get("base_model")))
    else:
        problems.append("a mergekit config needs `models` or `slices`")

    taken: set[str] = set()
    inputs: dict[str, str] = {}
    base_path = None
    if d.get("base_model") is not None:
        base_path = _model_path(d["base_model"], "base_model", problems)
        if base_path is not None:
            inputs["base"] = base_path
            taken.add("base")

    def input_for(path: str) -> str:
        for n, p in inputs.items():
            if p == path:
                return n
        name = _input_name(path, taken)
        inputs[name] = path
        return name

    from merge.methods import get_method  # late: importing the registry loads every method

    spec = get_method(method)
    per_model = set(spec.per_model)
    valid = per_model | set(spec.global_params)

    unused: dict[str, list[str]] = {}  # mergekit ignores what a method does not take

    def our_name(key: str, where: str) -> str | None:
        if key in _DROP:
            return None
        name = _RENAME.get(key, key)
        if name not in valid:
            unused.setdefault(key, []).append(where)
            return None
        return name

    def parsed(params: Mapping[str, Any], where: str) -> dict[str, list[tuple[str | None, Any]]]:
        out = {}
        for k, v in params.items():
            n = our_name(k, f"{where}.{k}")
            if n is None:
                continue
            e = _entries(v, f"{where}.{k}", problems)
            if e is not None:
                out[n] = e
        return out

    top = parsed(d.get("parameters") or {}, "parameters")
    overrides: list[dict[str, Any]] = []
    global_overrides: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    for g, (where, srcs, slice_params, slice_base) in enumerate(groups):
        step_name = f"slice{g}" if sliced_config else STEP
        group_base = base_path
        if slice_base is not None:
            group_base = _model_path(slice_base, f"{where}.base_model", problems)
            if group_base is not None:
                input_for(group_base)
        base_name = None if group_base is None else input_for(group_base)
        sliced = parsed(slice_params, f"{where}.parameters")
        step: dict[str, Any] = {"method": method}
        models: list[tuple[str, Mapping[str, Any], int]] = []  # (input, params, index)
        layer_sources: list[dict[str, Any]] = []
        base_listed = False
        for i, (ref, params, layers) in enumerate(srcs):
            loc = f"{where}.sources[{i}]" if sliced_config else f"models[{i}]"
            path = _model_path(ref, f"{loc}.model", problems)
            if path is None:
                continue
            name = input_for(path)
            if sliced_config:
                if not (isinstance(layers, list | tuple) and len(layers) == 2):
                    problems.append(
                        f"{where}.sources[{i}].layer_range: expected [start, stop], got {layers!r}"
                    )
                    continue
                layer_sources.append({"input": name, "layers": [int(layers[0]), int(layers[1])]})
            if path == group_base and base_role in ("base", "peer"):
                base_listed = True
                if base_role == "base":
                    continue  # the base listed among the models (mergekit lists it too)
            models.append((name, params, i))
        if base_role == "peer" and base_name is not None and not base_listed:
            if sliced_config:
                problems.append(
                    f"{where}: `{mk_method}` uses the base as one of the models; list it among the slice's sources"
                )
            else:
                models.append((base_name, {}, -1))
        if base_role == "base" and base_name is not None:
            if sliced_config and not base_listed:
                if spec.needs_base:
                    problems.append(
                        f"{where}: the base model `{group_base}` is not among this slice's sources; "
                        "list it with the same `layer_range` as the others"
                    )
            else:
                step["base"] = base_name
        for name_ in sorted(set(top) | set(sliced)):
            if name_ in per_model:
                continue
            fallback, filters = _resolve([sliced.get(name_, []), top.get(name_, [])])
            if fallback is not None:
                step[name_] = fallback
            for f, v in reversed(filters):
                global_overrides.append({"regex": re.escape(f), "step": step_name, name_: v})
        model_map: dict[str, dict[str, Any]] = {}
        for name, params, i in models:
            own = parsed(
                params,
                f"{where}.sources[{i}].parameters" if sliced_config else f"models[{i}].parameters",
            )
            mp: dict[str, Any] = {}
            for p in sorted(per_model & (set(own) | set(sliced) | set(top))):
                fallback, filters = _resolve([own.get(p, []), sliced.get(p, []), top.get(p, [])])
                if fallback is not None:
                    mp[p] = fallback
                for f, v in reversed(filters):
                    overrides.append(
                        {"regex": re.escape(f), "step": step_name, "input": name, p: v}
                    )
            model_map[name] = mp
        if sliced_config:
            for src in layer_sources:
                src.update(model_map.get(src["input"], {}))
            step.pop("method")
            steps.append({"sources": layer_sources, "method": method, **step})
        else:
            step["models"] = model_map
            steps.append(step)

    recipe: dict[str, Any] = {
        "version": 1,
        "description": f"translated from a mergekit `{mk_method}` config",
        "inputs": inputs,
    }
    if sliced_config:
        recipe["slices"] = steps
        recipe["output"] = {}
    else:
        recipe["steps"] = {STEP: steps[0]} if steps else {}
        recipe["output"] = {"from": STEP}
    recipe["options"] = {"compat": "mergekit"}
    if d.get("dtype") is not None:
        dt = str(d["dtype"]).removeprefix("torch.")
        if dt in _DTYPES:
            recipe["options"]["compute_dtype"] = dt
    elif not problems:  # mergekit merges in the dtype it loads: bf16 inputs, bf16 arithmetic
        stored = _stored_dtype(list(inputs.values()), base_dir)
        if stored is not None:
            recipe["options"]["compute_dtype"] = stored
    dtype = d.get("out_dtype") or d.get("dtype")
    if dtype is not None:
        dt = str(dtype).removeprefix("torch.")
        if dt in _DTYPES:
            recipe["output"]["dtype"] = dt
        else:
            problems.append(f"dtype `{dtype}`: not one of {', '.join(sorted(_DTYPES))}")
    tok = d.get("tokenizer_source")
    if isinstance(d.get("tokenizer"), Mapping):
        t = d["tokenizer"]
        tok = t.get("source")
        extra = sorted(set(t) - {"source"})
        if extra:
            problems.append(
                f"tokenizer.{', tokenizer.'.join(extra)}: per-token sources and padding are not translated"
            )
    if tok is not None:
        if tok == "base" and "base" in inputs:
            recipe["output"]["copy_files_from"] = "base"
        elif tok == "union":
            problems.append(
                "tokenizer_source: union builds a merged vocabulary and re-maps embedding rows, "
                "which merge does not do; merge models that share a vocabulary, or use "
                "`tokenizer_source: base`"
            )
        else:
            path = _model_path(tok, "tokenizer_source", problems)
            match = [n for n, p in inputs.items() if p == path]
            if match:
                recipe["output"]["copy_files_from"] = match[0]
            elif path is not None:
                problems.append(f"tokenizer_source `{tok}` is not one of the merged models")
    if global_overrides or overrides:
        recipe["overrides"] = global_overrides + overrides
    for key, wheres in unused.items():
        warnings.warn(
            f"mergekit config: `{method}` takes no parameter `{key}`{did_you_mean(key, valid)}; "
            f"ignored as mergekit ignores it ({', '.join(wheres)}; `{method}` takes: "
            f"{', '.join(sorted(valid))})",
            MergeWarning,
            stacklevel=2,
        )
    return recipe, problems
