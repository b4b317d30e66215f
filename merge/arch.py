"""What layer slicing needs to know about a model: which tensors belong to decoder layer i, and
where config.json keeps the layer count and layer-indexed lists.

    arch = detect_arch(config, tensor_names)
    arch.layer_of("model.layers.3.mlp.up_proj.weight")  # -> 3
    arch.rename("model.layers.3.mlp.up_proj.weight", 7)  # -> "model.layers.7.mlp.up_proj.weight"

Known: decoder-only models whose layers are `model.layers.{i}` (Llama, Mistral, Qwen2/3, Gemma
1-3, Granite, Phi, Phi-3), GPT-2 (`transformer.h.{i}` or `h.{i}`) and LLaVA's language model
(`model.language_model.layers.{i}`, or `language_model.model.layers.{i}` as older transformers
saved it). Tensors outside the layers are "pre" (embeddings, a vision tower and projector) or
"post" (final norm, lm_head): a sliced output takes the pre tensors from its first slice and
the post tensors from its last, as mergekit does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from merge.errors import PlanError

# model_type -> (config path of the layer count, layer prefixes tried in order)
_DECODER = (("num_hidden_layers",), (r"model\.layers\.",))
_KNOWN: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "granite",
            "phi",
            "phi3",
        ),
        _DECODER,
    ),
    "gpt2": (("n_layer",), (r"transformer\.h\.", r"h\.")),
    "llava": (
        ("text_config", "num_hidden_layers"),
        (r"model\.language_model\.layers\.", r"language_model\.model\.layers\."),
    ),
}
# Tensors before the first layer; every other tensor outside the layers comes after the last.
_PRE = re.compile(r"(embed_tokens|wte|wpe|vision_tower|multi_modal_projector|embed_positions)")
# Config lists with one entry per layer, rebuilt from the sliced layers' own entries.
LAYER_LISTS = ("layer_types", "no_rope_layers")


@dataclass(frozen=True)
class Arch:
    """Layer naming of one model: `prefix` + index + `.` starts every per-layer tensor name."""

    model_type: str
    count_path: tuple[str, ...]
    prefix: str  # a regex, e.g. r"model\.layers\."
    num_layers: int

    @property
    def _pattern(self) -> re.Pattern[str]:
        return re.compile(rf"^({self.prefix})(\d+)(\..*)$")

    def layer_of(self, name: str) -> int | None:
        m = self._pattern.match(name)
        return int(m.group(2)) if m else None

    def rename(self, name: str, index: int) -> str:
        """`name` of layer i as the same tensor of layer `index`."""
        m = self._pattern.match(name)
        if m is None:
            raise ValueError(f"`{name}` is not a per-layer tensor")
        return f"{m.group(1)}{index}{m.group(3)}"

    @staticmethod
    def is_pre(name: str) -> bool:
        return _PRE.search(name) is not None

    def text_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The (sub)dictionary that holds the layer count and the layer-indexed lists."""
        node = config
        for key in self.count_path[:-1]:
            node = node.setdefault(key, {})
        return node


def _get(config: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = config
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def detect_arch(config: Mapping[str, Any] | None, names: Iterable[str], where: str) -> Arch:
    """The layer naming of a model from its config.json and tensor names, or a PlanError naming
    what is missing (`where` names the input in the message)."""
    known = ", ".join(sorted(_KNOWN))
    if config is None:
        raise PlanError(
            f"{where}: layer slices need the model's config.json (its `model_type` and layer "
            f"count) beside the weights; none was found (known model types: {known})"
        )
    model_type = str(config.get("model_type", ""))
    if model_type not in _KNOWN:
        raise PlanError(
            f"{where}: model_type `{model_type or '(none)'}` "
            f"({', '.join(config.get('architectures') or []) or 'no architectures'}) is not known "
            f"to layer slices: its per-layer tensor prefix and the config key of its layer count "
            f"are missing from merge/arch.py (known model types: {known})"
        )
    count_path, prefixes = _KNOWN[model_type]
    count = _get(config, count_path)
    if not isinstance(count, int):
        raise PlanError(
            f"{where}: config.json has no integer `{'.'.join(count_path)}` (the layer count of a "
            f"`{model_type}` model)"
        )
    names = list(names)
    for prefix in prefixes:
        pattern = re.compile(rf"^{prefix}(\d+)\.")
        found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
        if found:
            if found != set(range(count)):
                raise PlanError(
                    f"{where}: config.json says {count} layers but the tensors under "
                    f"`{prefix.replace(chr(92), '')}` number {len(found)} (indices "
                    f"{min(found)}..{max(found)}); the checkpoint and its config disagree"
                )
            return Arch(model_type, count_path, prefix, count)
    raise PlanError(
        f"{where}: a `{model_type}` model should have tensors named "
        f"{' or '.join(p.replace(chr(92), '') + '<i>.*' for p in prefixes)}, and this one has none"
    )


def sliced_config(
    config: dict[str, Any], arch: Arch, layers: list[tuple[Mapping[str, Any], int]]
) -> dict[str, Any]:
    """config.json for an output whose layer j is layer `layers[j][1]` of the model whose config
    is `layers[j][0]`: the layer count set and every layer-indexed list rebuilt."""
    out = dict(config)
    if len(arch.count_path) > 1:
        out[arch.count_path[0]] = dict(out[arch.count_path[0]])
    node = arch.text_config(out)
    node[arch.count_path[-1]] = len(layers)
    for key in LAYER_LISTS:
        if isinstance(node.get(key), list):
            entries = []
            for cfg, i in layers:
                own = _get(cfg, (*arch.count_path[:-1], key))
                entries.append((own if isinstance(own, list) else node[key])[i])
            node[key] = entries
    return out
