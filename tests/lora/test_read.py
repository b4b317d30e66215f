"""Readers: LyCORIS deltas against formulas written here, name maps, detection and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge.errors import FormatError, MergeWarning, PlanError
from merge.io.sources import MemorySource
from merge.lora.source import describe, looks_like_lora, open_lora

OUT, IN, K = 12, 10, 3
g = torch.Generator().manual_seed(0)


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


@pytest.fixture(scope="module")
def plain_base() -> MemorySource:
    return MemorySource(
        {
            "blocks.0.proj.weight": rnd(OUT, IN),
            "blocks.0.proj.bias": rnd(OUT),
            "blocks.0.conv.weight": rnd(OUT, IN, K, K),
            "blocks.1.proj.weight": rnd(OUT, IN),
            "blocks.1.conv.weight": rnd(OUT, IN, K, K),
        }
    )


def test_loha_and_tucker_loha(tmp_path: Path, plain_base: MemorySource) -> None:
    r, alpha = 3, 1.5
    t = {
        "lora_unet_blocks_0_proj.hada_w1_a": rnd(OUT, r),
        "lora_unet_blocks_0_proj.hada_w1_b": rnd(r, IN),
        "lora_unet_blocks_0_proj.hada_w2_a": rnd(OUT, r),
        "lora_unet_blocks_0_proj.hada_w2_b": rnd(r, IN),
        "lora_unet_blocks_0_proj.alpha": torch.tensor(alpha),
        # Tucker LoHa on a 3x3 conv
        "lora_unet_blocks_0_conv.hada_t1": rnd(r, r, K, K),
        "lora_unet_blocks_0_conv.hada_t2": rnd(r, r, K, K),
        "lora_unet_blocks_0_conv.hada_w1_a": rnd(r, OUT),
        "lora_unet_blocks_0_conv.hada_w1_b": rnd(r, IN),
        "lora_unet_blocks_0_conv.hada_w2_a": rnd(r, OUT),
        "lora_unet_blocks_0_conv.hada_w2_b": rnd(r, IN),
        "lora_unet_blocks_0_conv.alpha": torch.tensor(alpha),
    }
    save_file(t, tmp_path / "loha.safetensors")
    src = open_lora(tmp_path / "loha.safetensors", plain_base, scale=0.5)
    p = "lora_unet_blocks_0_proj."
    want = (
        (t[p + "hada_w1_a"] @ t[p + "hada_w1_b"])
        * (t[p + "hada_w2_a"] @ t[p + "hada_w2_b"])
        * (alpha / r)
        * 0.5
    )
    torch.testing.assert_close(src.read("blocks.0.proj.weight"), want)
    c = "lora_unet_blocks_0_conv."
    rebuild = []
    for i in (1, 2):
        tt, wa, wb = t[c + f"hada_t{i}"], t[c + f"hada_w{i}_a"], t[c + f"hada_w{i}_b"]
        w = torch.zeros(OUT, IN, K, K)
        for o in range(OUT):
            for j in range(IN):
                w[o, j] = sum(tt[a, b] * wa[a, o] * wb[b, j] for a in range(r) for b in range(r))
        rebuild.append(w)
    torch.testing.assert_close(
        src.read("blocks.0.conv.weight"),
        rebuild[0] * rebuild[1] * (alpha / r) * 0.5,
        atol=1e-4,
        rtol=1e-4,
    )


def test_lokr_factored_full_and_tucker(tmp_path: Path, plain_base: MemorySource) -> None:
    # OUT = 12 = 3·4, IN = 10 = 2·5
    r, alpha = 2, 4.0
    t = {
        "lora_unet_blocks_0_proj.lokr_w1": rnd(3, 2),
        "lora_unet_blocks_0_proj.lokr_w2_a": rnd(4, r),
        "lora_unet_blocks_0_proj.lokr_w2_b": rnd(r, 5),
        "lora_unet_blocks_0_proj.alpha": torch.tensor(alpha),
        "lora_unet_blocks_1_proj.lokr_w1": rnd(3, 2),
        "lora_unet_blocks_1_proj.lokr_w2": rnd(4, 5),
        "lora_unet_blocks_1_proj.alpha": torch.tensor(
            7.0
        ),  # both full: scale 1 whatever alpha says
        "lora_unet_blocks_0_conv.lokr_w1": rnd(3, 2),
        "lora_unet_blocks_0_conv.lokr_t2": rnd(r, r, K, K),
        "lora_unet_blocks_0_conv.lokr_w2_a": rnd(r, 4),
        "lora_unet_blocks_0_conv.lokr_w2_b": rnd(r, 5),
        "lora_unet_blocks_0_conv.alpha": torch.tensor(alpha),
    }
    save_file(t, tmp_path / "lokr.safetensors")
    src = open_lora(tmp_path / "lokr.safetensors", plain_base)

    def kron(
        a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:  # written out: (a ⊗ b)[i·p + k, j·q + l] = a[i,j]·b[k,l]
        p, q = b.shape[0], b.shape[1]
        out = torch.zeros(a.shape[0] * p, a.shape[1] * q, *b.shape[2:])
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                out[i * p : (i + 1) * p, j * q : (j + 1) * q] = a[i, j] * b
        return out

    p = "lora_unet_blocks_0_proj."
    want = kron(t[p + "lokr_w1"], t[p + "lokr_w2_a"] @ t[p + "lokr_w2_b"]) * (alpha / r)
    torch.testing.assert_close(src.read("blocks.0.proj.weight"), want)
    p = "lora_unet_blocks_1_proj."
    torch.testing.assert_close(
        src.read("blocks.1.proj.weight"), kron(t[p + "lokr_w1"], t[p + "lokr_w2"])
    )
    c = "lora_unet_blocks_0_conv."
    w2 = torch.einsum("abkl,ap,bq->pqkl", t[c + "lokr_t2"], t[c + "lokr_w2_a"], t[c + "lokr_w2_b"])
    torch.testing.assert_close(
        src.read("blocks.0.conv.weight"),
        kron(t[c + "lokr_w1"], w2) * (alpha / r),
        atol=1e-5,
        rtol=1e-5,
    )


def test_locon_tucker_kohya_conv_and_full_diff(tmp_path: Path, plain_base: MemorySource) -> None:
    r = 4
    t = {
        "lora_unet_blocks_0_conv.lora_down.weight": rnd(r, IN, 1, 1),
        "lora_unet_blocks_0_conv.lora_mid.weight": rnd(r, r, K, K),
        "lora_unet_blocks_0_conv.lora_up.weight": rnd(OUT, r, 1, 1),
        "lora_unet_blocks_0_conv.alpha": torch.tensor(2.0),
        "lora_unet_blocks_1_conv.lora_down.weight": rnd(r, IN, K, K),
        "lora_unet_blocks_1_conv.lora_up.weight": rnd(OUT, r, 1, 1),
        "lora_unet_blocks_1_conv.alpha": torch.tensor(0.0),  # 0 means alpha = rank (scale 1)
        "lora_unet_blocks_0_proj.diff": rnd(OUT, IN),
        "lora_unet_blocks_0_proj.diff_b": rnd(OUT),
    }
    save_file(t, tmp_path / "locon.safetensors")
    src = open_lora(tmp_path / "locon.safetensors", plain_base)
    c = "lora_unet_blocks_0_conv."
    mid, up, down = (
        t[c + "lora_mid.weight"],
        t[c + "lora_up.weight"][:, :, 0, 0],
        t[c + "lora_down.weight"][:, :, 0, 0],
    )
    want = torch.zeros(OUT, IN, K, K)
    for a in range(r):
        for b in range(r):
            want += (
                up[:, a, None, None, None] * down[b][None, :, None, None] * mid[a, b][None, None]
            )
    torch.testing.assert_close(
        src.read("blocks.0.conv.weight"), want * (2.0 / r), atol=1e-5, rtol=1e-5
    )
    c = "lora_unet_blocks_1_conv."
    dense = (
        t[c + "lora_up.weight"].reshape(OUT, r) @ t[c + "lora_down.weight"].reshape(r, -1)
    ).reshape(OUT, IN, K, K)
    torch.testing.assert_close(src.read("blocks.1.conv.weight"), dense)
    torch.testing.assert_close(src.read("blocks.0.proj.weight"), t["lora_unet_blocks_0_proj.diff"])
    torch.testing.assert_close(src.read("blocks.0.proj.bias"), t["lora_unet_blocks_0_proj.diff_b"])


def test_old_diffusers_names(tmp_path: Path) -> None:
    base = MemorySource(
        {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": rnd(8, 8),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": rnd(8, 8),
        }
    )
    p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor."
    t = {
        p + "to_q_lora.down.weight": rnd(2, 8),
        p + "to_q_lora.up.weight": rnd(8, 2),
        p + "to_out_lora.down.weight": rnd(2, 8),
        p + "to_out_lora.up.weight": rnd(8, 2),
    }
    save_file(t, tmp_path / "old.safetensors")
    src = open_lora(tmp_path / "old.safetensors", base)
    assert sorted(src.keys()) == sorted(base.keys())
    torch.testing.assert_close(
        src.read("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"),
        t[p + "to_out_lora.up.weight"] @ t[p + "to_out_lora.down.weight"],
    )


def test_unknown_format_lists_keys(tmp_path: Path) -> None:
    save_file({"foo.weight": rnd(2, 2), "bar.scale": rnd(2)}, tmp_path / "x.safetensors")
    with pytest.raises(
        FormatError,
        match=r"unknown adapter format: unrecognised keys `foo.weight`, `bar.scale`|unknown adapter format: unrecognised keys `bar.scale`, `foo.weight`",
    ):
        open_lora(tmp_path / "x.safetensors", None)
    assert not looks_like_lora(tmp_path / "x.safetensors")


def test_incomplete_module_named(tmp_path: Path) -> None:
    save_file({"lora_unet_a.lora_down.weight": rnd(2, 4)}, tmp_path / "half.safetensors")
    with pytest.raises(FormatError, match=r"`lora_unet_a`: has A but lacks B"):
        open_lora(tmp_path / "half.safetensors", None)


def test_ia3_refused(tmp_path: Path) -> None:
    save_file(
        {"lora_unet_a.weight": rnd(4), "lora_unet_a.on_input": torch.tensor(0)},
        tmp_path / "ia3.safetensors",
    )
    with pytest.raises(FormatError, match=r"\(IA\)\^3 tensors .* not a weight delta"):
        open_lora(tmp_path / "ia3.safetensors", None)


def test_pissa_refused(tmp_path: Path, llama: dict) -> None:
    import shutil

    d = tmp_path / "pissa"
    shutil.copytree(llama["adapters"]["plain"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        FormatError,
        match="only valid on the mutated base; save it with peft's path_initial_model_for_weight_conversion",
    ):
        open_lora(d, None)


def test_lora_for_another_architecture(llama: dict, tmp_path: Path) -> None:
    from conftest import make_llama  # type: ignore[import-not-found]

    bigger = make_llama()
    sd = {
        k: torch.zeros(*(48 if s == 32 else s for s in v.shape))
        for k, v in bigger.state_dict().items()
    }
    with pytest.raises(
        PlanError,
        match=r"shape mismatches; is it a LoRA for another architecture\?\):\n  `model.layers.0.mlp.down_proj` gives a delta of shape \[32, 64\] but the base's `model.layers.0.mlp.down_proj.weight` is \[48, 64\]",
    ):
        open_lora(llama["adapters"]["plain"], MemorySource(sd))
    with pytest.raises(PlanError, match=r"none of the 8 modules of .* match a tensor of the base"):
        open_lora(llama["adapters"]["plain"], MemorySource({"x.weight": torch.zeros(2, 2)}))


def test_unmatched_targets_reported(llama: dict) -> None:
    from conftest import make_llama  # type: ignore[import-not-found]

    sd = make_llama().state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("model.layers.1.")}
    with pytest.warns(
        MergeWarning, match=r"4 of its targets match nothing in .* and are skipped: model.layers.1"
    ):
        src = open_lora(llama["adapters"]["plain"], MemorySource(sd))
    assert len(src.keys()) == 4  # q, v, o, down of layer 0
    assert all(k.startswith("model.layers.0.") for k in src.keys())


def test_describe_and_detection(llama: dict, sd: dict) -> None:
    text = describe(llama["adapters"]["patterns"])
    assert "peft adapter, 7 modules" in text
    assert "ranks: 4 ×5, 2 ×2" in text
    assert "rsLoRA: scale = alpha / sqrt(r)" in text
    assert "modules_to_save tensors: 2" in text
    d = describe(sd["lora"])
    assert "diffusers adapter, " in d and "components: unet ×" in d and "text_encoder ×4" in d
    assert looks_like_lora(llama["adapters"]["plain"]) and looks_like_lora(sd["lora"])
    assert not looks_like_lora(llama["base"]) and not looks_like_lora(sd["pipe"])


def test_openclip_fused_qkv_in_single_files(tmp_path: Path) -> None:
    """SDXL text encoder 2 (OpenCLIP): q/k/v LoRAs land in the thirds of attn.in_proj_weight."""
    d = 8
    p = "conditioner.embedders.1.model.transformer.resblocks.0."
    base = MemorySource(
        {
            "model.diffusion_model.input_blocks.0.0.weight": rnd(4, 4, 3, 3),
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": rnd(
                16, d
            ),
            p + "attn.in_proj_weight": rnd(3 * d, d),
            p + "attn.out_proj.weight": rnd(d, d),
            p + "mlp.c_fc.weight": rnd(4 * d, d),
        }
    )
    t = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        k = f"lora_te2_text_model_encoder_layers_0_self_attn_{name}"
        t |= {
            f"{k}.lora_down.weight": rnd(2, d),
            f"{k}.lora_up.weight": rnd(d, 2),
            f"{k}.alpha": torch.tensor(1.0),
        }
    k = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    t |= {f"{k}.lora_down.weight": rnd(2, d), f"{k}.lora_up.weight": rnd(4 * d, 2)}
    k = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    t |= {f"{k}.lora_down.weight": rnd(2, d), f"{k}.lora_up.weight": rnd(16, 2)}
    save_file(t, tmp_path / "xl_te.safetensors")
    src = open_lora(tmp_path / "xl_te.safetensors", base)

    def delta(name: str, scale: float) -> torch.Tensor:
        return (t[f"{name}.lora_up.weight"] @ t[f"{name}.lora_down.weight"]) * scale

    q, kk, v = (
        delta(f"lora_te2_text_model_encoder_layers_0_self_attn_{n}", 0.5)
        for n in ("q_proj", "k_proj", "v_proj")
    )
    torch.testing.assert_close(src.read(p + "attn.in_proj_weight"), torch.cat([q, kk, v]))
    torch.testing.assert_close(
        src.read(p + "attn.out_proj.weight"),
        delta("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", 0.5),
    )
    torch.testing.assert_close(
        src.read(p + "mlp.c_fc.weight"), delta("lora_te2_text_model_encoder_layers_0_mlp_fc1", 1.0)
    )
    torch.testing.assert_close(
        src.read("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"),
        delta("lora_te1_text_model_encoder_layers_0_mlp_fc1", 1.0),
    )


def test_peft_subfolder_and_bin(llama: dict, tmp_path: Path) -> None:
    """A non-default adapter name (peft writes a sub-folder) and a pickled adapter_model.bin."""
    import shutil

    from merge.io.detect import open_checkpoint

    base = open_checkpoint(llama["base"])
    want = open_lora(llama["adapters"]["plain"], base)
    shutil.copytree(llama["adapters"]["plain"], tmp_path / "outer" / "style")
    from safetensors.torch import load_file

    (tmp_path / "binned").mkdir()
    shutil.copy(llama["adapters"]["plain"] / "adapter_config.json", tmp_path / "binned")
    torch.save(
        load_file(llama["adapters"]["plain"] / "adapter_model.safetensors"),
        tmp_path / "binned" / "adapter_model.bin",
    )
    for path in (tmp_path / "outer", tmp_path / "binned"):
        assert looks_like_lora(path)
        got = open_lora(path, base)
        for k in want.keys():
            torch.testing.assert_close(got.read(k), want.read(k))
    shutil.copytree(llama["adapters"]["plain"], tmp_path / "outer" / "other")
    with pytest.raises(
        FormatError, match=r"holds several adapters \(other, style\); give the path of one"
    ):
        open_lora(tmp_path / "outer", base)


def test_kohya_dora_scale_axis_from_shape(tmp_path: Path, plain_base: MemorySource) -> None:
    """LyCORIS/kohya dora_scale: [out, 1] normalises rows, legacy [1, in] normalises columns."""
    r = 2
    t = {}
    for name, mshape in (("blocks_0_proj", (OUT, 1)), ("blocks_1_proj", (1, IN))):
        k = f"lora_unet_{name}"
        t |= {
            f"{k}.lora_down.weight": rnd(r, IN),
            f"{k}.lora_up.weight": rnd(OUT, r),
            f"{k}.alpha": torch.tensor(1.0),
            f"{k}.dora_scale": rnd(*mshape).abs() + 0.5,
        }
    save_file(t, tmp_path / "dora.safetensors")
    src = open_lora(tmp_path / "dora.safetensors", plain_base, scale=0.7)
    assert src.not_additive == "a DoRA adapter"
    for name, dim in (("blocks_0_proj", 1), ("blocks_1_proj", 0)):
        k = f"lora_unet_{name}"
        w = plain_base.read(name.replace("_", ".", 2) + ".weight")
        v = w + 0.7 * (t[f"{k}.lora_up.weight"] @ t[f"{k}.lora_down.weight"]) * (1.0 / r)
        want = v * t[f"{k}.dora_scale"] / v.norm(dim=dim, keepdim=True) - w
        torch.testing.assert_close(
            src.read(name.replace("_", ".", 2) + ".weight"), want, atol=1e-5, rtol=1e-5
        )
