"""LoRA adapters as lazy *delta* sources keyed by the base checkpoint's parameter names.

`open_lora(path, base, scale=k)` returns a TensorSource (kind "delta") whose `read(name)` is the
float32 `k · ΔW` of the module that targets base parameter `name`, so `base + 0.8 * style` is
ordinary arithmetic. DoRA adapters are not deltas: their source is `not_additive` ("a DoRA
adapter") and `read(name)` returns `W'(k) − W`, where `W'(k) = m · (W + kΔW) / ‖W + kΔW‖` is
peft's merge with the scale applied inside the norm, at this base; add it to the base with
coefficient 1 (`at_strength(c)` is the adapter at c times its scale).
"""

from __future__ import annotations

import collections
import json
import math
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from merge.errors import FormatError, MergeError, MergeWarning, PlanError
from merge.io.safetensors import read_header
from merge.io.sources import TensorMeta, TensorSource
from merge.lora.canon import locate
from merge.lora.modules import LoraModule, dora_axis, dora_weight, module_delta
from merge.lora.names import BaseIndex
from merge.lora.read import ADAPTER_FILES, ROLE_PATTERNS, Adapter, read_adapter

__all__ = ["Adapter", "LoraSource", "describe", "looks_like_lora", "open_lora", "read_adapter"]


def looks_like_lora(path: str | Path) -> bool:
    """True for a folder with adapter_config.json / a LoRA weights file, or a file of LoRA keys."""
    p = Path(path)
    if p.is_dir():
        if (p / "adapter_config.json").is_file() or any((p / n).is_file() for n in ADAPTER_FILES):
            return True
        if (p / "model_index.json").is_file() or (p / "config.json").is_file():
            return False
        st = sorted(p.glob("*.safetensors"))
        if not st:  # peft's sub-folder for a non-default adapter name
            return any((d / "adapter_config.json").is_file() for d in p.iterdir() if d.is_dir())
        return len(st) == 1 and _keys_look_lora(st[0])
    if p.is_file() and p.suffix == ".safetensors":
        return _keys_look_lora(p)
    return False


def _keys_look_lora(file: Path) -> bool:
    try:
        entries, _, _ = read_header(file)
    except MergeError:
        return False
    keys = list(entries)
    if not keys:
        return False
    hits = sum(
        1
        for k in keys
        if any(
            p.match(k) for p, role in ROLE_PATTERNS if role not in ("alpha", "ignored", "diff_b")
        )
    )
    return hits > 0 and hits >= len(keys) // 4


class LoraSource(TensorSource):
    """A LoRA's per-module deltas (float32, scale applied) under the base's parameter names."""

    kind = "delta"

    def __init__(self, adapter: Adapter, base: TensorSource | None, scale: float = 1.0):
        self.adapter = adapter
        self.base = base
        self.scale = float(scale)
        self.path = adapter.path
        self.unmatched: list[str] = []
        self._targets: dict[str, tuple[str, object]] = {}  # base key -> (what, module or file key)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._cache: tuple[str, Tensor] | None = None
        # base key -> full tensor key added to a module's delta
        self._parts: dict[str, list[tuple[int, LoraModule]]] = {}  # fused q/k/v thirds per key
        self._full_extra: dict[str, str] = {}
        if base is None:
            self._plan_without_base()
        else:
            self._plan_with_base(base)
        dora = any(
            isinstance(t[1], LoraModule) and t[1].is_dora and t[0] == "weight"
            for t in self._targets.values()
        )
        self.not_additive = "a DoRA adapter" if dora else None

    # -- planning -------------------------------------------------------------------------
    def _plan_without_base(self) -> None:
        for mod in self.adapter.modules.values():
            name = mod.name + ".weight"
            self._targets[name] = ("weight", mod)
            if mod.bias_key:
                self._targets[mod.name + ".bias"] = ("bias", mod)
        for dotted in self.adapter.full:
            self.unmatched.append(
                f"{dotted} (a full modules_to_save tensor: needs the base to become a delta)"
            )

    def _plan_with_base(self, base: TensorSource) -> None:
        index = BaseIndex(base.keys())
        keys = index.key_set
        problems: list[str] = []
        for mod in self.adapter.modules.values():
            site = locate(mod, index, base)
            if site is None:
                self.unmatched.append(mod.name)
                continue
            target, wkey, shape = site.target, site.weight_key, site.weight_shape
            natural = self._natural_shape(mod)
            part = site.part
            if part is not None:  # q/k/v into a third of a fused OpenCLIP in_proj_weight
                third = site.shape
                if math.prod(natural) != math.prod(third) or mod.is_dora:
                    problems.append(
                        f"`{mod.name}` gives a delta of shape {list(natural)} but a third of the base's `{wkey}` is {list(third)}"
                        + (" (and DoRA cannot target a fused projection)" if mod.is_dora else "")
                    )
                    continue
                parts = self._parts.setdefault(wkey, [])
                parts.append((part, mod))
                self._targets[wkey] = ("parts", parts)
                self._shapes[wkey] = shape
                if mod.bias_key:
                    self.unmatched.append(f"{mod.name} (bias delta into a fused in_proj_bias)")
                continue
            if math.prod(natural) != math.prod(shape):
                problems.append(
                    f"`{mod.name}` gives a delta of shape {list(natural)} but the base's `{wkey}` is {list(shape)}"
                )
                continue
            if mod.is_dora and not mod.extra.get("dora_peft"):
                mshape = tuple(self.adapter.source.meta(mod.dora_key).shape)  # type: ignore[arg-type]
                mod.extra["dora_axis"] = dora_axis(mshape, shape, peft=False)
            self._targets[wkey] = ("weight", mod)
            self._shapes[wkey] = shape
            if mod.bias_key:
                bias_key = f"{target}.bias"
                if bias_key in keys:
                    self._targets[bias_key] = ("bias", mod)
                    self._shapes[bias_key] = tuple(base.meta(bias_key).shape)
                else:
                    self.unmatched.append(f"{mod.name} (bias delta: the base has no `{bias_key}`)")
        for dotted_raw, fkey in self.adapter.full.items():
            dotted = dotted_raw.replace(".base_layer.", ".")  # peft's save_embedding_layers copy
            head, _, param = dotted.rpartition(".")
            owner = index.resolve("", head, True) if head else None
            bkey: str | None = f"{owner}.{param}" if owner else None
            if bkey is None or bkey not in keys:
                bkey = dotted if dotted in keys else None
            if bkey is None:
                self.unmatched.append(f"{dotted} (modules_to_save)")
                continue
            shape = tuple(base.meta(bkey).shape)
            fshape = tuple(self.adapter.source.meta(fkey).shape)
            if fshape != shape:
                problems.append(
                    f"`{fkey}` has shape {list(fshape)} but the base's `{bkey}` is {list(shape)}"
                )
                continue
            if bkey in self._targets:  # a trained base layer under a LoRA: both changes add up
                self._full_extra[bkey] = fkey
                continue
            self._targets[bkey] = ("full", fkey)
            self._shapes[bkey] = shape
        if problems:
            raise PlanError(
                f"{self.adapter.path} does not fit the base {base.path} ({len(problems)} shape mismatches; "
                "is it a LoRA for another architecture?):\n  "
                + "\n  ".join(problems[:20])
                + ("\n  ..." if len(problems) > 20 else "")
            )
        if not self._targets:
            shown = ", ".join(self.unmatched[:8])
            raise PlanError(
                f"none of the {len(self.adapter.modules)} modules of {self.adapter.path} match a tensor of the base "
                f"{base.path} (e.g. {shown}); is it a LoRA for another model? For kohya files give the base the "
                "LoRA was trained on (a diffusers pipeline folder or a single-file SD checkpoint)"
            )
        if self.unmatched:
            warnings.warn(
                f"{self.adapter.path}: {len(self.unmatched)} of its targets match nothing in {base.path} and are "
                f"skipped: {', '.join(self.unmatched[:10])}"
                + (" ..." if len(self.unmatched) > 10 else ""),
                MergeWarning,
                stacklevel=3,
            )

    def _natural_shape(self, mod: LoraModule) -> tuple[int, ...]:
        meta = self.adapter.source.meta
        k = mod.keys
        if mod.kind in ("lora", "tucker"):
            a, b = meta(k["A"]).shape, meta(k["B"]).shape
            if mod.kind == "tucker":
                return (b[0], a[1], *meta(k["mid"]).shape[2:])
            return (b[0], *a[1:])
        if mod.kind == "embedding":
            return (meta(k["A"]).shape[1], meta(k["B"]).shape[0])
        if mod.kind == "full":
            return tuple(meta(k["diff"]).shape)
        return tuple(module_delta(mod, self._get).shape)  # LoHa/LoKr: cheap enough to build once

    # -- TensorSource ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._targets)

    def meta(self, name: str) -> TensorMeta:
        if name not in self._targets:
            raise FormatError(f"{self.path}: no delta for `{name}`")
        if name not in self._shapes:
            self._shapes[name] = tuple(self._delta(name).shape)
        return TensorMeta(self._shapes[name], torch.float32)

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        flat = self._delta(name).reshape(-1)[start:stop]
        if out is not None:
            return out.copy_(flat)
        return flat.clone()

    def _get(self, key: str) -> Tensor:
        return self.adapter.source.read(key)

    def _delta(self, name: str) -> Tensor:
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        what, obj = self._targets[name]
        if what == "full":
            assert self.base is not None
            d = self._get(str(obj)).to(torch.float32) - self.base.read(name).to(torch.float32)
            d = d * self.scale
        elif what == "parts":
            shape = self._shapes[name]
            d = torch.zeros(shape, dtype=torch.float32)
            n = shape[0] // 3
            for part, pmod in obj:  # type: ignore[attr-defined]
                d[part * n : (part + 1) * n] += module_delta(pmod, self._get).reshape(n, *shape[1:])
            d *= self.scale
        elif what == "bias":
            mod = obj
            assert isinstance(mod, LoraModule)
            d = self._get(mod.bias_key).to(torch.float32) * (mod.scale * self.scale)  # type: ignore[arg-type]
        else:
            mod = obj
            assert isinstance(mod, LoraModule)
            d = module_delta(mod, self._get) * self.scale
            if name in self._shapes:
                d = d.reshape(self._shapes[name])
            if mod.is_dora:
                if self.base is None:
                    raise PlanError(
                        f"{self.path}: `{mod.name}` is DoRA, whose change depends on the base weight; give the base"
                    )
                w = self.base.read(name).to(torch.float32)
                mag = self._get(mod.dora_key)  # type: ignore[arg-type]
                axis = 0 if mod.extra.get("dora_peft") else int(mod.extra.get("dora_axis", 0))  # type: ignore[call-overload]
                d = dora_weight(w, d, mag, axis) - w
        if name in self._full_extra:
            assert self.base is not None
            full = self._get(self._full_extra[name]).to(torch.float32) - self.base.read(name).to(
                torch.float32
            )
            d = d + full * self.scale
        self._cache = (name, d)
        return d

    def with_scale(self, scale: float) -> LoraSource:
        """The same adapter at another scale (for DoRA the norm is recomputed at that scale)."""
        new = LoraSource.__new__(LoraSource)
        new.__dict__.update(self.__dict__)
        new.scale = float(scale)
        new._cache = None
        return new

    def at_strength(self, k: float) -> LoraSource:
        """The adapter at k times its scale (DoRA: the norm recomputed at that strength)."""
        return self.with_scale(self.scale * k)

    def files(self) -> list[Path]:
        return self.adapter.source.files()

    def root(self) -> Path | None:
        return None


def open_lora(
    path: str | Path | Adapter, base: TensorSource | None, *, scale: float = 1.0
) -> LoraSource:
    """The adapter at `path` as a delta source on `base` (None: the adapter's own module names)."""
    adapter = path if isinstance(path, Adapter) else read_adapter(path)
    return LoraSource(adapter, base, scale)


def describe(path: str | Path) -> str:
    """A few lines for `merge inspect`: format, modules, ranks, alphas/scales, targets, extras."""
    a = read_adapter(path)
    mods = list(a.modules.values())
    kinds = collections.Counter(m.kind + (" (DoRA)" if m.is_dora else "") for m in mods)
    ranks = collections.Counter(m.rank for m in mods if m.rank)
    alphas = collections.Counter(m.alpha for m in mods if m.alpha is not None)
    scales = collections.Counter(round(m.scale, 6) for m in mods)
    comps = collections.Counter(m.component or "model" for m in mods)
    targets = collections.Counter(_leaf(m) for m in mods)

    def fmt(c: collections.Counter, n: int = 8) -> str:
        return ", ".join(f"{k} ×{v}" for k, v in c.most_common(n)) + (" ..." if len(c) > n else "")

    lines = [
        f"{a.path}: {a.format} adapter, {len(mods)} modules",
        f"  kinds: {fmt(kinds)}",
        f"  components: {fmt(comps)}",
        f"  ranks: {fmt(ranks) or '-'}",
        f"  alphas: {fmt(alphas) or '-'}",
        f"  scales: {fmt(scales)}",
        f"  targets: {fmt(targets, 12)}",
    ]
    if a.full:
        lines.append(f"  modules_to_save tensors: {len(a.full)} ({', '.join(list(a.full)[:4])})")
    if a.config.get("use_rslora"):
        lines.append("  rsLoRA: scale = alpha / sqrt(r)")
    for k in ("ss_base_model_version", "modelspec.architecture", "ss_network_module"):
        if k in a.metadata:
            lines.append(f"  {k}: {a.metadata[k]}")
    if "lora_adapter_metadata" in a.metadata:
        lines.append(
            "  diffusers lora_adapter_metadata: "
            + ", ".join(sorted(json.loads(a.metadata["lora_adapter_metadata"]))[:6])
        )
    return "\n".join(lines)


def _leaf(m: LoraModule) -> str:
    if m.dotted:
        parts = m.path.split(".")
        return parts[-2] + "." + parts[-1] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
    tail = re.sub(r"^.*_\d+_", "", m.path)
    return tail
