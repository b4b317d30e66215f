"""Bake equals peft merge_and_unload (tiny Llama, DoRA included) and diffusers fuse_lora (tiny SD)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge.lora.bake import bake


def _load_dir(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= {prefix + k: v for k, v in load_file(f).items()}
    return out


@pytest.mark.parametrize("variant", ["plain", "patterns", "dora", "bias"])
def test_bake_equals_merge_and_unload(llama: dict, work: Path, variant: str) -> None:
    out = bake(llama["base"], [(llama["adapters"][variant], 1.0)], work / f"baked_{variant}")
    got = _load_dir(out)
    ref = llama["merged"][variant]
    changed = 0
    for k, v in ref.items():
        if k == "lm_head.weight" and k not in got:
            continue  # tied weights are saved once
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=f"{variant}: {k}")
        base = _load_dir(llama["base"]).get(k)
        changed += int(base is not None and not torch.equal(base, v))
    assert changed >= 4  # the adapters really change several tensors
    assert (out / "config.json").is_file()  # support files copied: loadable model folder


def test_bake_dora_at_scale_inside_norm(llama: dict, work: Path) -> None:
    """0.8 · dora means peft's scale (0.8·alpha/r) inside the DoRA norm, not 0.8 × the change."""
    out = bake(llama["base"], [(llama["adapters"]["dora"], 0.8)], work / "baked_dora08")
    got = _load_dir(out)
    ref = llama["merged08"]["dora"]
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-5)
    full = llama["merged"]["dora"][key]
    base = _load_dir(llama["base"])[key]
    assert not torch.allclose(got[key], base + 0.8 * (full - base), atol=1e-5)


def test_bake_scale_equals_peft_scale_layer(llama: dict, work: Path) -> None:
    out = bake(llama["base"], [(llama["adapters"]["patterns"], 0.8)], work / "baked_patterns08")
    got = _load_dir(out)
    base = _load_dir(llama["base"])
    emb = "model.embed_tokens.weight"
    for k, v in llama["merged08"]["patterns"].items():
        if k in got and k not in (emb, "lm_head.weight"):
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=k)
    # peft's scale_layer skips embedding LoRAs (it only looks at lora_A), so the reference there is
    # the formula: W + 0.8 · ΔW_full
    full = llama["merged"]["patterns"][emb] - base[emb]
    assert full.abs().max() > 0.1
    torch.testing.assert_close(got[emb], base[emb] + 0.8 * full, atol=1e-5, rtol=1e-5)
    # modules_to_save (lm_head) is a full tensor: as a delta it is scaled too (peft would replace it)
    head = "lm_head.weight"
    if head in got:
        torch.testing.assert_close(
            got[head],
            base[head] + 0.8 * (llama["merged"]["patterns"][head] - base[head]),
            atol=1e-6,
            rtol=1e-5,
        )


def test_bake_pipeline_equals_fuse_lora(sd: dict, work: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = bake(sd["pipe"], [(sd["lora"], 0.7)], work / "baked_pipe")
    got = _load_dir(out / "unet", "unet/") | _load_dir(out / "text_encoder", "text_encoder/")
    ref = sd["fused07"]
    n_changed = 0
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=k)
        if k in sd["base_unet"] and not torch.equal(sd["base_unet"][k], v):
            n_changed += 1
    assert n_changed > 40  # attention, 1x1 proj_in, 3x3 resnet convs, shortcut
    pipe = StableDiffusionPipeline.from_pretrained(
        out,
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    torch.testing.assert_close(pipe.unet.state_dict()["conv_in.weight"], ref["unet/conv_in.weight"])
    key = "down_blocks.1.attentions.0.proj_in.weight"
    torch.testing.assert_close(pipe.unet.state_dict()[key], ref[f"unet/{key}"])


def test_bake_into_single_file_ldm_checkpoint(sd: dict, work: Path) -> None:
    """A single-file SD checkpoint (LDM keys) is baked in place of its names and written back as one file."""
    from safetensors.torch import save_file

    from merge.lora.names import diffusers_layout, diffusers_unet_to_ldm

    unet = _load_dir(sd["pipe"] / "unet")
    te = _load_dir(sd["pipe"] / "text_encoder")
    lpb, attn = diffusers_layout(unet)
    ldm = {
        "model.diffusion_model." + diffusers_unet_to_ldm(k, lpb, attn): v for k, v in unet.items()
    }  # type: ignore[operator]
    ldm |= {"cond_stage_model.transformer.text_model." + k: v for k, v in te.items()}
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(ldm, work / "sd_single.safetensors")
    out = bake(
        work / "sd_single.safetensors", [(sd["lora"], 0.7)], work / "sd_single_baked.safetensors"
    )
    got = load_file(out)
    assert set(got) == set(ldm)
    for k in unet:
        lk = "model.diffusion_model." + diffusers_unet_to_ldm(k, lpb, attn)  # type: ignore[operator]
        torch.testing.assert_close(
            got[lk], sd["fused07"][f"unet/{k}"], atol=1e-6, rtol=1e-5, msg=lk
        )
    k = "encoder.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(
        got["cond_stage_model.transformer.text_model." + k],
        sd["fused07"][f"text_encoder/{k}"],
        atol=1e-6,
        rtol=1e-5,
    )
    assert torch.equal(
        got["cond_stage_model.transformer.text_model.embeddings.position_ids"],
        torch.arange(77)[None],
    )
