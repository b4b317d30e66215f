"""Convert: the delta is unchanged across PEFT, kohya and diffusers; written files load untouched."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge.errors import UsageError
from merge.io.detect import open_checkpoint
from merge.lora.bake import bake
from merge.lora.convert import convert
from merge.lora.source import open_lora


def deltas(adapter: Path, base: object) -> dict[str, torch.Tensor]:
    src = open_lora(adapter, base)  # type: ignore[arg-type]
    return {k: src.read(k) for k in src.keys()}


@pytest.mark.parametrize("variant", ["plain", "rank8"])
def test_peft_kohya_peft_round_trip(llama: dict, work: Path, variant: str) -> None:
    from conftest import make_llama  # type: ignore[import-not-found]
    from peft import PeftModel

    base = open_checkpoint(llama["base"])
    k = convert(llama["adapters"][variant], "kohya", work / f"{variant}_kohya.safetensors")
    keys = list(safe_open(k, "pt").keys())
    assert "lora_model_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_model_layers_0_self_attn_q_proj.alpha" in keys
    back = convert(k, "peft", work / f"{variant}_back", base=llama["base"])
    want = deltas(llama["adapters"][variant], base)
    for path in (k, back):
        got = deltas(path, base)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-6)
    merged = PeftModel.from_pretrained(make_llama(), back).merge_and_unload().state_dict()
    for name, v in llama["merged"][variant].items():
        torch.testing.assert_close(merged[name], v, atol=1e-6, rtol=1e-5)


def test_rslora_patterns_keep_the_delta(llama: dict, work: Path) -> None:
    """rsLoRA, rank/alpha patterns, embedding LoRA, modules_to_save: peft -> peft keeps every delta."""
    from conftest import make_llama  # type: ignore[import-not-found]
    from peft import PeftModel

    base = open_checkpoint(llama["base"])
    out = convert(llama["adapters"]["patterns"], "peft", work / "patterns_peft")
    want = deltas(llama["adapters"]["patterns"], base)
    got = deltas(out, base)
    assert got.keys() == want.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], atol=1e-6, rtol=1e-5)
    merged = PeftModel.from_pretrained(make_llama(), out).merge_and_unload().state_dict()
    for name, v in llama["merged"]["patterns"].items():
        torch.testing.assert_close(merged[name], v, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(
        UsageError,
        match=r"has modules_to_save tensors \(lm_head.weight, .*\) that only a PEFT adapter can hold; use --to peft",
    ):
        convert(llama["adapters"]["patterns"], "diffusers", work / "patterns_diffusers.safetensors")
    with pytest.raises(
        UsageError,
        match=r"kohya files have no embedding LoRA; `model.embed_tokens` cannot be written \(use --to peft\)",
    ):
        convert(llama["adapters"]["rank8"], "peft", work / "r8") and convert(
            _without_full(llama, work), "kohya", work / "patterns_kohya.safetensors"
        )


def _without_full(llama: dict, work: Path) -> Path:
    """The patterns adapter without its modules_to_save tensors (a file of LoRA factors only)."""
    t = load_file(llama["adapters"]["patterns"] / "adapter_model.safetensors")
    t = {k: v for k, v in t.items() if "lora_" in k}
    save_file(t, work / "patterns_factors.safetensors")
    return work / "patterns_factors.safetensors"


def test_dora_to_kohya_bakes_the_same(llama: dict, work: Path) -> None:
    k = convert(llama["adapters"]["dora"], "kohya", work / "dora_kohya.safetensors")
    f = safe_open(k, "pt")
    assert list(f.get_slice("lora_model_layers_0_self_attn_q_proj.dora_scale").get_shape()) == [
        32,
        1,
    ]
    out = bake(llama["base"], [(k, 1.0)], work / "dora_kohya_baked")
    got = load_file(next(out.glob("*.safetensors")))
    for name, v in llama["merged"]["dora"].items():
        if name in got:
            torch.testing.assert_close(got[name], v, atol=1e-6, rtol=1e-5)


def test_kohya_file_loads_in_diffusers_and_matches_our_bake(sd: dict, work: Path) -> None:
    """Kohya file from a diffusers LoRA: diffusers load_lora_weights + fuse gives our bake's UNet output."""
    from diffusers import StableDiffusionPipeline

    k = convert(sd["lora"], "kohya", work / "sd_kohya.safetensors")
    keys = list(safe_open(k, "pt").keys())
    assert "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    # diffusers 0.42 cannot load kohya text-encoder keys for transformers 5 CLIP ("Could not
    # automatically infer state dict type"), so diffusers gets the UNet part, untouched
    unet_only = {n: v for n, v in load_file(k).items() if n.startswith("lora_unet_")}
    save_file(unet_only, work / "sd_kohya_unet.safetensors", metadata=safe_open(k, "pt").metadata())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(
            sd["pipe"],
            tokenizer=None,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.load_lora_weights(str(work / "sd_kohya_unet.safetensors"))
        pipe.fuse_lora(lora_scale=0.7, components=["unet"])
        pipe.unload_lora_weights()
    ours = bake(sd["pipe"], [(work / "sd_kohya_unet.safetensors", 0.7)], work / "sd_kohya_baked")
    from diffusers import UNet2DConditionModel

    our_unet = UNet2DConditionModel.from_pretrained(ours / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, t, ctx = (
        torch.randn(1, 4, 32, 32, generator=g),
        torch.tensor([10]),
        torch.randn(1, 5, 32, generator=g),
    )
    with torch.no_grad():
        y_ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        y_ours = our_unet(x, t, encoder_hidden_states=ctx).sample
        base_unet = UNet2DConditionModel.from_pretrained(sd["pipe"] / "unet").eval()
        y_base = base_unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(y_ours, y_ref, atol=1e-5, rtol=1e-4)
    assert float((y_ours - y_base).abs().max()) > 1e-2  # the LoRA really acts
    # and our kohya UNet deltas equal the diffusers file's fuse at the same scale
    for name, v in sd["fused07"].items():
        if name.startswith("unet/"):
            torch.testing.assert_close(our_unet.state_dict()[name[5:]], v, atol=1e-6, rtol=1e-5)


def test_kohya_to_diffusers_with_builtin_sd_table(work: Path) -> None:
    """Kohya SD1.x names become dotted ones without --base (built-in SD1.x table)."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te = "lora_te_text_model_encoder_layers_11_mlp_fc2"
    g = torch.Generator().manual_seed(1)
    t = {
        f"{name}.lora_down.weight": torch.randn(4, 320, generator=g),
        f"{name}.lora_up.weight": torch.randn(320, 4, generator=g),
        f"{name}.alpha": torch.tensor(1.0),
        f"{te}.lora_down.weight": torch.randn(4, 3072, generator=g),
        f"{te}.lora_up.weight": torch.randn(768, 4, generator=g),
        f"{te}.alpha": torch.tensor(2.0),
    }
    save_file(t, work / "sd1_kohya.safetensors")
    out = convert(work / "sd1_kohya.safetensors", "diffusers", work / "sd1_diffusers.safetensors")
    got = load_file(out)
    a = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(got[f"{a}.lora_A.weight"], t[f"{name}.lora_down.weight"])
    assert any(k.startswith("text_encoder.") and "layers.11.mlp.fc2.lora_B" in k for k in got)
    src = open_lora(out, None)
    want = (t[f"{name}.lora_up.weight"] @ t[f"{name}.lora_down.weight"]) * (1.0 / 4)
    torch.testing.assert_close(src.read(f"unet/{a[5:]}.weight"), want)


def test_unknown_kohya_names_need_base(work: Path) -> None:
    save_file(
        {
            "lora_unet_foo_bar.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_foo_bar.lora_up.weight": torch.zeros(4, 2),
        },
        work / "odd.safetensors",
    )
    with pytest.raises(
        UsageError,
        match=r"kohya names such as lora_unet_foo_bar are not in the built-in SD1.x/SDXL tables; pass --base",
    ):
        convert(work / "odd.safetensors", "peft", work / "odd_peft")


def test_sd_kohya_to_peft_writes_one_folder_per_component(sd: dict, work: Path) -> None:
    """14.13: an SD kohya LoRA (unet + text encoder) to PEFT: `unet/` and `text_encoder/` adapter
    folders (no recursion), each loading with peft and giving the source's deltas."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from transformers import CLIPTextModel

    k = convert(sd["lora"], "kohya", work / "sd_k_for_peft.safetensors")
    out = convert(k, "peft", work / "sd_peft", base=sd["pipe"])
    assert sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if not p.name.startswith(".")
    ) == [
        "text_encoder",
        "text_encoder/adapter_config.json",
        "text_encoder/adapter_model.safetensors",
        "unet",
        "unet/adapter_config.json",
        "unet/adapter_model.safetensors",
    ]
    pipe = sd["pipe"]
    want = deltas(k, open_checkpoint(pipe))
    got: dict[str, torch.Tensor] = {}
    for comp in ("unet", "text_encoder"):
        got |= {f"{comp}/{n}": v for n, v in deltas(out / comp, None).items()}
    assert got.keys() == want.keys()
    for name, v in want.items():
        torch.testing.assert_close(got[name], v, atol=1e-6, rtol=1e-6, msg=name)
    # peft loads each folder onto its component; merge_and_unload adds exactly those deltas
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        te = CLIPTextModel.from_pretrained(pipe / "text_encoder")
        te_base = {n: v.clone() for n, v in te.state_dict().items()}
        te_merged = PeftModel.from_pretrained(te, out / "text_encoder").merge_and_unload()
        unet = UNet2DConditionModel.from_pretrained(pipe / "unet")
        unet_base = {n: v.clone() for n, v in unet.state_dict().items()}
        unet_merged = PeftModel.from_pretrained(unet, out / "unet").merge_and_unload()
    for comp, model, base in (
        ("text_encoder", te_merged, te_base),
        ("unet", unet_merged, unet_base),
    ):
        state = model.state_dict()
        for name, d in want.items():
            if name.startswith(comp + "/"):
                p = name[len(comp) + 1 :]
                torch.testing.assert_close(state[p] - base[p], d, atol=1e-5, rtol=1e-4, msg=name)
