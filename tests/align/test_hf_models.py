"""What inference finds in a tiny transformers Llama (RoPE, grouped-query attention, RMSNorm
in float32) and a tiny diffusers UNet (GroupNorm, skip concatenations, attention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge.align import apply_permutation, infer_spec, verify_spec, weight_matching
from merge.align.permute import invert, random_perms

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval()  # fmt: skip


TOKENS = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}


def members(spec, group: str) -> set[tuple[str, int, int]]:  # type: ignore[no-untyped-def]
    return {(m.tensor, m.axis, m.block) for m in spec.groups[group].members}


def test_llama_residual_stream_and_mlp_heads_fixed(llama: torch.nn.Module) -> None:
    spec = infer_spec(llama, TOKENS)
    assert spec.source == "inferred by torch.export"  # HF forward has data-dependent Python
    assert list(spec.groups) == [
        "P_model.embed_tokens",
        "P_model.layers.0.mlp.gate_proj",
        "P_model.layers.1.mlp.gate_proj",
    ]
    stream = members(spec, "P_model.embed_tokens")
    assert {
        ("model.embed_tokens.weight", 1, 1),
        ("lm_head.weight", 1, 1),
        ("model.norm.weight", 0, 1),
    } <= stream
    assert {
        ("model.layers.1.self_attn.o_proj.weight", 0, 1),
        ("model.layers.0.input_layernorm.weight", 0, 1),
    } <= stream
    assert members(spec, "P_model.layers.0.mlp.gate_proj") == {
        ("model.layers.0.mlp.gate_proj.weight", 0, 1), ("model.layers.0.mlp.up_proj.weight", 0, 1),
        ("model.layers.0.mlp.down_proj.weight", 1, 1),
    }  # fmt: skip
    fixed = {(f.tensor, f.axis): f.reason for f in spec.fixed}
    assert (
        "attention heads are not permuted" in fixed[("model.layers.0.self_attn.q_proj.weight", 0)]
    )
    report = verify_spec(llama, spec, ((), TOKENS))
    assert report.rtol == 1e-5 and "computes parts in float32" in report.notes[0]  # RMSNorm upcasts


def test_llama_heads_follow_grouped_query_attention(llama: torch.nn.Module) -> None:
    spec = infer_spec(llama, TOKENS, heads=True)
    heads = spec.groups["P_model.layers.0.self_attn.k_proj"]
    assert heads.size == 2  # KV heads; each moves with its 2 query heads (blocks of 2 x 8 dims)
    assert members(spec, heads.name) == {
        ("model.layers.0.self_attn.q_proj.weight", 0, 16), ("model.layers.0.self_attn.k_proj.weight", 0, 8),
        ("model.layers.0.self_attn.v_proj.weight", 0, 8), ("model.layers.0.self_attn.o_proj.weight", 1, 16),
    }  # fmt: skip
    verify_spec(llama, spec, ((), TOKENS))  # RoPE: whole heads move, dims within a head never do
    a = llama.state_dict()
    planted = random_perms(spec, seed=2)
    perms, _ = weight_matching(spec, a, apply_permutation(spec, planted, a), restarts=1)
    assert all(np.array_equal(perms[g], invert(planted[g])) for g in spec.groups)


def test_unet_group_norm_blocks_and_skip_connections(unet: torch.nn.Module) -> None:
    example = (
        torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
        torch.tensor([10, 500]),
    )
    spec = infer_spec(unet, example)
    assert len(spec.groups) == 14
    # GroupNorm(8, 16): channels move in pairs, whole groups at a time
    assert members(spec, "P_down_blocks.0.resnets.0.conv1") >= {
        ("down_blocks.0.resnets.0.conv1.weight", 0, 2), ("down_blocks.0.resnets.0.norm2.weight", 0, 2),
        ("down_blocks.0.resnets.0.conv2.weight", 1, 2),
    }  # fmt: skip
    reasons = " ".join(f.reason for f in spec.fixed)
    assert (
        "normalises groups of channels (8 groups) that the layout splits" in reasons
    )  # 32+16 channels, 8 groups
    verify_spec(unet, spec, (example, {}))
    with_heads = infer_spec(unet, example, heads=True)
    assert len(with_heads.groups) == 18  # + one head permutation per attention block
    verify_spec(unet, with_heads, (example, {}))
