"""Parse an adapter on disk (PEFT, diffusers, kohya/A1111, LyCORIS) into canonical modules.

Detection is by key suffixes (reference §7) plus `adapter_config.json` or the diffusers
`lora_adapter_metadata`; scales come, in priority order, from the PEFT config (with
`rank_pattern`/`alpha_pattern`/rsLoRA), the diffusers metadata, a per-module `.alpha`
(0 or missing -> scale 1), else 1.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from merge.errors import FormatError, UsageError
from merge.io.safetensors import SafetensorsSource
from merge.io.sources import TensorSource
from merge.io.torchfile import TorchFileSource
from merge.lora.modules import LoraModule
from merge.lora.names import COMPONENTS, KOHYA_PREFIXES

PEFT_PREFIX = "base_model.model."
ADAPTER_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "pytorch_lora_weights.safetensors",
    "pytorch_lora_weights.bin",
)

# (regex on the key, role); the module name is group 1.
ROLE_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(.+)\.lora_A(?:\.default)?\.weight$"), "A"),
    (re.compile(r"^(.+)\.lora_B(?:\.default)?\.weight$"), "B"),
    (re.compile(r"^(.+)\.lora_B(?:\.default)?\.bias$"), "bias"),
    (re.compile(r"^(.+)\.lora_embedding_A(?:\.default)?$"), "embA"),
    (re.compile(r"^(.+)\.lora_embedding_B(?:\.default)?$"), "embB"),
    (re.compile(r"^(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$"), "magnitude"),
    (re.compile(r"^(.+)\.lora_down\.weight$"), "A"),
    (re.compile(r"^(.+)\.lora_up\.weight$"), "B"),
    (re.compile(r"^(.+)\.lora_mid\.weight$"), "mid"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
    (re.compile(r"^(.+)\.dora_scale$"), "dora_scale"),
    (re.compile(r"^(.+)\.hada_w([12])_([ab])$"), "hada"),
    (re.compile(r"^(.+)\.hada_t([12])$"), "hada_t"),
    (re.compile(r"^(.+)\.lokr_w([12])$"), "lokr_full"),
    (re.compile(r"^(.+)\.lokr_w([12])_([ab])$"), "lokr"),
    (re.compile(r"^(.+)\.lokr_t2$"), "lokr_t2"),
    (re.compile(r"^(.+)\.diff$"), "diff"),
    (re.compile(r"^(.+)\.diff_b$"), "diff_b"),
    (re.compile(r"^(.+)\.bias_indices$|^(.+)\.bias_values$"), "ignored"),
    # old diffusers attention-processor LoRA
    (re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$"), "old_proc"),
    (re.compile(r"^(.+)\.lora_linear_layer\.(up|down)\.weight$"), "old_ll"),
    (re.compile(r"^(.+)\.lora\.(up|down)\.weight$"), "old_ll"),
]


@dataclass
class Adapter:
    """An adapter file seen as canonical modules plus full tensors (PEFT `modules_to_save`)."""

    path: str
    format: str  # peft | diffusers | kohya | lycoris
    modules: dict[str, LoraModule]
    source: TensorSource
    full: dict[str, str] = field(
        default_factory=dict
    )  # dotted param name ("" component) -> file key
    config: dict[str, object] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def tensor(self, key: str) -> Tensor:
        return self.source.read(key)


def find_adapter_file(path: Path) -> tuple[Path, dict[str, object] | None]:
    """(weights file, adapter_config.json contents or None) for a folder or a file."""
    if path.is_dir():
        config_path = path / "adapter_config.json"
        config = _read_config(config_path) if config_path.is_file() else None
        for name in ADAPTER_FILES:
            if (path / name).is_file():
                return path / name, config
        st = sorted(path.glob("*.safetensors"))
        if len(st) == 1:
            return st[0], config
        subs = [
            d
            for d in sorted(path.iterdir())
            if d.is_dir() and (d / "adapter_config.json").is_file()
        ]
        if len(subs) == 1 and config is None:
            return find_adapter_file(subs[0])  # peft saves a non-default adapter in a sub-folder
        if subs:
            raise FormatError(
                f"{path}: holds several adapters ({', '.join(d.name for d in subs)}); give the path of one"
            )
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise FormatError(
            f"{path}: no adapter weights found (looked for {', '.join(ADAPTER_FILES)} or a single "
            f"*.safetensors; found: {found})"
        )
    config_path = path.parent / "adapter_config.json"
    config = (
        _read_config(config_path)
        if path.name.startswith("adapter_model") and config_path.is_file()
        else None
    )
    return path, config


def _read_config(p: Path) -> dict[str, object]:
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(
            f"{p}: not valid JSON ({e}); an adapter_config.json as peft writes it is expected"
        ) from e
    if not isinstance(cfg, dict):
        raise FormatError(f"{p}: expected a JSON object")
    return cfg


def open_tensor_file(path: Path) -> TensorSource:
    if path.suffix == ".safetensors":
        return SafetensorsSource([path], root=path.parent)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return TorchFileSource([path], root=path.parent)
    raise FormatError(
        f"{path}: an adapter must be a .safetensors or .bin file, or a folder holding one"
    )


def split_module_name(prefix: str) -> tuple[str, str, bool]:
    """(component, path, dotted) of a module prefix as the file spells it."""
    if prefix.startswith(PEFT_PREFIX):
        return "", prefix[len(PEFT_PREFIX) :], True
    for kp, comp in KOHYA_PREFIXES.items():
        if prefix.startswith(kp) and "." not in prefix:
            return comp, prefix, False
    head, _, rest = prefix.partition(".")
    if head in COMPONENTS and rest:
        return head, rest, True
    if prefix.startswith("lora_") and "." not in prefix:
        return "", prefix, False
    return "", prefix, True


def read_adapter(path: str | Path) -> Adapter:
    """Parse an adapter folder or file; FormatError lists every key it cannot place."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"adapter {path} does not exist; check the path")
    file, config = find_adapter_file(p)
    src = open_tensor_file(file)
    metadata = dict(getattr(src, "metadata", {}) or {})
    if config is not None:
        _check_config(config, p)
    roles: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    unknown: list[str] = []
    ia3: list[str] = []
    all_keys = set(src.keys())
    for key in src.keys():
        placed = False
        for pat, role in ROLE_PATTERNS:
            m = pat.match(key)
            if m is None:
                continue
            placed = True
            if role == "ignored":
                break
            mod = m.group(1)
            if role == "hada":
                role = f"w{m.group(2)}{m.group(3)}"
            elif role == "hada_t":
                role = f"t{m.group(2)}"
            elif role == "lokr_full":
                role = f"k_w{m.group(2)}"
            elif role == "lokr":
                role = f"k_w{m.group(2)}{m.group(3)}"
            elif role == "lokr_t2":
                role = "k_t2"
            elif role == "old_proc":
                mod = f"{mod}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else "")
                role = "B" if m.group(3) == "up" else "A"
            elif role == "old_ll":
                role = "B" if m.group(2) == "up" else "A"
            roles.setdefault(mod, {})[role] = key
            break
        if placed:
            continue
        if key.endswith(".on_input") or (
            key.endswith(".weight") and f"{key[: -len('.weight')]}.on_input" in all_keys
        ):
            ia3.append(key)
        elif key.startswith(PEFT_PREFIX) and "lora_" not in key:
            full[key[len(PEFT_PREFIX) :]] = key  # modules_to_save / trained biases: full values
        else:
            unknown.append(key)
    if ia3:
        raise FormatError(
            f"{file}: (IA)^3 tensors ({', '.join(ia3[:3])}) scale weights multiplicatively: that is "
            "not a weight delta and merge does not read it; bake it with LyCORIS instead"
        )
    # kohya `.alpha` on a name that has no factors is an orphan, as is a lone lora_B
    modules: dict[str, LoraModule] = {}
    problems: list[str] = []
    fmt = _guess_format(roles, config, metadata)
    peft_cfgs = _component_configs(config, metadata)
    for prefix, r in roles.items():
        comp, mpath, dotted = split_module_name(prefix)
        try:
            mod = _build_module(comp, mpath, dotted, r, src, fmt)
        except _Missing as e:
            problems.append(f"`{prefix}`: {e}")
            continue
        if mod is None:
            unknown.extend(r.values())
            continue
        cfg = peft_cfgs.get(comp) if comp in peft_cfgs else peft_cfgs.get("")
        _apply_scale(mod, r, src, cfg)
        if config is not None and config.get("fan_in_fan_out"):
            mod.fan_in_fan_out = True
        modules[mod.name] = mod
    if problems:
        raise FormatError(f"{file}: incomplete adapter modules:\n  " + "\n  ".join(problems[:20]))
    if unknown or not modules:
        shown = ", ".join(f"`{k}`" for k in unknown[:12]) + (
            f" and {len(unknown) - 12} more" if len(unknown) > 12 else ""
        )
        raise FormatError(
            f"{file}: unknown adapter format: unrecognised keys {shown or '(none: the file holds no LoRA factors)'}; "
            "merge reads PEFT (lora_A/lora_B), diffusers (unet./text_encoder. + lora_A/lora_B), kohya/A1111 "
            "(lora_down/lora_up/alpha) and LyCORIS (lora_mid, hada_*, lokr_*, diff) adapters"
        )
    return Adapter(str(p), fmt, modules, src, full, dict(config or {}), metadata)


class _Missing(Exception):
    pass


def _check_config(config: dict[str, object], where: Path) -> None:
    ptype = str(config.get("peft_type", "LORA")).upper()
    if ptype not in ("LORA", "LOHA", "LOKR"):
        raise FormatError(
            f"{where}: peft_type {ptype} is not a weight-delta adapter merge can read (LORA, LOHA, LOKR)"
        )
    init = str(config.get("init_lora_weights", "true")).lower()
    if init.startswith(("pissa", "olora", "corda")):
        raise FormatError(
            f"{where}: adapter_config.json has init_lora_weights={config.get('init_lora_weights')}: this adapter is "
            "only valid on the mutated base; save it with peft's path_initial_model_for_weight_conversion "
            "to get a plain LoRA for the original base"
        )
    if config.get("layer_replication"):
        raise FormatError(
            f"{where}: adapters with layer_replication change the layer layout and cannot be merged into weights"
        )


def _guess_format(
    roles: dict[str, dict[str, str]], config: dict[str, object] | None, metadata: dict[str, str]
) -> str:
    all_roles = {k for r in roles.values() for k in r}
    names = list(roles)
    if any(k.startswith(("w1", "w2", "t1", "t2", "k_")) or k in ("mid", "diff") for k in all_roles):
        return "lycoris"
    if config is not None or any(n.startswith(PEFT_PREFIX) for n in names):
        return "peft"
    if any(k in all_roles for k in ("A", "B")) and any(not split_module_name(n)[2] for n in names):
        return "kohya"
    return "diffusers"


def _component_configs(
    config: dict[str, object] | None, metadata: dict[str, str]
) -> dict[str, dict[str, object]]:
    """PEFT-style config per component ("" for a plain adapter_config.json)."""
    out: dict[str, dict[str, object]] = {}
    if config is not None:
        out[""] = config
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            meta = {}
        for k, v in meta.items():
            comp, _, field_name = k.partition(".")
            if field_name:
                out.setdefault(comp, {})[field_name] = v
    return out


def _build_module(
    comp: str, path: str, dotted: bool, r: dict[str, str], src: TensorSource, fmt: str
) -> LoraModule | None:
    def need(*roles: str) -> None:
        missing = [x for x in roles if x not in r]
        if missing:
            raise _Missing(f"has {', '.join(sorted(r))} but lacks {', '.join(missing)}")

    dora = r.get("magnitude") or r.get("dora_scale")
    bias = r.get("bias") or r.get("diff_b")
    if "embA" in r or "embB" in r:
        need("embA", "embB")
        mod = LoraModule(comp, path, dotted, "embedding", {"A": r["embA"], "B": r["embB"]})
        mod.rank = src.meta(r["embA"]).shape[0]
    elif "w1a" in r or "w2a" in r:
        need("w1a", "w1b", "w2a", "w2b")
        keys: dict[str, str] = {x: r[x] for x in ("w1a", "w1b", "w2a", "w2b", "t1", "t2") if x in r}
        mod = LoraModule(comp, path, dotted, "loha", keys)
        mod.rank = src.meta(r["w1b"]).shape[0]
    elif any(x.startswith("k_") for x in r):
        keys = {x[2:]: r[x] for x in r if x.startswith("k_")}
        if "w1" not in keys and not {"w1a", "w1b"} <= set(keys):
            raise _Missing("lacks lokr_w1 (or lokr_w1_a and lokr_w1_b)")
        if "w2" not in keys and not {"w2a", "w2b"} <= set(keys):
            raise _Missing("lacks lokr_w2 (or lokr_w2_a and lokr_w2_b)")
        mod = LoraModule(comp, path, dotted, "lokr", keys)
        if "w1b" in keys:
            mod.rank = src.meta(keys["w1b"]).shape[0]
        elif "w2b" in keys:
            mod.rank = src.meta(keys["w2b"]).shape[0]
    elif "diff" in r:
        mod = LoraModule(comp, path, dotted, "full", {"diff": r["diff"]})
    elif "A" in r or "B" in r:
        need("A", "B")
        kind = "tucker" if "mid" in r else "lora"
        keys = {"A": r["A"], "B": r["B"]} | ({"mid": r["mid"]} if "mid" in r else {})
        mod = LoraModule(comp, path, dotted, kind, keys)
        mod.rank = src.meta(r["A"]).shape[0]
        rb = src.meta(r["B"]).shape[1]
        if rb != mod.rank:
            raise _Missing(f"ranks disagree: {r['A']} has rank {mod.rank}, {r['B']} has rank {rb}")
    else:
        return None
    mod.dora_key = dora
    mod.bias_key = bias
    mod.extra["dora_peft"] = "magnitude" in r
    return mod


def _pattern_value(pattern: object, module_path: str) -> object | None:
    """peft's get_pattern_key: first key with re.match(rf"(.*\\.)?({key})$", name)."""
    if not isinstance(pattern, dict):
        return None
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return None


def _apply_scale(
    mod: LoraModule, r: dict[str, str], src: TensorSource, cfg: dict[str, object] | None
) -> None:
    """scale = alpha / r (or / sqrt(r) with rsLoRA); sources as described in the module docstring."""
    rank = mod.rank
    alpha: float | None = None
    if "alpha" in r:
        alpha = float(src.read(r["alpha"]).reshape(-1)[0])
        if alpha == 0:
            alpha = None
    if cfg is not None and alpha is None and "r" in cfg:
        path = mod.path
        cfg_r = _pattern_value(cfg.get("rank_pattern"), path)
        cfg_a = _pattern_value(cfg.get("alpha_pattern"), path)
        raw_r: Any = cfg_r if cfg_r is not None else cfg.get("r", rank) or rank
        r_used = float(raw_r)
        raw_a: Any = (
            cfg_a
            if cfg_a is not None
            else cfg.get("lora_alpha", cfg.get("alpha", r_used)) or r_used
        )
        a_used = float(raw_a)
        mod.alpha = a_used
        mod.scale = a_used / (math.sqrt(r_used) if cfg.get("use_rslora") else r_used)
        mod.extra["rslora"] = bool(cfg.get("use_rslora"))
        return
    if mod.kind == "lokr" and "w1b" not in mod.keys and "w2b" not in mod.keys:
        mod.scale = 1.0  # both Kronecker factors full: LyCORIS forces alpha = r, A1111 uses 1
        mod.alpha = alpha
        return
    if mod.kind == "full":
        mod.scale = 1.0
        return
    if alpha is None or rank == 0:
        mod.scale = 1.0
        mod.alpha = float(rank) if rank else None
        return
    mod.alpha = alpha
    mod.scale = alpha / rank
