"""EMA/SWA weights equal torch's AveragedModel applied checkpoint by checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from merge import ema as E
from merge.api import run_recipe
from merge.cli import cli
from merge.errors import UsageError
from merge.io import load_state_dict, save_state_dict


def trained_checkpoints(tmp_path: Path, n: int = 5) -> tuple[list[nn.Module], list[Path]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps, paths = [], []
    for step in range(n):
        for _ in range(3):
            x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        snap = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        snap.load_state_dict(model.state_dict())
        snaps.append(snap)
        paths.append(save_state_dict(model.state_dict(), tmp_path / f"ckpt-{(step + 1) * 100:04d}"))
    return snaps, paths


def test_closed_form_weights_by_hand() -> None:
    # avg0 = x0; avg1 = .5 avg0 + .5 x1; avg2 = .5 avg1 + .5 x2 -> [.25, .25, .5]
    assert E.ema_weights(3, 0.5) == [0.25, 0.25, 0.5]
    assert E.weights_from_decays([1.0, 0.9, 0.0]) == [0.0, 0.0, 1.0]
    assert sum(E.ema_weights(7, 0.93)) == pytest.approx(1.0)
    assert E.step_decays([100, 200, 400], 0.99) == pytest.approx([1.0, 0.99**100, 0.99**200])


@pytest.mark.parametrize("mode", ["ema", "swa"])
def test_equals_averaged_model(tmp_path: Path, mode: str) -> None:
    snaps, paths = trained_checkpoints(tmp_path)
    if mode == "ema":
        avg = AveragedModel(snaps[0], multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
        weights = E.ema_weights(len(paths), 0.8)
    else:
        avg = AveragedModel(snaps[0], use_buffers=True)
        weights = E.swa_weights(len(paths))
    for s in snaps:  # the first update copies (n_averaged == 0), as our w_0 term does
        avg.update_parameters(s)
    out = load_state_dict(
        run_recipe(
            E.ema_recipe([str(p) for p in paths], weights),
            tmp_path / "avg",
            quiet=True,
            passthrough_from=f"ckpt{len(paths) - 1}",
        )
    )
    ref = avg.module.state_dict()
    for k, v in out.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # Integer buffers come from the last checkpoint, never averaged.
    assert (
        out["1.num_batches_tracked"].item()
        == snaps[-1].state_dict()["1.num_batches_tracked"].item()
        == 15
    )


def test_buffers_last_policy(tmp_path: Path) -> None:
    snaps, paths = trained_checkpoints(tmp_path, n=3)
    weights = E.ema_weights(3, 0.5)
    out = load_state_dict(
        run_recipe(
            E.ema_recipe([str(p) for p in paths], weights, buffers="last"),
            tmp_path / "avg",
            quiet=True,
        )
    )
    last = snaps[-1].state_dict()
    assert torch.equal(out["1.running_mean"], last["1.running_mean"])
    sds = [s.state_dict() for s in snaps]
    torch.testing.assert_close(
        out["0.weight"], sum(w * sd["0.weight"] for w, sd in zip(weights, sds))
    )


def timm_get_decay(step: int, decay: float, gamma: float, power: float) -> float:
    """timm's `ModelEmaV3.get_decay` (use_warmup=True, update_after_step=0, min_decay=0), written out."""
    step = max(0, step - 0 - 1)
    if step <= 0:
        return 0.0
    return max(min(1 - (1 + step / gamma) ** -power, decay), 0.0)


def per_step_ema(xs: list[Tensor], steps: list[int], decay: float, gamma: float | None) -> Tensor:
    """A literal per-step EMA loop: one `lerp_` per optimiser step, checkpoint k's weights held
    over the steps since the previous checkpoint; the EMA starts at checkpoint 0."""
    ema = xs[0].clone()
    k = 0
    for step in range(steps[0] + 1, steps[-1] + 1):
        while steps[k] < step:
            k += 1
        d = decay if gamma is None else timm_get_decay(step, decay, gamma, 0.75)
        ema.lerp_(xs[k], 1 - d)  # ModelEmaV2/V3: ema = d·ema + (1 − d)·θ
    return ema


@pytest.mark.parametrize("gamma", [None, 1.0, 20.0])
@pytest.mark.parametrize("steps", [[0, 3, 10, 25, 60], [100, 200, 400, 1000]])
def test_step_decay_equals_a_per_step_ema_loop(steps: list[int], gamma: float | None) -> None:
    xs = [
        torch.randn(5, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        for k in range(len(steps))
    ]
    decays = E.step_decays(steps, 0.99, warmup_gamma=gamma, warmup_power=0.75)
    ours = sum(w * x for w, x in zip(E.weights_from_decays(decays), xs))
    torch.testing.assert_close(ours, per_step_ema(xs, steps, 0.99, gamma), rtol=1e-12, atol=1e-12)


def test_warmup_product_past_the_warmup_and_by_hand() -> None:
    # Update 1 copies; update 2 uses t = 1: 1 − 2^(−0.75); from 0.99 on, the constant rules.
    assert E.step_decays([0, 1], 0.9, warmup_gamma=1.0) == [1.0, 0.0]
    assert E.step_decays([1, 2], 0.9, warmup_gamma=1.0) == pytest.approx([1.0, 1 - 2**-0.75])
    # warm(t) ≥ 0.9 from t = 10^(4/3) − 1 ≈ 20.5 (γ = 1, p = 0.75): steps 22.. use 0.9 itself.
    far = E.step_decays([30, 1000], 0.9, warmup_gamma=1.0)[1]
    assert far == pytest.approx(0.9**970, rel=1e-12)
    long = E.step_decays([1, 3_000_000], 0.9999, warmup_gamma=1.0, warmup_power=2 / 3)[1]
    t = np.arange(1, 3_000_000, dtype=np.float64)
    assert long == pytest.approx(np.exp(np.log(np.minimum(0.9999, 1 - (1 + t) ** (-2 / 3))).sum()))


def test_per_checkpoint_warmup_follows_timm() -> None:
    # --decay with warm-up: checkpoint k is update k; update 1 copies, so checkpoint 0 drops out.
    decays = E.checkpoint_decays(4, 0.999, warmup_gamma=1.0, warmup_power=0.75)
    assert decays == pytest.approx([1.0, 0.0, 1 - 2**-0.75, 1 - 3**-0.75])
    xs = [torch.tensor([float(k)], dtype=torch.float64) for k in range(4)]
    ours = sum(w * x for w, x in zip(E.weights_from_decays(decays), xs))
    torch.testing.assert_close(ours, per_step_ema(xs, [0, 1, 2, 3], 0.999, 1.0))


def test_ema_cli_warmup_equals_a_per_step_loop(tmp_path: Path) -> None:
    snaps, paths = trained_checkpoints(tmp_path, n=4)  # ckpt-0100 .. ckpt-0400
    res = CliRunner().invoke(
        cli,
        [
            "ema",
            *map(str, paths),
            "--step-decay",
            "0.99",
            "--warmup-gamma",
            "10",
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    out = load_state_dict(tmp_path / "o")
    xs = [s.state_dict()["0.weight"].double() for s in snaps]
    ref = per_step_ema(xs, [100, 200, 300, 400], 0.99, 10.0)
    torch.testing.assert_close(out["0.weight"].double(), ref, rtol=1e-5, atol=1e-6)
    assert (
        "steps read from the names: ckpt-0100 → 100, ckpt-0200 → 200, ckpt-0300 → 300, ckpt-0400 → 400"
        in res.output
    )


@pytest.mark.parametrize(
    ("names", "steps"),
    [
        (["run/ckpt-0100", "step_250.safetensors"], [100, 250]),
        (["checkpoint-300/model.safetensors", "epoch=3-step=400.ckpt"], [300, 400]),
        (
            ["global_step500", "iter_600.pth", "network-snapshot-000700.pkl", "800"],
            [500, 600, 700, 800],
        ),
    ],
)
def test_steps_from_step_like_names(names: list[str], steps: list[int]) -> None:
    assert E.steps_from_names(names) == steps


def test_names_without_a_step_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        UsageError, match=r"cannot read a training step from `ft1`, `model-v2.safetensors`"
    ):
        E.steps_from_names(["ft1", "model-v2.safetensors", "ckpt-0300"])
    paths = [
        save_state_dict({"w": torch.ones(2) * i}, tmp_path / f"ft{i}.safetensors") for i in (1, 2)
    ]
    res = CliRunner().invoke(
        cli, ["ema", *map(str, paths), "--step-decay", "0.9", "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 2
    assert "cannot read a training step from" in res.output and "pass --every N" in res.output
    assert not (tmp_path / "o").exists()
