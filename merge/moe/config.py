"""mergekit-moe's config schema, validated with every problem reported at once.

```yaml
base_model: ./llama-base          # attention, norms and embeddings come from here
gate_mode: hidden                 # hidden | cheap_embed | random | uniform_random
dtype: bfloat16                   # optional; default: the base's
experts_per_token: 2
experts:
  - source_model: ./llama-code    # its MLPs become expert 0 of every layer
    positive_prompts: ["def fibonacci(n):"]
    negative_prompts: ["Once upon a time"]
shared_experts:                   # Qwen MoE output only: exactly one
  - source_model: ./llama-chat
    positive_prompts: ["Hello"]
architecture: qwen                # optional: mixtral | qwen (default: mixtral without shared experts)
```

A mergekit-moe config runs unchanged. `gate_dtype` is ours (mergekit ignores unknown keys):
the dtype the base runs in for the `hidden` gates, float32 by default; `bfloat16` is what
mergekit uses and reproduces its routers. Paths are relative to the config file's folder
where they exist there, else as given (the current folder, or a Hugging Face hub id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, FiniteFloat, ValidationError

from merge.errors import RecipeError, did_you_mean
from merge.io.sources import TensorSource
from merge.recipe import read_mapping

# mergekit-moe's gate modes: `hidden` and `hidden_last` take each prompt's last token,
# `hidden_avg` the mean over every position (padding included, as mergekit computes it).
GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last")
RANDOM_MODES = ("random", "uniform_random")
HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")
DTYPES = ("float32", "float16", "bfloat16")
GATE_DTYPES = ("float32", "bfloat16")

# mergekit's output architectures by their `name()`, which `architecture:` prefixes; the value
# is ours, or None where merge moe does not build that architecture.
ARCHITECTURES: dict[str, str | None] = {
    "Mixtral": "mixtral",
    "DeepSeek MoE": None,
    "Qwen MoE": "qwen2_moe",
    "Qwen3 MoE": None,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expert(_Strict):
    """One dense model whose MLPs become one expert of every layer."""

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: FiniteFloat | None = None  # Gaussian noise added to its MLP weights
    residual_scale: FiniteFloat | None = None  # multiplies its down_proj (the residual branch)


class MoEConfig(_Strict):
    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"  # mergekit's default
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    gate_dtype: str = "float32"  # ours: the dtype `hidden` gates run the base in


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config, the output architecture it selects and where its paths resolve."""

    config: MoEConfig
    arch: str  # "mixtral" or "qwen2_moe"
    base_dir: Path  # relative model paths resolve here first
    source: str | None  # the file it came from, for messages

    def path(self, raw: str) -> str:
        """A model path as written in the config, resolved like recipe inputs."""
        try:
            p = Path(raw).expanduser()
            if not p.is_absolute() and (self.base_dir / p).exists():
                return str(self.base_dir / p)
            return str(p) if p.exists() else raw  # else a hub id, or missing: opening says so
        except (OSError, ValueError, RuntimeError):  # too long, a NUL, `~nouser`
            return raw

    def models(self) -> list[tuple[str, str]]:
        """(config key, resolved path) of every model: base, experts, shared experts."""
        c = self.config
        out = [("base_model", self.path(c.base_model))]
        out += [
            (f"experts[{i}].source_model", self.path(e.source_model))
            for i, e in enumerate(c.experts)
        ]
        out += [
            (f"shared_experts[{i}].source_model", self.path(e.source_model))
            for i, e in enumerate(c.shared_experts or [])
        ]
        return out


def load_moe_config(
    source: str | Path | dict[str, Any], *, allow_all_same: bool = False
) -> LoadedConfig:
    """Read and validate a mergekit-moe config (a YAML path or a dict); RecipeError lists every
    problem with its key, exit 2."""
    data, name, base_dir = read_mapping(
        source, "a MoE config is a mapping with `base_model:` and `experts:`"
    )
    if "merge_method" in data or "models" in data:
        raise RecipeError(
            "this is a mergekit merge config (`merge_method:`/`models:`), not a mergekit-moe "
            "config; run it with `merge run`",
            name,
        )
    problems = _schema_problems(data)
    if problems:
        raise RecipeError(problems, name)
    config = MoEConfig.model_validate(data)
    problems = check_config(config, allow_all_same=allow_all_same)
    arch = None
    if not problems:
        arch, problems = select_arch(config)
    if problems or arch is None:
        raise RecipeError(problems, name)
    return LoadedConfig(config, arch, base_dir, name)


def _schema_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        MoEConfig.model_validate(data)
    except ValidationError as e:
        return [_problem(err) for err in e.errors()]
    return []


def _key(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(err: Any) -> tuple[str, str]:
    loc = tuple(err["loc"])
    key = _key(loc)
    if err["type"] == "extra_forbidden":
        model = Expert if len(loc) > 1 else MoEConfig
        valid = list(model.model_fields)
        return (
            key,
            f"unknown key{did_you_mean(str(loc[-1]), valid)}; valid keys: {', '.join(valid)}",
        )
    if err["type"] == "missing":
        hint = {
            "base_model": "give the dense model whose attention, norms and embeddings the MoE keeps",
            "experts": "list the expert models, each as `- source_model: PATH`",
            "source_model": "give the path of this expert's model",
        }.get(str(loc[-1]), "")
        return key, "required key is missing" + (f"; {hint}" if hint else "")
    return key, str(err["msg"]).removeprefix("Value error, ")


def check_config(config: MoEConfig, *, allow_all_same: bool = False) -> list[tuple[str, str]]:
    """What mergekit-moe refuses in a config (its `is_bad_config`), plus unknown names; the
    models themselves are checked later, from their headers."""
    c = config
    problems: list[tuple[str, str]] = []
    if c.gate_mode not in GATE_MODES:
        problems.append(
            (
                "gate_mode",
                f"unknown gate mode `{c.gate_mode}`{did_you_mean(c.gate_mode, GATE_MODES)}; "
                f"choose one of {', '.join(GATE_MODES)}",
            )
        )
    if c.dtype is not None and c.dtype not in DTYPES:
        problems.append(
            (
                "dtype",
                f"unknown dtype `{c.dtype}`{did_you_mean(c.dtype, DTYPES)}; choose one of {', '.join(DTYPES)}",
            )
        )
    if c.gate_dtype not in GATE_DTYPES:
        problems.append(
            (
                "gate_dtype",
                f"unknown dtype `{c.gate_dtype}`; choose float32 (the default) or bfloat16 "
                "(what mergekit runs the base in)",
            )
        )
    if not c.experts:
        problems.append(
            ("experts", "no experts; list at least two, each as `- source_model: PATH`")
        )
    if c.experts_per_token < 1:
        problems.append(("experts_per_token", f"must be at least 1, got {c.experts_per_token}"))
    elif c.experts and len(c.experts) < c.experts_per_token:
        problems.append(
            (
                "experts_per_token",
                f"{c.experts_per_token} experts per token but only {len(c.experts)} experts; "
                "lower experts_per_token or add experts",
            )
        )
    for i, e in enumerate([*c.experts, *(c.shared_experts or [])]):
        key = f"experts[{i}]" if i < len(c.experts) else f"shared_experts[{i - len(c.experts)}]"
        if e.residual_scale is not None and e.residual_scale == 0:
            problems.append(
                (f"{key}.residual_scale", "0 would zero the expert's output; remove it")
            )
        if e.noise_scale is not None and e.noise_scale < 0:
            problems.append((f"{key}.noise_scale", f"must be at least 0, got {e.noise_scale}"))
    shared = c.shared_experts or []
    if shared:
        with_prompts = [bool(e.positive_prompts) for e in shared]
        if any(with_prompts) and not all(with_prompts):
            problems.append(
                ("shared_experts", "give positive_prompts to every shared expert or to none")
            )
    if c.gate_mode in RANDOM_MODES or c.gate_mode not in GATE_MODES:
        return problems  # random gates read no prompts; mergekit checks nothing more
    for i, e in enumerate(c.experts):
        if not e.positive_prompts:
            problems.append(
                (
                    f"experts[{i}].positive_prompts",
                    f"gate_mode {c.gate_mode} builds each router row from its expert's prompts; "
                    "give one or more positive_prompts, or use gate_mode: random",
                )
            )
    if len(c.experts) > 1 and all(e.positive_prompts for e in c.experts):
        first = (c.experts[0].positive_prompts, c.experts[0].negative_prompts or [])
        if all((e.positive_prompts, e.negative_prompts or []) == first for e in c.experts[1:]):
            problems.append(
                (
                    "experts",
                    "every expert has the same positive and negative prompts, so every router row "
                    "would be the same; give each expert prompts for what it should receive",
                )
            )
    same = all(e.source_model == c.experts[0].source_model for e in c.experts[1:])
    if len(c.experts) > 1 and not allow_all_same and same:
        problems.append(
            (
                "experts",
                f"every expert is the same model ({c.experts[0].source_model}): the MoE would "
                "use more memory for the same outputs; pass "
                "--i-understand-this-is-not-useful-without-training if you will train it",
            )
        )
    return problems


def select_arch(config: MoEConfig) -> tuple[str | None, list[tuple[str, str]]]:
    """The output architecture (`mixtral` or `qwen2_moe`), chosen as mergekit does: the one
    `architecture:` names by prefix, else Mixtral without shared experts, Qwen MoE with one."""
    c = config
    shared = c.shared_experts or []
    names = list(ARCHITECTURES)
    if c.architecture is not None:
        names = [n for n in names if n.lower().startswith(c.architecture.lower())]
        if not names:
            return None, [
                (
                    "architecture",
                    f"unknown output architecture `{c.architecture}`; choose mixtral or qwen "
                    "(Qwen MoE), or leave it out",
                )
            ]
    built = [n for n in names if ARCHITECTURES[n] is not None]
    if not built:
        return None, [
            (
                "architecture",
                f"`{c.architecture}` selects {' or '.join(names)}, which merge moe does not build; "
                "choose mixtral or qwen (Qwen MoE)",
            )
        ]
    if not shared:
        if "Mixtral" in built:
            return "mixtral", []
        return None, [
            (
                "shared_experts",
                "Qwen MoE output needs exactly one shared expert (`shared_experts: "
                "[{source_model: PATH, positive_prompts: [...]}]`); or choose architecture: mixtral",
            )
        ]
    if "Qwen MoE" not in built:
        return None, [
            (
                "shared_experts",
                "Mixtral has no shared expert; remove shared_experts, or choose architecture: qwen",
            )
        ]
    problems = []
    if len(shared) != 1:
        problems.append(
            ("shared_experts", f"Qwen MoE takes exactly one shared expert, got {len(shared)}")
        )
    if c.gate_mode not in RANDOM_MODES and not shared[0].positive_prompts:
        problems.append(
            (
                "shared_experts[0].positive_prompts",
                f"gate_mode {c.gate_mode} builds the shared expert's gate from its prompts; give "
                "one or more positive_prompts, or use gate_mode: random",
            )
        )
    return ("qwen2_moe" if not problems else None), problems


@dataclass
class Model:
    """One input model: where it is, its tensors (lazy) and its config.json."""

    key: str  # the config key naming it, e.g. `experts[1].source_model`
    path: str
    source: TensorSource
    config: dict[str, Any]

    @property
    def folder(self) -> Path:
        root = self.source.root()
        return root if root is not None else Path(self.path)
