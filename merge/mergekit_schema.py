"""mergekit 0.1.5's config schema, key by key: what `merge run` does with each.

One table, three readers: the importer (`merge.mergekit_import`) takes from it the keys it
knows and the text of every refusal; `merge run --help` prints `help_text()`; docs/methods.md
holds `markdown_table()` verbatim (a test compares them), so none of the three can drift.

A key is written as in a config, `[]` marking a list item (`slices[].sources[].layer_range`);
`<param>` is any parameter name. Status:
- supported: translated; `note` says into what.
- ignored: has no effect on the values (in mergekit either); `note` says why.
- refused: the run stops with exit 2 (a UsageError) whose message names the key; `note` is
  that message's reason and fix.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Literal

Status = Literal["supported", "ignored", "refused"]

# mergekit method -> (our method, how the base model is used)
#   "base": base_model is our `base`;  "peer": the base joins the models;  "none": not used.
MERGE_METHODS: dict[str, tuple[str, str]] = {
    "linear": ("linear", "none"),
    "task_arithmetic": ("task_arithmetic", "base"),
    "ties": ("ties", "base"),
    "dare_ties": ("dare_ties", "base"),
    "dare_linear": ("dare_linear", "base"),
    "breadcrumbs": ("breadcrumbs", "base"),
    "breadcrumbs_ties": ("breadcrumbs_ties", "base"),
    "della": ("della", "base"),
    "della_linear": ("della_linear", "base"),
    "model_stock": ("model_stock", "base"),
    "slerp": ("slerp", "base"),
    "nuslerp": ("nuslerp", "base"),
    "multislerp": ("multislerp", "base"),
    "karcher": ("karcher", "peer"),
    "passthrough": ("passthrough", "none"),
    "nearswap": ("nearswap", "base"),
    "sce": ("sce", "base"),
    "ram": ("ram", "base"),
    "ramplus_tl": ("ramplus_tl", "base"),
    "arcee_fusion": ("arcee_fusion", "base"),
}


@dataclass(frozen=True)
class SchemaKey:
    key: str
    status: Status
    note: str


SCHEMA: tuple[SchemaKey, ...] = (
    SchemaKey(
        "merge_method",
        "supported",
        "the method of the same name, one of: "
        + ", ".join(MERGE_METHODS)
        + "; any other is refused, naming it",
    ),
    SchemaKey(
        "base_model",
        "supported",
        "input `base`, the step's base (karcher: one of the models); a local path or hub id",
    ),
    SchemaKey("models", "supported", "one step `merged` over the listed models"),
    SchemaKey("models[].model", "supported", "an input named after the path's last component"),
    SchemaKey("models[].parameters", "supported", "that model's parameters in the step"),
    SchemaKey(
        "parameters",
        "supported",
        "the step's parameters and every model's fallback; `lambda` -> `scale`, "
        "`nuslerp_flatten`/`nuslerp_row_wise` -> `flatten`/`row_wise`",
    ),
    SchemaKey(
        "<param>: [a, b, ...]",
        "supported",
        "a layer gradient (mergekit's rule: layer i of n at i/(n-1), a one-layer model or "
        "slice at the last anchor, other tensors at the first)",
    ),
    SchemaKey(
        "<param>: [{filter, value}]",
        "supported",
        "`overrides` with `regex:` on the substring; first match wins, then the next level "
        "(source, slice, top); a single {filter, value} too",
    ),
    SchemaKey("slices", "supported", "the recipe's `slices`, one step `slice<i>` each"),
    SchemaKey("slices[].sources[].model", "supported", "an input, as for `models[].model`"),
    SchemaKey(
        "slices[].sources[].layer_range",
        "supported",
        "the source's `layers: [start, stop]` (stop excluded)",
    ),
    SchemaKey("slices[].sources[].parameters", "supported", "that source's parameters"),
    SchemaKey(
        "slices[].base_model",
        "supported",
        "the slice's `base` (else `base_model`); must be one of its sources",
    ),
    SchemaKey(
        "slices[].parameters",
        "supported",
        "between the sources' and the top-level `parameters`",
    ),
    SchemaKey(
        "dtype",
        "supported",
        "`output.dtype` and `options.compute_dtype` (mergekit casts inputs to it and merges in "
        "it); absent: the dtype the inputs share, as mergekit merges what it loads",
    ),
    SchemaKey("out_dtype", "supported", "`output.dtype` (over `dtype`)"),
    SchemaKey(
        "tokenizer_source",
        "supported",
        "`base`, `union` or a model: the output's tokenizer, embedding rows gathered by "
        "mergekit's rules",
    ),
    SchemaKey(
        "tokenizer",
        "supported",
        "`source`, `tokens` (per-token embedding sources) and `pad_to_multiple_of`, as mergekit",
    ),
    SchemaKey("chat_template", "supported", "`auto`, a built-in name or a Jinja template"),
    SchemaKey(
        "<param> embed_slerp",
        "supported",
        "slerp with a tokenizer: `false` lerps the embedding rows with t, as mergekit 0.0.4 "
        "did (0.1.5 ignores the flag and slerps them)",
    ),
    SchemaKey(
        "<param> a method does not take",
        "ignored",
        "one warning per name (mergekit ignores it; e.g. `weight` for slerp)",
    ),
    SchemaKey("<param> int8_mask", "ignored", "it only sets the dtype of mergekit's sign mask"),
    SchemaKey(
        "slices[].residual_weight",
        "ignored",
        "with a warning: mergekit 0.1.5 reads it nowhere",
    ),
    SchemaKey("name", "ignored", "mergekit-multi's stage name; one document is one merge"),
    SchemaKey(
        "modules",
        "refused",
        "multi-module configs are not translated; give `models` or `slices`",
    ),
    SchemaKey(
        "lora",
        "refused",
        "LoRA model references (`model+lora` or `lora:`) are not translated; merge the LoRA "
        "into its model first (`merge lora bake`), or list it as a delta input in a recipe",
    ),
    SchemaKey(
        "override_architecture",
        "refused",
        "merge reads the architecture from the tensor names and config.json; fix the "
        "config.json instead",
    ),
    SchemaKey(
        "revision",
        "refused",
        "a revision (`path@rev` or `revision:`) is not fetched; download that revision and "
        "give its local path",
    ),
    SchemaKey(
        '<param>: [true, ...] / ["a", ...]',
        "refused",
        "gradients of booleans or strings (mergekit picks one by position) are not "
        "translated; give one value, or filters",
    ),
    SchemaKey(
        "any other key",
        "refused",
        "not a key mergekit 0.1.5 has in this place (it drops such keys silently); remove "
        "it, or fix its spelling",
    ),
)

_BY_KEY = {k.key: k for k in SCHEMA}


def entry(key: str) -> SchemaKey:
    return _BY_KEY[key]


def top_level_keys() -> set[str]:
    """The top-level keys of a config that are not refused (`any other key` is)."""
    return {k.key for k in SCHEMA if k.status != "refused" and k.key.isidentifier()}


def refusal(key: str, where: str | None = None, value: object = None) -> str:
    """The message refusing `key`, found at `where` (a path that names it) holding `value`."""
    e = _BY_KEY[key]
    assert e.status == "refused", key
    shown = "" if value is None else f" (`{value}`)"
    return f"`{where or key}`{shown}: {e.note}"


def help_text(width: int = 34, line: int = 96) -> str:
    """The table as `merge run --help` prints it (click's `\\b` keeps the lines as they are)."""
    heads = {
        "supported": "translated",
        "ignored": "ignored (no effect on the values)",
        "refused": "refused: exit 2, the error names the key",
    }
    lines = [
        "A mergekit config (a YAML with `merge_method`) runs as is, translated key by key",
        "from mergekit 0.1.5's schema with `compat: mergekit` (docs/methods.md):",
    ]
    for status, head in heads.items():
        lines += ["", "\b", f"{head}:"]
        for k in SCHEMA:
            if k.status == status:
                note = textwrap.wrap(k.note, line - width - 3) or [""]
                lines.append(f"  {k.key:<{width}} {note[0]}")
                lines += [" " * (width + 3) + more for more in note[1:]]
    return "\n".join(lines)


def markdown_table() -> str:
    """The table as docs/methods.md shows it."""
    rows = ["| mergekit key | status | what merge does |", "| --- | --- | --- |"]
    rows += [f"| `{k.key}` | {k.status} | {k.note} |" for k in SCHEMA]
    return "\n".join(rows)
