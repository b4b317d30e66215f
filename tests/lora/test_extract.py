"""Extract: SVD of (tuned − base) per module; extract-then-bake reproduces the fine-tune within the
reported energy; the PEFT adapter loads untouched; randomized SVD is as good as full at low rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merge.lora.extract import extract, low_rank


@pytest.fixture(scope="module")
def finetune(llama: dict, work: Path) -> Path:
    """base + rank-2 (layer 0) / rank-5 (layer 1) changes + small noise, a changed norm and bias."""
    from conftest import make_llama  # type: ignore[import-not-found]

    m = make_llama()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "layers" in name:
                r = 2 if "layers.0." in name else 5
                u, v = (
                    torch.randn(p.shape[0], r, generator=g),
                    torch.randn(r, p.shape[1], generator=g),
                )
                p.add_(0.05 * u @ v + 0.002 * torch.randn(p.shape, generator=g))
        m.model.norm.weight.add_(0.1)
        m.model.layers[0].self_attn.q_proj.bias.add_(0.1)
    m.save_pretrained(work / "llama_ft")
    return work / "llama_ft"


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(next(path.glob("*.safetensors")))


def test_extract_then_bake_within_reported_energy(llama: dict, finetune: Path, work: Path) -> None:
    from conftest import make_llama  # type: ignore[import-not-found]
    from peft import PeftModel

    report, _ = extract(llama["base"], finetune, work / "extracted_r3", rank=3, svd="full")
    assert (work / "extracted_r3" / "adapter_config.json").is_file()
    assert "model.norm" in report.saved_full  # a changed norm goes to modules_to_save
    assert "model.layers.0.self_attn.q_proj.bias" in report.dropped
    baked = (
        PeftModel.from_pretrained(make_llama(), work / "extracted_r3")
        .merge_and_unload()
        .state_dict()
    )
    base, tuned = _state(llama["base"]), _state(finetune)
    for name, (rank, energy) in report.modules.items():
        k = name + ".weight"
        d = tuned[k] - base[k]
        err = float((tuned[k] - baked[k]).double().pow(2).sum() / d.double().pow(2).sum())
        assert rank == 3
        assert err == pytest.approx(1 - energy, abs=1e-4), name
        assert energy > (0.99 if "layers.0." in name else 0.5)
    torch.testing.assert_close(baked["model.norm.weight"], tuned["model.norm.weight"])


def test_energy_mode_ranks_differ_and_rank_pattern_loads(
    llama: dict, finetune: Path, work: Path
) -> None:
    import json

    from conftest import make_llama  # type: ignore[import-not-found]
    from peft import PeftModel

    report, _ = extract(llama["base"], finetune, work / "extracted_e", energy=0.999, svd="full")
    ranks = {r for r, _ in report.modules.values()}
    assert all(e >= 0.999 for _, e in report.modules.values())
    assert len(ranks) > 1
    cfg = json.loads((work / "extracted_e" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]  # ranks differ
    baked = (
        PeftModel.from_pretrained(make_llama(), work / "extracted_e")
        .merge_and_unload()
        .state_dict()
    )
    tuned = _state(finetune)
    for name, (_, energy) in report.modules.items():
        k = name + ".weight"
        d = tuned[k] - _state(llama["base"])[k]
        err = float((tuned[k] - baked[k]).double().pow(2).sum() / d.double().pow(2).sum())
        assert err == pytest.approx(1 - energy, abs=1e-4)


def test_randomized_svd_accuracy() -> None:
    g = torch.Generator().manual_seed(0)
    # a decaying spectrum, as fine-tune deltas have
    u, _ = torch.linalg.qr(torch.randn(512, 256, generator=g))
    v, _ = torch.linalg.qr(torch.randn(384, 256, generator=g))
    s = torch.exp(-torch.arange(256) / 20.0)
    m = (u * s) @ v.T
    b1, a1, kept1, total, rand1 = low_rank(m, 16, None, "full")
    b2, a2, kept2, _, rand2 = low_rank(m, 16, None, "randomized")
    assert not rand1 and rand2
    err_full = float((m - b1 @ a1).pow(2).sum() / total)
    err_rand = float((m - b2 @ a2).pow(2).sum() / total)
    assert err_full == pytest.approx(1 - kept1 / total, abs=1e-5)
    assert err_rand == pytest.approx(1 - kept2 / total, abs=1e-5)  # the reported energy is exact
    assert err_rand <= err_full * 1.05
    _, _, kept3, _, rand3 = low_rank(m, 16, None, "auto")  # converged: accepted
    assert rand3 and (kept1 - kept3) / total < 1e-4
    _, _, _, _, rand4 = low_rank(m[:64], 16, None, "auto")  # too small for a randomized SVD
    assert not rand4


def test_extract_errors(llama: dict, tmp_path: Path) -> None:
    from merge.errors import PlanError, UsageError
    from merge.io.sources import MemorySource

    with pytest.raises(UsageError, match="give exactly one of --rank and --energy"):
        extract(llama["base"], llama["base"], None)
    with pytest.raises(
        PlanError, match="share no tensor names; extract needs the fine-tune of this base"
    ):
        extract(llama["base"], MemorySource({"x": torch.zeros(2)}), None, rank=2)


def test_output_format_follows_the_help_and_refuses_contradictions(
    llama: dict, finetune: Path, work: Path
) -> None:
    """14.14: the format is --to, else the base's (PEFT for a model folder); an -o the format
    cannot be is refused before any SVD, for extract, convert and combine alike."""
    from merge.errors import UsageError
    from merge.lora.combine import combine
    from merge.lora.convert import convert

    peft_file = (
        r"-o .*x\.safetensors names a file, but a PEFT adapter \({}\) is a folder "
        r"\(adapter_config.json \+ adapter_model.safetensors\): give -o a folder name, or "
        r"--to kohya or --to diffusers for a single .safetensors file"
    )
    with pytest.raises(UsageError, match=peft_file.format("the default format here, PEFT,")):
        extract(llama["base"], finetune, work / "x.safetensors", rank=2)
    with pytest.raises(UsageError, match=peft_file.format("--to peft")):
        extract(llama["base"], finetune, work / "x.safetensors", rank=2, fmt="peft")
    with pytest.raises(UsageError, match=peft_file.format("--to peft")):
        convert(llama["adapters"]["plain"], "peft", work / "x.safetensors")
    with pytest.raises(UsageError, match=peft_file.format("the default format here, PEFT,")):
        combine([llama["adapters"]["plain"]], None, work / "x.safetensors")
    with pytest.raises(UsageError, match=r"a kohya LoRA is one file: give -o a .safetensors name"):
        extract(llama["base"], finetune, work / "kohya_dir", rank=2, fmt="kohya")
    assert not (work / "x.safetensors").exists() and not (work / "kohya_dir").exists()
    # with an embedding change, an explicit kohya file drops (and lists) the embedding
    from conftest import make_llama  # type: ignore[import-not-found]

    m = make_llama()
    with torch.no_grad():
        m.model.embed_tokens.weight.add_(0.01)
        m.model.layers[0].mlp.down_proj.weight.add_(0.02)
    m.save_pretrained(work / "llama_emb_ft")
    report, _ = extract(
        llama["base"], work / "llama_emb_ft", work / "emb.safetensors", rank=1, fmt="kohya"
    )
    assert report.dropped == [
        "model.embed_tokens.weight (kohya files have no embedding LoRA; --to peft keeps it)"
    ]
    assert list(report.modules) == ["model.layers.0.mlp.down_proj"]
    # and the default (PEFT folder) keeps it as peft's embedding LoRA
    report, _ = extract(llama["base"], work / "llama_emb_ft", work / "emb_peft", rank=1)
    assert sorted(report.modules) == ["model.embed_tokens", "model.layers.0.mlp.down_proj"]
    assert (work / "emb_peft" / "adapter_config.json").is_file()


def test_extract_from_gpt2_conv1d_loads_in_peft(work: Path) -> None:
    """14.15: GPT-2 stores Conv1D weights [in, out]; the adapter says fan_in_fan_out, its factors
    have peft's shapes, and peft's merge_and_unload equals our bake (and the low-rank fine-tune)."""
    import json
    import warnings

    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    from merge.lora.bake import bake

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=64)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(work / "c1d_gpt2")
    torch.manual_seed(0)
    tuned = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() == 2 and ".h." in name:  # c_attn [32, 96], c_proj, c_fc [32, 128]
                u = torch.randn(p.shape[0], 2, generator=g)
                p.add_(0.05 * u @ torch.randn(2, p.shape[1], generator=g))
    tuned.save_pretrained(work / "c1d_gpt2_ft")
    report, _ = extract(
        work / "c1d_gpt2", work / "c1d_gpt2_ft", work / "c1d_gpt2_lora", rank=2, svd="full"
    )
    assert sorted(report.modules) == sorted(
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert json.loads((work / "c1d_gpt2_lora" / "adapter_config.json").read_text())[
        "fan_in_fan_out"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(
            GPT2LMHeadModel.from_pretrained(work / "c1d_gpt2"), work / "c1d_gpt2_lora"
        )
    a = pm.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
    assert list(a.shape) == [2, 32]  # [r, in]: peft's Conv1D shape
    peft_merged = pm.merge_and_unload().state_dict()
    ours = _state(bake(work / "c1d_gpt2", [(work / "c1d_gpt2_lora", 1.0)], work / "c1d_gpt2_baked"))
    want = _state(work / "c1d_gpt2_ft")
    for k, v in ours.items():
        torch.testing.assert_close(peft_merged[k], v, atol=1e-6, rtol=1e-5, msg=k)
        torch.testing.assert_close(v, want[k], atol=1e-5, rtol=1e-5, msg=k)
