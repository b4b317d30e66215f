"""Give every module of an adapter a canonical place: (component, dotted path), as diffusers and
transformers name modules, using the base checkpoint or the built-in SD1.x/SDXL tables for
kohya's underscored names. `locate` is where a module lands on a base checkpoint, for every
use of adapters on a base (placing, baking, reading as deltas).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from merge.errors import PlanError
from merge.io.sources import TensorSource
from merge.lora.modules import LoraModule
from merge.lora.names import BaseIndex, builtin_sd_keys, split_target
from merge.lora.read import Adapter


@dataclass(frozen=True)
class Site:
    """Where one adapter module lands on a base checkpoint."""

    target: str  # the base's module prefix (`x.attn.in_proj#1`: a third of a fused projection)
    weight_key: str  # the base tensor the module changes
    part: int | None  # which third of a fused q/k/v projection, or None
    weight_shape: tuple[int, ...]  # that tensor's shape in the base

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape the module's delta has: the base weight's, or a third of it (rows)."""
        s = self.weight_shape
        return s if self.part is None else (s[0] // 3, *s[1:])


def locate(mod: LoraModule, index: BaseIndex, base: TensorSource) -> Site | None:
    """Where `mod` lands on `base` (whose keys `index` holds); None when it matches no weight."""
    target = index.resolve(mod.component, mod.path, mod.dotted)
    if target is None:
        return None
    _, weight_key, part = split_target(target)
    if weight_key not in index.key_set:
        return None
    return Site(target, weight_key, part, tuple(base.meta(weight_key).shape))


@dataclass
class Placed:
    modules: dict[tuple[str, str], LoraModule]
    shapes: dict[tuple[str, str], tuple[int, ...]] = field(
        default_factory=dict
    )  # base weight shapes
    unmatched: list[str] = field(default_factory=list)
    unresolved_kohya: bool = False


def guess_sd_arch(adapter: Adapter) -> str:
    v = adapter.metadata.get("ss_base_model_version", "") + adapter.metadata.get(
        "modelspec.architecture", ""
    )
    if "xl" in v.lower() or any(m.component == "text_encoder_2" for m in adapter.modules.values()):
        return "sdxl"
    if any(
        not m.dotted and ("input_blocks" in m.path or "output_blocks" in m.path)
        for m in adapter.modules.values()
    ):
        return "sdxl"  # kohya SDXL files use SGM block names
    return "sd1"


def place(adapter: Adapter, base: TensorSource | None) -> Placed:
    """Map the adapter's modules to (component, path); kohya names need `base` or an SD table."""
    out = Placed({})
    index: BaseIndex | None = BaseIndex(base.keys()) if base is not None else None
    builtin: BaseIndex | None = None
    for mod in adapter.modules.values():
        if index is not None:
            assert base is not None
            site = locate(mod, index, base)
            if site is None:
                out.unmatched.append(mod.name)
                continue
            key = index.name_of(site.target)
            out.shapes[key] = site.shape
        elif mod.dotted:
            key = (mod.component, mod.path)
        else:
            if builtin is None:
                builtin = BaseIndex(builtin_sd_keys(guess_sd_arch(adapter)))
            target = builtin.resolve(mod.component, mod.path, False)
            if target is None:
                out.unresolved_kohya = True
                key = (mod.component, mod.path)
            else:
                key = builtin.name_of(target)
        if key in out.modules:
            raise PlanError(
                f"{adapter.path}: `{mod.name}` and `{out.modules[key].name}` target the same module {key[0]}/{key[1]}"
            )
        out.modules[key] = mod
    if index is not None and not out.modules:
        raise PlanError(
            f"none of the {len(adapter.modules)} modules of {adapter.path} match the base {base.path if base else ''} "
            f"(e.g. {', '.join(out.unmatched[:5])}); is it a LoRA for another model?"
        )
    return out
