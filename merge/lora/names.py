"""Name maps: diffusers UNet <-> LDM/SGM single-file names, kohya's underscored names, and the
index that resolves an adapter's module names onto a base checkpoint's parameter names.

LDM layout with L = layers_per_block (reference §5.3, §2.2): `input_blocks.0.0` is `conv_in`;
`input_blocks.k` (k ≥ 1) is down block `(k-1)//(L+1)`, slot `(k-1)%(L+1)` (slot L = downsampler
`op`); `middle_block.{0,1,2}` = resnet 0, attention 0, resnet 1; `output_blocks.k` is up block
`k//(L+1)`, slot `k%(L+1)`, with its upsampler at index 2 (index 1 in blocks without attention).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

LDM_UNET = "model.diffusion_model."
LDM_TE = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
# OpenCLIP text towers in single files: (prefix, component, kohya prefixes)
OPENCLIP = (
    ("cond_stage_model.model.", "text_encoder", ["lora_te_"]),  # SD2
    ("conditioner.embedders.1.model.", "text_encoder_2", ["lora_te2_"]),  # SDXL
)


def split_target(target: str) -> tuple[str, str, int | None]:
    """(module prefix, weight key, third or None): `x.attn.in_proj#1` -> k of `x.attn.in_proj_weight`."""
    if "#" in target:
        head, part = target.split("#")
        return head, f"{head}_weight", int(part)
    return target, f"{target}.weight", None


COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
# kohya prefixes -> pipeline component
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_te_": "text_encoder",
    "lora_transformer_": "transformer",
}

_RESNET_LDM_TO_DIFF = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFF_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFF.items()}
_TOP_LDM_TO_DIFF = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_TOP_DIFF_TO_LDM = {v: k for k, v in _TOP_LDM_TO_DIFF.items()}


def _swap_head(name: str, table: dict[str, str]) -> str | None:
    for a, b in table.items():
        if name == a or name.startswith(a + "."):
            return b + name[len(a) :]
    return None


def ldm_unet_to_diffusers(name: str, layers_per_block: int = 2) -> str | None:
    """`input_blocks.4.1.proj_in.weight` -> `down_blocks.1.attentions.0.proj_in.weight` (None if unknown)."""
    top = _swap_head(name, _TOP_LDM_TO_DIFF)
    if top is not None:
        return top
    n = layers_per_block + 1
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.(\d+))?\.(.+)$", name)
    if m is None:
        return None
    where, k, j, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if where == "middle_block":
        # middle_block.{0,1,2}.rest (no inner index: the group regex put the rest in j/rest)
        k, rest = k, (f"{j}.{rest}" if j is not None else rest)
        inner = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}.get(k)
        if inner is None:
            return None
        return f"mid_block.{inner}.{_resnet(rest) if 'resnets' in inner else rest}"
    if j is None:
        return None
    jj = int(j)
    if where == "input_blocks":
        block, slot = (k - 1) // n, (k - 1) % n
        if jj == 0 and rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        if jj == 0:
            return f"down_blocks.{block}.resnets.{slot}.{_resnet(rest)}"
        if jj == 1:
            return f"down_blocks.{block}.attentions.{slot}.{rest}"
        return None
    block, slot = k // n, k % n
    if jj == 0:
        return f"up_blocks.{block}.resnets.{slot}.{_resnet(rest)}"
    if rest.startswith("conv.") and jj in (1, 2):
        return f"up_blocks.{block}.upsamplers.0.{rest}"
    if jj == 1:
        return f"up_blocks.{block}.attentions.{slot}.{rest}"
    return None


def _resnet(rest: str) -> str:
    return _swap_head(rest, _RESNET_LDM_TO_DIFF) or rest


def diffusers_unet_to_ldm(
    name: str, layers_per_block: int = 2, up_blocks_with_attention: Iterable[int] = ()
) -> str | None:
    """Inverse of `ldm_unet_to_diffusers`; the upsampler's index needs to know which up blocks have attention."""
    top = _swap_head(name, _TOP_DIFF_TO_LDM)
    if top is not None:
        return top
    n = layers_per_block + 1
    m = re.match(
        r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$",
        name,
    )
    if m is None:
        m2 = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
        if m2 is None:
            return None
        kind, i, rest = m2.group(1), int(m2.group(2)), m2.group(3)
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * i}.{_swap_head(rest, _RESNET_DIFF_TO_LDM) or rest}"
    where, b, kind, i, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    res = _swap_head(rest, _RESNET_DIFF_TO_LDM) or rest
    if where == "down_blocks":
        if kind == "downsamplers":
            return (
                f"input_blocks.{(b + 1) * n}.0.op.{rest[len('conv.') :]}"
                if rest.startswith("conv.")
                else None
            )
        return f"input_blocks.{1 + b * n + i}.{0 if kind == 'resnets' else 1}.{res if kind == 'resnets' else rest}"
    if kind == "upsamplers":
        idx = 2 if b in set(up_blocks_with_attention) else 1
        return f"output_blocks.{b * n + layers_per_block}.{idx}.{rest}"
    return f"output_blocks.{b * n + i}.{0 if kind == 'resnets' else 1}.{res if kind == 'resnets' else rest}"


def underscored(path: str) -> str:
    return path.replace(".", "_")


def ldm_layers_per_block(keys: Iterable[str]) -> int:
    """L from an LDM key set: the first downsampler sits at `input_blocks.{L+1}.0.op`."""
    ks = [int(m.group(1)) for k in keys if (m := re.match(r".*input_blocks\.(\d+)\.0\.op\.", k))]
    return min(ks) - 1 if ks else 2


def diffusers_layout(keys: Iterable[str]) -> tuple[int, set[int]]:
    """(layers_per_block, up blocks that have attentions) from diffusers UNet parameter names."""
    keys = list(keys)
    res = [int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))]
    attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return (max(res) + 1 if res else 2), attn


class BaseIndex:
    """Resolves adapter module names (dotted, component-qualified, or kohya underscored) to the
    base checkpoint's module prefixes (parameter name without `.weight`).

    Layouts: a diffusers pipeline source (`unet/…`, `text_encoder/…`), a single-file SD checkpoint
    (LDM keys), or a plain model (transformers, a bare UNet folder).
    """

    def __init__(self, keys: Iterable[str]):
        self.keys = list(keys)
        self.key_set = set(self.keys)
        self.names: dict[
            str, tuple[str, str]
        ] = {}  # target -> (component, HF path) where not derivable
        self.dotted: dict[tuple[str, str], str] = {}
        self.kohya: dict[str, str] = {}
        self.layout = "plain"
        self.ldm_lpb = 2
        self.unet_like = False
        modules = [k[: -len(".weight")] for k in self.keys if k.endswith(".weight")]
        if any(k.startswith(LDM_UNET) for k in self.keys):
            self.layout = "ldm"
            self._index_ldm(modules)
        elif any("/" in k and k.split("/", 1)[0] in COMPONENTS for k in self.keys):
            self.layout = "pipeline"
            self._index_pipeline(modules)
        else:
            self._index_plain(modules)

    def _add(self, component: str, path: str, target: str, kohya_prefixes: Iterable[str]) -> None:
        paths = [path]
        if component.startswith("text_encoder") or any(
            p.startswith("lora_te") for p in kohya_prefixes
        ):
            # CLIP: transformers 5 saves `encoder.layers…`, kohya and LDM files say `text_model.encoder.layers…`
            paths.append(
                path[len("text_model.") :]
                if path.startswith("text_model.")
                else "text_model." + path
            )
        for q in paths:
            self.dotted.setdefault((component, q), target)
            for p in kohya_prefixes:
                self.kohya.setdefault(p + underscored(q), target)

    def _index_unet(self, unet_paths: list[tuple[str, str]], ldm: bool) -> None:
        """unet_paths: (path in that naming, target). Registers both diffusers and LDM spellings."""
        names = [p for p, _ in unet_paths]
        if ldm:
            lpb = self.ldm_lpb = ldm_layers_per_block(names)
            for p, t in unet_paths:
                self._add("unet", p, t, ["lora_unet_"])
                d = ldm_unet_to_diffusers(p, lpb)
                if d is not None:
                    self._add("unet", d, t, ["lora_unet_"])
        else:
            lpb, attn = diffusers_layout(names)
            for p, t in unet_paths:
                self._add("unet", p, t, ["lora_unet_"])
                m = diffusers_unet_to_ldm(p, lpb, attn)
                if m is not None:
                    self._add("unet", m, t, ["lora_unet_"])

    def _index_ldm(self, modules: list[str]) -> None:
        unet = [(m[len(LDM_UNET) :], m) for m in modules if m.startswith(LDM_UNET)]
        self._index_unet(unet, ldm=True)
        two_te = any(m.startswith(LDM_TE[1]) for m in modules)
        for m in modules:
            if m.startswith(LDM_TE[0]):
                self._add("text_encoder", m[len(LDM_TE[0]) :], m, ["lora_te_", "lora_te1_"])
            elif m.startswith(LDM_TE[1]):
                self._add(
                    "text_encoder",
                    m[len(LDM_TE[1]) :],
                    m,
                    ["lora_te1_"] + ([] if two_te else ["lora_te_"]),
                )
        self._index_openclip()

    def _index_openclip(self) -> None:
        """OpenCLIP text towers (SD2 `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`).

        HF CLIP names map onto OpenCLIP ones (`mlp.fc1` -> `mlp.c_fc`, `self_attn.out_proj` ->
        `attn.out_proj`); q/k/v are fused in `attn.in_proj_weight` [3d, d], so their targets are
        `<…>.attn.in_proj#0/1/2`: a third of that tensor (see `split_target`).
        """
        for prefix, comp, kohya in OPENCLIP:
            blocks = {
                int(m.group(1))
                for k in self.keys
                if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))
            }
            for i in blocks:
                src = f"{prefix}transformer.resblocks.{i}."
                dst = f"text_model.encoder.layers.{i}."
                pairs = {
                    "mlp.fc1": "mlp.c_fc",
                    "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj",
                }
                for hf, oc in pairs.items():
                    if f"{src}{oc}.weight" in self.key_set:
                        self._add(comp, dst + hf, src + oc, kohya)
                        self.names[src + oc] = (comp, dst + hf)
                if f"{src}attn.in_proj_weight" in self.key_set:
                    for j, qkv in enumerate(("q_proj", "k_proj", "v_proj")):
                        self._add(comp, f"{dst}self_attn.{qkv}", f"{src}attn.in_proj#{j}", kohya)
                        self.names[f"{src}attn.in_proj#{j}"] = (comp, f"{dst}self_attn.{qkv}")

    def _index_pipeline(self, modules: list[str]) -> None:
        unet = [(m[len("unet/") :], m) for m in modules if m.startswith("unet/")]
        self._index_unet(unet, ldm=False)
        for m in modules:
            comp, path = m.split("/", 1)
            if comp == "text_encoder":
                self._add(comp, path, m, ["lora_te_", "lora_te1_"])
            elif comp == "text_encoder_2":
                self._add(comp, path, m, ["lora_te2_"])
            elif comp == "transformer":
                self._add(comp, path, m, ["lora_transformer_", "lora_unet_"])
            elif comp != "unet":
                self._add(comp, path, m, [])

    def _index_plain(self, modules: list[str]) -> None:
        unet_like = self.unet_like = any(
            m.startswith(("down_blocks.", "conv_in", "transformer_blocks.")) for m in modules
        )
        if unet_like:
            self._index_unet([(m, m) for m in modules], ldm=False)
        for m in modules:
            self._add("", m, m, ["lora_", "lora_unet_", "lora_te_", "lora_transformer_"])

    def name_of(self, target: str) -> tuple[str, str]:
        """(component, dotted diffusers/transformers path) of a base module prefix."""
        if target in self.names:
            return self.names[target]
        if self.layout == "pipeline":
            comp, _, path = target.partition("/")
            return comp, path
        if self.layout == "ldm":
            if target.startswith(LDM_UNET):
                raw = target[len(LDM_UNET) :]
                d = ldm_unet_to_diffusers(raw + ".weight", self.ldm_lpb)
                return "unet", (d[: -len(".weight")] if d else raw)
            for p in LDM_TE:
                if target.startswith(p):
                    return "text_encoder", target[len(p) :]
            return "", target
        return ("unet" if self.unet_like else ""), target

    def resolve(self, component: str, path: str, dotted: bool) -> str | None:
        """The base module prefix an adapter module applies to, or None."""
        if not dotted:
            return self.kohya.get(path)
        hit = self.dotted.get((component, path))
        if hit is None and self.layout == "plain":
            # a component-qualified adapter (diffusers `unet.`) applied to a bare component model
            hit = self.dotted.get(("", path)) or self.dotted.get(("unet", path))
        if hit is None and component == "" and self.layout == "pipeline":
            hits = [t for (c, p), t in self.dotted.items() if p == path]
            hit = hits[0] if len(hits) == 1 else None
        return hit


# ---- built-in SD1.x / SDXL tables (module names of the standard architectures, no weights) ----

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    layers_per_block=2,
)


@functools.lru_cache(maxsize=2)
def builtin_sd_keys(arch: str) -> tuple[str, ...]:
    """Parameter names (pipeline layout) of SD1.x (`sd1`) or SDXL (`sdxl`), built on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    keys: list[str] = []
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD15_UNET if arch == "sd1" else SDXL_UNET))  # type: ignore[arg-type]
        keys += [f"unet/{k}" for k in unet.state_dict()]  # type: ignore[attr-defined]
        te = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
            )
        )
        keys += [f"text_encoder/{k}" for k in te.state_dict()]
        if arch == "sdxl":
            te2 = CLIPTextModelWithProjection(
                CLIPTextConfig(
                    hidden_size=1280,
                    intermediate_size=5120,
                    num_hidden_layers=32,
                    num_attention_heads=20,
                    projection_dim=1280,
                )
            )
            keys += [f"text_encoder_2/{k}" for k in te2.state_dict()]
    return tuple(keys)
