"""Combine: exact = dense weighted sum of deltas; SVD = best rank-r approximation with its energy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merge.errors import PlanError
from merge.io.detect import open_checkpoint
from merge.lora.combine import combine
from merge.lora.source import open_lora


def dense_sum(llama: dict, names: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    base = open_checkpoint(llama["base"])
    out: dict[str, torch.Tensor] = {}
    for n, w in zip(names, weights):
        src = open_lora(llama["adapters"][n], base)
        for k in src.keys():
            if k.endswith(".weight") and k != "lm_head.weight":
                out[k] = out.get(k, torch.zeros(src.meta(k).shape)) + w * src.read(k)
    return out


def key_of(c: str, p: str) -> str:
    return f"{p}.weight"


def test_exact_combine_is_the_weighted_sum_and_loads_in_peft(llama: dict, work: Path) -> None:
    from conftest import make_llama  # type: ignore[import-not-found]
    from peft import PeftModel

    names, w = ["plain", "rank8", "patterns"], [0.7, -0.5, 0.3]
    report, factors = combine([llama["adapters"][n] for n in names], w, work / "combined_exact")
    want = dense_sum(llama, names, w)
    assert report.exact and report.modules == len(want)
    for (c, p), f in factors.items():
        torch.testing.assert_close(f.delta(), want[key_of(c, p)], atol=1e-5, rtol=1e-5)
    # ranks concatenate: q_proj has 4 (plain) + 8 (rank8) + 4 (patterns)
    assert report.rank_out["model.layers.0.self_attn.q_proj"] == 16
    assert report.rank_out["model.layers.0.self_attn.k_proj"] == 2
    assert any("lm_head" in d for d in report.dropped)
    model = PeftModel.from_pretrained(make_llama(), work / "combined_exact").merge_and_unload()
    base = make_llama().state_dict()
    merged = model.state_dict()
    for k, d in want.items():
        torch.testing.assert_close(merged[k], base[k] + d, atol=1e-5, rtol=1e-5, msg=k)


def test_svd_combine_is_best_rank_r(llama: dict, work: Path) -> None:
    names, w = ["plain", "rank8"], [1.0, 0.6]
    report, factors = combine(
        [llama["adapters"][n] for n in names], w, work / "combined_r3", rank=3
    )
    want = dense_sum(llama, names, w)
    kept = total = 0.0
    for (c, p), f in factors.items():
        d = want[key_of(c, p)]
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(f.delta().double(), best, atol=2e-5, rtol=1e-4)
        e = float((s[:3] ** 2).sum() / (s**2).sum())
        assert report.energy[p] == pytest.approx(e, rel=1e-5)
        kept += float((s[:3] ** 2).sum())
        total += float((s**2).sum())
    assert report.overall_energy == pytest.approx(kept / total, rel=1e-5)
    assert "retained energy" in report.summary()


def test_energy_threshold_picks_smallest_rank(llama: dict) -> None:
    report, _ = combine([llama["adapters"]["rank8"]], [1.0], None, energy=0.9)
    src = open_lora(llama["adapters"]["rank8"], open_checkpoint(llama["base"]))
    for name, e in report.energy.items():
        r = report.rank_out[name]
        s = torch.linalg.svdvals(src.read(name + ".weight").double())
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        assert e == pytest.approx(float(energy[r - 1]), rel=1e-5)
        assert e >= 0.9
        assert r == 1 or float(energy[r - 2]) < 0.9  # one rank fewer would fall below the threshold


def test_identities(llama: dict) -> None:
    a = llama["adapters"]["plain"]
    base = open_checkpoint(llama["base"])
    src = open_lora(a, base)
    _, one = combine([a], [1.0], None)
    for (_, p), f in one.items():
        torch.testing.assert_close(f.delta(), src.read(p + ".weight"))
    _, zero = combine([a, a], [1.0, -1.0], None)
    for f in zero.values():
        assert float(f.delta().abs().max()) < 1e-5


def test_factorwise_needs_equal_ranks(llama: dict) -> None:
    with pytest.raises(
        PlanError,
        match=r"mismatched ranks in a factor-space operation at `model.layers.0.self_attn.q_proj`: .*peft_plain has rank 4, .*peft_rank8 has rank 8; factor-wise mixing needs equal ranks",
    ):
        combine(
            [llama["adapters"]["plain"], llama["adapters"]["rank8"]],
            [0.5, 0.5],
            None,
            factorwise=True,
        )


def test_dora_is_not_combined(llama: dict) -> None:
    with pytest.raises(PlanError, match=r"is a DoRA module: DoRA is not a delta"):
        combine([llama["adapters"]["dora"], llama["adapters"]["plain"]], [1.0, 1.0], None)


def test_factorwise_matches_peft_linear(llama: dict) -> None:
    """--factorwise reproduces peft's add_weighted_adapter(combination_type="linear"), cross terms included."""
    import warnings

    from conftest import make_llama  # type: ignore[import-not-found]
    from peft import PeftModel

    a, b = llama["adapters"]["plain"], llama["adapters"]["patterns"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(make_llama(), a, adapter_name="a")
        pm.load_adapter(b, adapter_name="b")
        pm.add_weighted_adapter(["a", "b"], [0.3, 0.5], "c", combination_type="linear")
    _, ours = combine([a, b], [0.3, 0.5], None, factorwise=True)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    ref = layer.get_delta_weight("c")
    torch.testing.assert_close(
        ours[("", "model.layers.0.self_attn.q_proj")].delta(), ref, atol=1e-5, rtol=1e-5
    )
    exact = 0.3 * open_lora(a, open_checkpoint(llama["base"])).read(
        "model.layers.0.self_attn.q_proj.weight"
    )
    exact += 0.5 * open_lora(b, open_checkpoint(llama["base"])).read(
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert float((ref - exact).abs().max()) > 1e-3  # factor-wise is not the weighted sum
