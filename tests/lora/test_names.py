"""diffusers <-> LDM UNet names (reference §5.3) and kohya name resolution on every layout."""

from __future__ import annotations

import pytest

from merge.lora.names import (
    BaseIndex,
    builtin_sd_keys,
    diffusers_layout,
    diffusers_unet_to_ldm,
    ldm_unet_to_diffusers,
)


@pytest.mark.parametrize(
    ("diffusers", "ldm", "attn"),
    [
        ("down_blocks.1.attentions.0.proj_in.weight", "input_blocks.4.1.proj_in.weight", {1, 2, 3}),
        ("down_blocks.0.resnets.1.conv1.weight", "input_blocks.2.0.in_layers.2.weight", {1, 2, 3}),
        ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight", {1, 2, 3}),
        (
            "mid_block.resnets.1.time_emb_proj.weight",
            "middle_block.2.emb_layers.1.weight",
            {1, 2, 3},
        ),
        (
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            {1, 2, 3},
        ),
        (
            "up_blocks.0.upsamplers.0.conv.weight",
            "output_blocks.2.1.conv.weight",
            {1, 2, 3},
        ),  # SD1 up block 0: no attention
        ("up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight", {1, 2, 3}),
        (
            "up_blocks.3.resnets.2.conv_shortcut.weight",
            "output_blocks.11.0.skip_connection.weight",
            {1, 2, 3},
        ),
        ("time_embedding.linear_2.weight", "time_embed.2.weight", set()),
        ("conv_out.bias", "out.2.bias", set()),
    ],
)
def test_known_pairs(diffusers: str, ldm: str, attn: set[int]) -> None:
    assert diffusers_unet_to_ldm(diffusers, 2, attn) == ldm
    assert ldm_unet_to_diffusers(ldm, 2) == diffusers


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_round_trip_on_real_architectures(arch: str) -> None:
    keys = [k[len("unet/") :] for k in builtin_sd_keys(arch) if k.startswith("unet/")]
    lpb, attn = diffusers_layout(keys)
    ldm = {k: diffusers_unet_to_ldm(k, lpb, attn) for k in keys}
    assert all(v is not None for v in ldm.values()), [k for k, v in ldm.items() if v is None][:5]
    assert len(set(ldm.values())) == len(keys)
    assert all(ldm_unet_to_diffusers(v, lpb) == k for k, v in ldm.items())  # type: ignore[arg-type]


def test_kohya_names_resolve_on_pipeline_and_ldm_layouts() -> None:
    keys = list(builtin_sd_keys("sdxl"))
    idx = BaseIndex(keys)
    assert idx.layout == "pipeline"
    # kohya SDXL spells the UNet with SGM names, diffusers exports with diffusers names: both resolve
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    diff = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert (
        idx.resolve("unet", sgm, False)
        == idx.resolve("unet", diff, False)
        == "unet/down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    assert (
        idx.resolve("text_encoder_2", "lora_te2_text_model_encoder_layers_3_mlp_fc1", False)
        == "text_encoder_2/text_model.encoder.layers.3.mlp.fc1"
        or idx.resolve("text_encoder_2", "lora_te2_text_model_encoder_layers_3_mlp_fc1", False)
        == "text_encoder_2/encoder.layers.3.mlp.fc1"
    )
    lpb, attn = diffusers_layout([k[5:] for k in keys if k.startswith("unet/")])
    ldm_keys = [
        "model.diffusion_model." + diffusers_unet_to_ldm(k[5:], lpb, attn)
        for k in keys
        if k.startswith("unet/")
    ]  # type: ignore[operator]
    ldm = BaseIndex(ldm_keys)
    assert ldm.layout == "ldm"
    assert (
        ldm.resolve("unet", diff, False)
        == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    )
    assert ldm.resolve(
        "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", True
    ) == ldm.resolve("unet", sgm, False)
