"""Stable Diffusion checkpoint-merge presets: weighted sum and add difference per UNet block
(the IN/MID/OUT block-weight tables of SD1.x and SDXL, as recipe overrides), and the
inpainting conv_in rule (through the view `merge.io.views.ChannelAligned`).

Block tables (reference §5.2, supermerger/kohya): SD1.x has 26 weights
`BASE, IN00..IN11, M00, OUT00..OUT11`; SDXL has 20 `BASE, IN00..IN08, M00, OUT00..OUT08`.
`input_blocks.i` -> IN{i}, `middle_block` -> M00, `output_blocks.j` -> OUT{j}; `time_embed`
counts as IN00 and the final `out.` as OUT11 (SDXL: OUT08); everything else (text encoders, VAE)
is BASE. The same blocks are recognised in diffusers names (`down_blocks.b.resnets.j` = IN{1+3b+j},
…) so one recipe fits a pipeline folder and a single-file checkpoint alike.
"""

from __future__ import annotations

import re
from typing import Any

from merge.errors import UsageError
from merge.io.sources import TensorSource
from merge.io.views import ChannelAligned

SD1_BLOCKS = (
    ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
)
SDXL_BLOCKS = (
    ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
)
ARCH_BLOCKS = {"sd1": SD1_BLOCKS, "sdxl": SDXL_BLOCKS}
LPB = 2  # layers_per_block of SD1.x and SDXL: 3 LDM slots per diffusers block


def block_regex(block: str, arch: str) -> str | None:
    """A regex matching every UNet tensor of `block`, in LDM and diffusers (pipeline) names."""
    n = LPB + 1
    ldm = r"(?:^|\.)diffusion_model\."
    diff = r"^(?:unet/)?"
    last_out = len(ARCH_BLOCKS[arch]) // 2 - 2  # OUT11 (SD1) / OUT08 (SDXL)
    if block == "BASE":
        return None
    if block == "M00":
        return rf"({ldm}middle_block\.|{diff}mid_block\.)"
    kind, i = block[:-2], int(block[-2:])
    if kind == "IN":
        if i == 0:
            return rf"({ldm}(input_blocks\.0\.|time_embed\.|label_emb\.)|{diff}(conv_in\.|time_embedding\.|add_embedding\.))"
        b, slot = (i - 1) // n, (i - 1) % n
        inner = r"downsamplers\.0\." if slot == LPB else rf"(resnets|attentions)\.{slot}\."
        return rf"({ldm}input_blocks\.{i}\.|{diff}down_blocks\.{b}\.{inner})"
    b, slot = i // n, i % n
    inner = rf"(resnets|attentions)\.{slot}\." + (r"|upsamplers\.0\." if slot == LPB else "")
    extra = rf"|{ldm}out\.|{diff}conv_(norm_)?out\." if i == last_out else ""
    return rf"({ldm}output_blocks\.{i}\.|{diff}up_blocks\.{b}\.({inner}){extra})"


def block_of(name: str, arch: str = "sd1") -> str:
    """The block ID of a tensor name (BASE for anything outside the UNet's blocks)."""
    for block in ARCH_BLOCKS[arch][1:]:
        rx = block_regex(block, arch)
        if rx is not None and re.search(rx, name):
            return block
    return "BASE"


def parse_block_weights(text: str | list[float], arch: str) -> list[float]:
    """26 (SD1.x) or 20 (SDXL) comma-separated weights, BASE first; a 26-value string for SDXL is
    converted as supermerger does (w[:9] + w[12:22] + [0] → IN00..IN08, M00, OUT00..OUT08)."""
    vals = (
        [float(x) for x in text.split(",")] if isinstance(text, str) else [float(x) for x in text]
    )
    want = len(ARCH_BLOCKS[arch])
    if arch == "sdxl" and len(vals) == 26:
        vals = vals[:10] + vals[13:23]
    if len(vals) != want:
        raise UsageError(
            f"block weights for {arch} need {want} values ({', '.join(ARCH_BLOCKS[arch][:3])}, ...), got {len(vals)}"
        )
    return vals


def block_weight_recipe(
    a: str,
    b: str,
    weights: str | list[float],
    *,
    arch: str = "sd1",
    c: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """A recipe merging per UNet block: weighted sum (1−α_blk)·A + α_blk·B, or with `c` add
    difference A + α_blk·(B − C). α for BASE applies to every other tensor. Pure core recipe:
    a `linear` step plus one override per block and input."""
    w = parse_block_weights(weights, arch)
    blocks = ARCH_BLOCKS[arch]
    inputs = {"A": a, "B": b} | ({"C": c} if c else {})
    if c is None:
        models = {"A": {"weight": 1 - w[0]}, "B": {"weight": w[0]}}
    else:
        models = {"A": {"weight": 1.0}, "B": {"weight": w[0]}, "C": {"weight": -w[0]}}
    overrides: list[dict[str, Any]] = []
    # `optional`: a block table covers every SD layout, and a given model may lack some blocks.
    for blk, alpha in zip(blocks[1:], w[1:]):
        rx = block_regex(blk, arch)
        if alpha == w[0]:
            continue
        if c is None:
            overrides += [
                {
                    "regex": rx,
                    "step": "merged",
                    "input": "A",
                    "optional": True,
                    "weight": 1 - alpha,
                },
                {"regex": rx, "step": "merged", "input": "B", "optional": True, "weight": alpha},
            ]
        else:
            overrides += [
                {"regex": rx, "step": "merged", "input": "B", "optional": True, "weight": alpha},
                {"regex": rx, "step": "merged", "input": "C", "optional": True, "weight": -alpha},
            ]
    recipe: dict[str, Any] = {
        "version": 1,
        "description": f"{arch} block-weight {'add difference' if c else 'weighted sum'}: {','.join(f'{x:g}' for x in w)}",
        "inputs": inputs,
        "steps": {"merged": {"method": "linear", "models": models, "normalize": False}},
        "output": {"copy_files_from": "A"},
        "overrides": overrides,
        "options": {"keys": "union"},
    }
    if output:
        recipe["output"]["path"] = output
    return recipe


def align_inpainting(sources: dict[str, TensorSource], primary: str) -> dict[str, TensorSource]:
    """Every input but `primary` wrapped by ChannelAligned against it."""
    p = sources[primary]
    return {n: (s if n == primary else ChannelAligned(s, p)) for n, s in sources.items()}
