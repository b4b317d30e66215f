"""Diffusion checkpoints as merge inputs and outputs; SD presets (weighted sum, add difference,
block weights) run as recipes; the inpainting conv_in rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge.api import merge_expression, run_recipe
from merge.errors import PlanError
from merge.io.detect import open_checkpoint
from merge.sd import (
    ARCH_BLOCKS,
    align_inpainting,
    block_of,
    block_weight_recipe,
    parse_block_weights,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _recipe(name: str, **inputs: Path) -> dict:
    r = yaml.safe_load((RECIPES / name).read_text())
    r["inputs"] = {k: str(v) for k, v in inputs.items()}
    return r


def _unet(path: Path) -> dict[str, torch.Tensor]:
    src = open_checkpoint(path)  # a pipeline source: reads sharded components through their index
    return {k[5:]: src.read(k) for k in src.keys() if k.startswith("unet/")}


def test_weighted_sum_of_pipelines_is_a_loadable_pipeline(pipes: dict, work: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = run_recipe(_recipe("sd-weighted-sum.yaml", A=pipes["A"], B=pipes["B"]), work / "ws_pipe")
    a, b, got = _unet(pipes["A"]), _unet(pipes["B"]), _unet(out)
    for k in a:
        torch.testing.assert_close(got[k], 0.7 * a[k] + 0.3 * b[k], atol=1e-6, rtol=1e-6)
    te = load_file(out / "text_encoder" / "model.safetensors")
    te_a = load_file(pipes["A"] / "text_encoder" / "model.safetensors")
    te_b = load_file(pipes["B"] / "text_encoder" / "model.safetensors")
    k = "encoder.layers.0.mlp.fc1.weight"
    torch.testing.assert_close(te[k], 0.7 * te_a[k] + 0.3 * te_b[k])
    pipe = StableDiffusionPipeline.from_pretrained(
        out,
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    torch.testing.assert_close(pipe.unet.state_dict()["conv_in.weight"], got["conv_in.weight"])
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (
        out / "model_index.json"
    ).is_file()


def test_add_difference_single_file(pipes: dict, work: Path) -> None:
    out = run_recipe(
        _recipe(
            "sd-add-difference.yaml", A=pipes["single_A"], B=pipes["single_B"], C=pipes["single_C"]
        ),
        work / "ad.safetensors",
    )
    a, b, c, got = (
        load_file(p) for p in (pipes["single_A"], pipes["single_B"], pipes["single_C"], out)
    )
    assert list(got) == list(a) or set(got) == set(a)
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k], v + (b[k] - c[k]), atol=1e-6, rtol=1e-6)
    assert torch.equal(
        got["cond_stage_model.transformer.text_model.embeddings.position_ids"],
        torch.arange(77)[None],
    )


# The tiny test UNet has fewer blocks than SD1.x/SDXL, so some block overrides match nothing.
@pytest.mark.filterwarnings("ignore:overrides.*matches no tensor:merge.errors.MergeWarning")
def test_block_weights_recipe_on_pipelines_and_single_files(pipes: dict, work: Path) -> None:
    w = (
        [0.5] + [1.0] * 12 + [0.3] + [0.0] * 11 + [0.8]
    )  # BASE, IN00..IN11, M00, OUT00..OUT10, OUT11
    recipe = block_weight_recipe(str(pipes["A"]), str(pipes["B"]), w, arch="sd1")
    out = run_recipe(recipe, work / "bw_pipe")
    a, b, got = _unet(pipes["A"]), _unet(pipes["B"]), _unet(out)
    table = {
        blk: wi
        for blk, wi in zip(
            ["BASE"]
            + [f"IN{i:02d}" for i in range(12)]
            + ["M00"]
            + [f"OUT{i:02d}" for i in range(12)],
            w,
        )
    }
    seen = set()
    for k in a:
        alpha = table[block_of("unet/" + k)]
        seen.add(block_of("unet/" + k))
        torch.testing.assert_close(
            got[k], (1 - alpha) * a[k] + alpha * b[k], atol=1e-6, rtol=1e-6, msg=k
        )
    assert {"IN00", "IN04", "M00", "OUT02", "OUT11"} <= seen
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(
        out / "unet"
    ).state_dict()  # sharded or not, it loads
    torch.testing.assert_close(
        loaded["mid_block.resnets.0.conv1.weight"], got["mid_block.resnets.0.conv1.weight"]
    )
    te = {
        k[13:]: v
        for k, v in ((k, open_checkpoint(out).read(k)) for k in open_checkpoint(out).keys())
        if k.startswith("text_encoder/")
    }
    ta, tb = (load_file(p / "text_encoder" / "model.safetensors") for p in (pipes["A"], pipes["B"]))
    k = "encoder.layers.1.self_attn.k_proj.weight"
    torch.testing.assert_close(te[k], 0.5 * ta[k] + 0.5 * tb[k])  # BASE weight
    # the same recipe on single files (LDM names) gives the same UNet
    single = run_recipe(
        block_weight_recipe(str(pipes["single_A"]), str(pipes["single_B"]), w, arch="sd1"),
        work / "bw.safetensors",
    )
    s = load_file(single)
    torch.testing.assert_close(
        s["model.diffusion_model.input_blocks.4.1.proj_in.weight"],
        got["down_blocks.1.attentions.0.proj_in.weight"],
    )
    torch.testing.assert_close(s["model.diffusion_model.out.2.weight"], got["conv_out.weight"])


def test_sdxl_block_table() -> None:
    assert (
        block_of(
            "model.diffusion_model.input_blocks.8.1.transformer_blocks.3.attn1.to_q.weight", "sdxl"
        )
        == "IN08"
    )
    assert (
        block_of("model.diffusion_model.output_blocks.8.0.skip_connection.weight", "sdxl")
        == "OUT08"
    )
    assert block_of("model.diffusion_model.out.2.weight", "sdxl") == "OUT08"
    assert block_of("conditioner.embedders.1.model.ln_final.weight", "sdxl") == "BASE"
    w26 = [float(i) for i in range(26)]
    assert parse_block_weights(w26, "sdxl") == [float(i) for i in range(10)] + [
        float(i) for i in range(13, 23)
    ]
    with pytest.raises(
        Exception, match=r"block weights for sd1 need 26 values \(BASE, IN00, IN01, ...\), got 3"
    ):
        parse_block_weights("1,2,3", "sd1")


def test_inpainting_conv_in_rule(pipes: dict, work: Path) -> None:
    a = load_file(pipes["single_A"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    g = torch.Generator().manual_seed(5)
    a[key] = torch.cat(
        [a[key], torch.randn(a[key].shape[0], 5, 3, 3, generator=g)], dim=1
    )  # 9 channels
    save_file(a, work / "inpaint_A.safetensors")
    srcs = align_inpainting(
        {
            "A": open_checkpoint(work / "inpaint_A.safetensors"),
            "B": open_checkpoint(pipes["single_B"]),
        },
        "A",
    )
    out = merge_expression("0.6 * A + 0.4 * B", srcs, work / "inpaint_ws.safetensors")
    got, b = load_file(out), load_file(pipes["single_B"])
    torch.testing.assert_close(got[key][:, :4], 0.6 * a[key][:, :4] + 0.4 * b[key])
    torch.testing.assert_close(got[key][:, 4:], a[key][:, 4:])
    c = {
        "A": open_checkpoint(pipes["single_B"]),
        "B": open_checkpoint(work / "inpaint_A.safetensors"),
    }
    with pytest.raises(
        PlanError,
        match=r"has 9 input channels in .*inpaint_A.safetensors but 4 in .*: when merging an inpainting \(9-channel\) or instruct-pix2pix \(8-channel\) model with a normal one, the special model must be the first input \(A\)",
    ):
        align_inpainting(c, "A")


def test_lora_into_sd_recipe(sd: dict, work: Path) -> None:
    """`base + 0.8 * style + 0.4 * other_lora` with a diffusers LoRA and a kohya one."""
    from merge.lora.convert import convert

    kohya = convert(sd["lora"], "kohya", work / "style_kohya.safetensors", force=True)
    r = _recipe("lora-into-sd.yaml", base=sd["pipe"], style=sd["lora"], other_lora=kohya)
    out = run_recipe(r, work / "lora_recipe_out")
    got = _unet(out)
    base = _unet(sd["pipe"])
    k = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    delta07 = sd["fused07"][f"unet/{k}"] - base[k]  # the LoRA at 0.7
    torch.testing.assert_close(got[k], base[k] + (1.2 / 0.7) * delta07, atol=1e-5, rtol=1e-5)


# The tiny test UNet has fewer blocks than SD1.x/SDXL, so some block overrides match nothing.
@pytest.mark.filterwarnings("ignore:overrides.*matches no tensor:merge.errors.MergeWarning")
def test_block_weight_recipe_files_run(pipes: dict, work: Path) -> None:
    """recipes/sd15-block-weights.yaml and sdxl-block-weights.yaml run (on the tiny SD1-style pipelines)."""
    for name, arch in (("sd15-block-weights.yaml", "sd1"), ("sdxl-block-weights.yaml", "sdxl")):
        r = _recipe(name, A=pipes["A"], B=pipes["B"])
        w = parse_block_weights(r["description"].split(": ")[1], arch)
        out = run_recipe(r, work / f"bw_file_{arch}")
        a, b, got = _unet(pipes["A"]), _unet(pipes["B"]), _unet(out)
        table = dict(zip(ARCH_BLOCKS[arch], w))
        for k in a:
            alpha = table[block_of("unet/" + k, arch)]
            torch.testing.assert_close(
                got[k], (1 - alpha) * a[k] + alpha * b[k], atol=1e-6, rtol=1e-6, msg=f"{arch} {k}"
            )
