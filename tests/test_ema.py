"""EMA/SWA weights equal torch's AveragedModel applied checkpoint by checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from merge import ema as E
from merge.api import run_recipe
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
    assert E.steps_from_names(["run/ckpt-0100", "step_250.safetensors"]) == [100, 250]


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


def test_warmup_matches_timm_recursion() -> None:
    gamma, power, decay = 1.0, 0.75, 0.999
    steps = [0, 1, 2, 5, 10]
    decays = [min(decay, E.warmup_decay(s, 1.0, gamma, power)) for s in steps]
    w = E.weights_from_decays(decays)
    # Recursion on scalars x_k = k: avg_k = d_k avg + (1 - d_k) x_k
    avg = 0.0
    for k, d in enumerate(decays):
        avg = float(k) if k == 0 else d * avg + (1 - d) * k
    assert sum(wk * k for k, wk in enumerate(w)) == pytest.approx(avg)
    assert decays[1] == pytest.approx(1 - 2**-0.75)
