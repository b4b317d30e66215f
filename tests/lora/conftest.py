"""Tiny models and adapters built offline once per session: a Llama, an SD-like pipeline, LoRAs by peft."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    attention_bias=True,
)
UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=8,
)


def make_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def make_unet(seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET).eval()


def make_pipeline(seed: int = 0):  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = make_unet(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=1000,
        )
    )
    sch = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=te.eval(),
        tokenizer=None,
        scheduler=sch,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """Non-zero lora_B (and magnitudes, biases) so every adapter really changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (
                "lora_B" in name
                or "lora_embedding_B" in name
                or "lora_A" in name
                or "lora_embedding_A" in name
            ):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def peft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def scale_peft(model: torch.nn.Module, k: float) -> None:
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.scale_layer(k)


LLAMA_VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "gate_proj", "embed_tokens"],
        rank_pattern={"k_proj": 2},
        alpha_pattern={"gate_proj": 3},
        modules_to_save=["lm_head"],
    ),
    "dora": dict(r=4, lora_alpha=4, use_dora=True, target_modules=["q_proj", "up_proj"]),
    "bias": dict(r=2, lora_alpha=4, lora_bias=True, target_modules=["q_proj", "o_proj"]),
    "rank8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="session")
def llama(work: Path) -> dict[str, object]:
    """base folder, adapters by variant, and peft merge_and_unload references (scale 1 and 0.8)."""
    from peft import LoraConfig, get_peft_model

    base_dir = work / "llama"
    make_llama().save_pretrained(base_dir)
    out: dict[str, object] = {"base": base_dir, "adapters": {}, "merged": {}, "merged08": {}}
    for i, (name, kw) in enumerate(LLAMA_VARIANTS.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(make_llama(), LoraConfig(init_lora_weights=False, **kw))  # type: ignore[arg-type]
            randomize_lora(pm, 100 + i)
            pm.save_pretrained(work / f"peft_{name}")
            out["adapters"][name] = work / f"peft_{name}"  # type: ignore[index]
            state = peft_state(pm)
            out["merged"][name] = {
                k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()
            }  # type: ignore[index]
            pm2 = get_peft_model(make_llama(), LoraConfig(init_lora_weights=False, **kw))  # type: ignore[arg-type]
            pm2.load_state_dict(state)
            scale_peft(pm2, 0.8)
            out["merged08"][name] = {
                k: v.clone() for k, v in pm2.merge_and_unload().state_dict().items()
            }  # type: ignore[index]
    return out


@pytest.fixture(scope="session")
def sd(work: Path) -> dict[str, object]:
    """A tiny SD pipeline folder, a diffusers LoRA file (unet conv+attn, text encoder) and fuse_lora(0.7)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = make_pipeline()
    pipe.save_pretrained(work / "pipe")
    base_state = {f"unet/{k}": v.clone() for k, v in pipe.unet.state_dict().items()}
    ucfg = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=[
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "proj_in",
            "conv1",
            "conv2",
            "ff.net.2",
            "conv_shortcut",
        ],
    )
    tcfg = LoraConfig(
        r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.unet.add_adapter(ucfg)
        pipe.text_encoder.add_adapter(tcfg)
        randomize_lora(pipe.unet, 7)
        randomize_lora(pipe.text_encoder, 8)
        StableDiffusionPipeline.save_lora_weights(
            work / "dlora",
            unet_lora_layers=get_peft_model_state_dict(pipe.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
            unet_lora_adapter_metadata=ucfg.to_dict(),
            text_encoder_lora_adapter_metadata=tcfg.to_dict(),
        )
        pipe.fuse_lora(lora_scale=0.7, components=["unet", "text_encoder"])
        pipe.unload_lora_weights()
    fused = {f"unet/{k}": v.clone() for k, v in pipe.unet.state_dict().items()}
    fused |= {f"text_encoder/{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    return {
        "pipe": work / "pipe",
        "lora": work / "dlora",
        "fused07": fused,
        "base_unet": base_state,
    }


def ldm_state(pipe_dir: Path) -> dict[str, torch.Tensor]:
    """A single-file SD1-style state dict (LDM keys) from a tiny pipeline folder."""
    from safetensors.torch import load_file

    from merge.lora.names import diffusers_layout, diffusers_unet_to_ldm

    unet = load_file(pipe_dir / "unet" / "diffusion_pytorch_model.safetensors")
    te = load_file(pipe_dir / "text_encoder" / "model.safetensors")
    lpb, attn = diffusers_layout(unet)
    out = {
        "model.diffusion_model." + str(diffusers_unet_to_ldm(k, lpb, attn)): v
        for k, v in unet.items()
    }
    out |= {"cond_stage_model.transformer.text_model." + k: v for k, v in te.items()}
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


@pytest.fixture(scope="session")
def pipes(work: Path) -> dict[str, Path]:
    """Three tiny pipelines (A, B, C) from different seeds, and their single-file forms."""
    from safetensors.torch import save_file

    out: dict[str, Path] = {}
    for name, seed in (("A", 0), ("B", 10), ("C", 20)):
        make_pipeline(seed).save_pretrained(work / f"pipe_{name}")
        out[name] = work / f"pipe_{name}"
        save_file(ldm_state(out[name]), work / f"single_{name}.safetensors")
        out[f"single_{name}"] = work / f"single_{name}.safetensors"
    return out
