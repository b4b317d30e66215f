"""The model card and config file written beside an MoE built by `merge moe`.

`README.md` has Hugging Face's card layout, as `merge.card` writes for merges: YAML front
matter (`base_model:` listing the inputs, `library_name`, `tags:` with `merge` and `moe`), then
the architecture, the gates, the experts with their prompts, and the config. `merge-moe.yaml`
is the config as it ran, model paths resolved, so `merge moe merge-moe.yaml -o OUT` redoes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from merge.card import TOOL
from merge.moe.layout import LAYOUTS
from merge.version import __version__

if TYPE_CHECKING:
    from merge.moe.config import LoadedConfig, Model

CONFIG_FILE = "merge-moe.yaml"

_GATES = {
    "hidden": "the base's hidden state at each prompt's last token, per layer",
    "hidden_last": "the base's hidden state at each prompt's last token, per layer",
    "hidden_avg": "the base's hidden states averaged over each prompt, per layer",
    "cheap_embed": "the base's token embeddings summed over each expert's prompts",
    "random": "random normal vectors",
    "uniform_random": "random uniform vectors (nn.Linear's initialisation)",
}


def _resolved(models: dict[str, Model]) -> dict[str, str]:
    """Each model's path, absolute where it is local (a hub id as given)."""
    out = {}
    for key, m in models.items():
        p = Path(m.path)
        out[key] = str(p.resolve()) if p.exists() else m.path
    return out


def config_dict(loaded: LoadedConfig, models: dict[str, Model], seed: int) -> dict[str, Any]:
    """The config as it ran, as plain data, with resolved model paths."""
    paths = _resolved(models)
    data = loaded.config.model_dump(mode="json", exclude_none=True)
    data["base_model"] = paths["base_model"]
    for group in ("experts", "shared_experts"):
        for i, e in enumerate(data.get(group, [])):
            e["source_model"] = paths[f"{group}[{i}].source_model"]
    return data


def config_yaml(loaded: LoadedConfig, models: dict[str, Model], seed: int) -> str:
    text = yaml.safe_dump(config_dict(loaded, models, seed), sort_keys=False, allow_unicode=True)
    if loaded.config.gate_mode in ("random", "uniform_random"):
        text = f"# the gates were drawn with --random-seed {seed}\n" + text
    return text


def _prompts(e: dict[str, Any]) -> str:
    pos = "; ".join(e.get("positive_prompts", []))
    neg = "; ".join(e.get("negative_prompts", []))
    cell = pos.replace("|", "\\|") or "—"
    return cell + (f" (not: {neg.replace('|', chr(92) + '|')})" if neg else "")


def model_card(loaded: LoadedConfig, models: dict[str, Model], seed: int) -> str:
    """README.md text for the MoE (independent of where it is written)."""
    c = loaded.config
    layout = LAYOUTS[loaded.arch]
    data = config_dict(loaded, models, seed)
    unique = list(dict.fromkeys(_resolved(models).values()))
    front = {"base_model": unique, "library_name": "transformers", "tags": ["merge", TOOL, "moe"]}
    gate = _GATES[c.gate_mode] + (f" (--random-seed {seed})" if "random" in c.gate_mode else "")
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "# Mixture of experts",
        "",
        f"This model is a mixture of experts built from dense models with {TOOL} {__version__} "
        "(the `merge moe` command).",
        "",
        "## Method",
        "",
        f"- architecture: {layout.name} (`{layout.class_name}`), {len(c.experts)} experts, "
        f"{c.experts_per_token} per token"
        + (", one shared expert" if layout.shared_expert else ""),
        "- attention, norms and embeddings: from the base model",
        "- experts: the MLP of each expert model, layer by layer",
        f"- router (`gate_mode: {c.gate_mode}`): {gate}",
        "",
        "## Inputs",
        "",
        "| role | model | prompts |",
        "| --- | --- | --- |",
        f"| base | {data['base_model']} | |",
    ]
    for i, e in enumerate(data["experts"]):
        lines.append(f"| expert {i} | {e['source_model']} | {_prompts(e)} |")
    for e in data.get("shared_experts", []):
        lines.append(f"| shared expert | {e['source_model']} | {_prompts(e)} |")
    lines += [
        "",
        "## Config",
        "",
        f"The config that built this model (also in `{CONFIG_FILE}`; "
        f"`merge moe {CONFIG_FILE} -o OUT` builds it again):",
        "",
        "```yaml",
        config_yaml(loaded, models, seed).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_moe_card(
    loaded: LoadedConfig, models: dict[str, Model], folder: Path, *, seed: int
) -> None:
    """Write README.md and merge-moe.yaml into the output folder."""
    (folder / "README.md").write_text(model_card(loaded, models, seed))
    (folder / CONFIG_FILE).write_text(config_yaml(loaded, models, seed))
