"""More layouts: GPT-2 fan_in_fan_out, conv DoRA on a UNet, mixed-format combine on a pipeline,
extraction from pipelines (diffusers file) and single files (kohya file)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge.io.detect import open_checkpoint
from merge.lora.bake import bake
from merge.lora.combine import combine
from merge.lora.convert import convert
from merge.lora.extract import extract
from merge.lora.source import open_lora


def _dir_state(path: Path) -> dict[str, torch.Tensor]:
    src = open_checkpoint(path)
    return {k: src.read(k) for k in src.keys()}


def test_gpt2_fan_in_fan_out(work: Path) -> None:
    from conftest import randomize_lora  # type: ignore[import-not-found]
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(work / "gpt2")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            GPT2LMHeadModel(cfg),
            LoraConfig(
                r=4,
                lora_alpha=8,
                fan_in_fan_out=True,
                target_modules=["c_attn", "c_fc"],
                init_lora_weights=False,
            ),
        )
        randomize_lora(pm, 1)
        pm.save_pretrained(work / "gpt2_lora")
        ref = pm.merge_and_unload().state_dict()
    got = _dir_state(bake(work / "gpt2", [(work / "gpt2_lora", 1.0)], work / "gpt2_baked"))
    for k in got:
        if k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)
    assert not torch.equal(
        got["transformer.h.0.attn.c_attn.weight"],
        _dir_state(work / "gpt2")["transformer.h.0.attn.c_attn.weight"],
    )
    # kohya has no fan_in_fan_out: the converted file stores the transposed product, same delta
    k = convert(work / "gpt2_lora", "kohya", work / "gpt2_kohya.safetensors")
    base = open_checkpoint(work / "gpt2")
    a, b = open_lora(work / "gpt2_lora", base), open_lora(k, base)
    for name in a.keys():
        torch.testing.assert_close(b.read(name), a.read(name), atol=1e-6, rtol=1e-6)


def test_conv_dora_on_unet(work: Path) -> None:
    from conftest import make_unet, randomize_lora  # type: ignore[import-not-found]
    from peft import LoraConfig, get_peft_model

    make_unet().save_pretrained(work / "unet_only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            make_unet(),
            LoraConfig(
                r=4,
                lora_alpha=4,
                use_dora=True,
                target_modules=["conv1", "to_q", "proj_in"],
                init_lora_weights=False,
            ),
        )
        randomize_lora(pm, 2)
        pm.save_pretrained(work / "unet_dora")
        ref = pm.merge_and_unload().state_dict()
    got = _dir_state(
        bake(work / "unet_only", [(work / "unet_dora", 1.0)], work / "unet_dora_baked")
    )
    n = 0
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, atol=2e-6, rtol=1e-5, msg=k)
        n += int("conv1" in k and k.endswith("weight"))
    assert n > 5


def test_mixed_format_combine_on_pipeline(sd: dict, work: Path) -> None:
    """A diffusers LoRA and its kohya copy combine exactly: 0.5·Δ + 1.5·Δ = 2·Δ."""
    kohya = convert(sd["lora"], "kohya", work / "mix_kohya.safetensors", force=True)
    report, _ = combine(
        [sd["lora"], kohya],
        [0.5, 1.5],
        work / "mix_comb.safetensors",
        base=sd["pipe"],
        fmt="diffusers",
    )
    base = open_checkpoint(sd["pipe"])
    want = open_lora(sd["lora"], base, scale=2.0)
    got = open_lora(work / "mix_comb.safetensors", base)
    assert set(got.keys()) == set(want.keys())
    for k in want.keys():
        torch.testing.assert_close(got.read(k), want.read(k), atol=1e-5, rtol=1e-5)
    assert report.exact and report.rank_out["unet/down_blocks.1.attentions.0.proj_in"] == 8


def test_extract_from_pipeline_and_single_file(sd: dict, pipes: dict, work: Path) -> None:
    from diffusers import StableDiffusionPipeline

    baked = bake(sd["pipe"], [(sd["lora"], 1.0)], work / "sd_baked_1")
    report, _ = extract(sd["pipe"], baked, work / "sd_extracted", rank=4)
    assert report.overall_energy > 0.999999  # the change is rank 4 (r = 4 UNet, 2 text encoder)
    assert (work / "sd_extracted" / "pytorch_lora_weights.safetensors").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(
            sd["pipe"],
            tokenizer=None,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.load_lora_weights(str(work / "sd_extracted"))
        pipe.fuse_lora(lora_scale=1.0, components=["unet", "text_encoder"])
        pipe.unload_lora_weights()
    want = _dir_state(baked)
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, want[f"unet/{k}"], atol=1e-4, rtol=1e-4, msg=k)
    # single file (LDM keys) -> kohya file by default, which bakes back onto the single file
    from conftest import ldm_state  # type: ignore[import-not-found]
    from safetensors.torch import save_file

    save_file(ldm_state(baked), work / "sd_baked_single.safetensors")
    save_file(ldm_state(sd["pipe"]), work / "sd_base_single.safetensors")
    extract(
        work / "sd_base_single.safetensors",
        work / "sd_baked_single.safetensors",
        work / "sd_single_lora.safetensors",
        rank=4,
    )
    keys = list(safe_open(work / "sd_single_lora.safetensors", "pt").keys())
    assert (
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight" in keys
    )  # diffusers-style kohya names
    out = load_file(
        bake(
            work / "sd_base_single.safetensors",
            [(work / "sd_single_lora.safetensors", 1.0)],
            work / "sd_rebaked.safetensors",
        )
    )
    ref = load_file(work / "sd_baked_single.safetensors")
    for k, v in ref.items():
        if v.is_floating_point():
            torch.testing.assert_close(out[k], v, atol=1e-4, rtol=1e-4, msg=k)


def test_diffusers_files_we_write_load_in_diffusers(sd: dict, work: Path) -> None:
    """Combined (exact, rank 8) and SVD-truncated (--energy: ranks differ -> rank_pattern in the
    lora_adapter_metadata) diffusers files load with load_lora_weights and fuse to our bake."""
    from diffusers import StableDiffusionPipeline

    combine([sd["lora"], sd["lora"]], [0.5, 0.5], work / "dl_exact.safetensors", fmt="diffusers")
    trunc, _ = combine(
        [sd["lora"]], [1.0], work / "dl_trunc.safetensors", energy=0.9, fmt="diffusers"
    )
    assert len(set(trunc.rank_out.values())) > 1
    for f in ("dl_exact.safetensors", "dl_trunc.safetensors"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = StableDiffusionPipeline.from_pretrained(
                sd["pipe"],
                tokenizer=None,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.load_lora_weights(str(work / f))
            pipe.fuse_lora(lora_scale=0.6, components=["unet", "text_encoder"])
            pipe.unload_lora_weights()
        ours = _dir_state(bake(sd["pipe"], [(work / f, 0.6)], work / f"dl_baked_{f}"))
        for k, v in pipe.unet.state_dict().items():
            torch.testing.assert_close(v, ours[f"unet/{k}"], atol=1e-5, rtol=1e-5, msg=f"{f} {k}")
        for k, v in pipe.text_encoder.state_dict().items():
            torch.testing.assert_close(
                v, ours[f"text_encoder/{k}"], atol=1e-5, rtol=1e-5, msg=f"{f} {k}"
            )
    # exact combine of the same LoRA with weights 0.5 + 0.5 is the LoRA itself
    k = "unet/down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base = _dir_state(sd["pipe"])
    torch.testing.assert_close(
        _dir_state(work / "dl_baked_dl_exact.safetensors")[k] - base[k],
        0.6 / 0.7 * (sd["fused07"][k] - base[k]),
        atol=1e-5,
        rtol=1e-5,
    )
