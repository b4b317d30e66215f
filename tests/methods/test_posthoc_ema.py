"""Post-hoc EMA (EDM2): γ ↔ σ_rel, exact reconstruction of stored profiles, a simulated run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merge.errors import UsageError
from merge.posthoc_ema import (
    checkpoint_power_weights,
    gamma_to_sigma_rel,
    posthoc_weights,
    profile_inner_products,
    sigma_rel_to_gamma,
)


@pytest.mark.parametrize("sigma,gamma", [(0.05, 16.97), (0.10, 6.94), (0.13, 4.60), (0.20, 1.83)])
def test_sigma_rel_to_gamma_reference_values_and_round_trip(sigma, gamma):
    g = sigma_rel_to_gamma(sigma)
    assert g == pytest.approx(gamma, abs=0.01)
    assert gamma_to_sigma_rel(g) == pytest.approx(sigma, rel=1e-12)
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-10)


def test_gamma_zero_is_the_widest_profile_and_beyond_is_refused():
    assert gamma_to_sigma_rel(0.0) == pytest.approx(math.sqrt(1 / 12))
    with pytest.raises(UsageError, match=r"σ_rel = 0.3 is outside \(0, 0.2887\)"):
        sigma_rel_to_gamma(0.3)


def test_inner_product_matches_numeric_integral():
    ta, ga, tb, gb = 3.0, 2.0, 5.0, 4.0
    tau = np.linspace(0, ta, 200_001)
    pa = (ga + 1) * tau**ga / ta ** (ga + 1)
    pb = (gb + 1) * tau**gb / tb ** (gb + 1)
    numeric = np.trapezoid(pa * pb, tau)
    assert float(profile_inner_products(ta, ga, tb, gb)) == pytest.approx(numeric, rel=1e-6)
    assert float(profile_inner_products(tb, gb, ta, ga)) == pytest.approx(numeric, rel=1e-6)


def test_target_equal_to_a_stored_profile_is_exact():
    times = [256.0 * k for k in range(1, 17) for _ in (0, 1)]
    sigmas = [s for _ in range(16) for s in (0.05, 0.10)]
    x = posthoc_weights(times, sigmas, 0.10, t_out=4096.0)
    want = np.zeros(32)
    want[31] = 1.0  # the σ 0.10 snapshot at t = 4096
    np.testing.assert_allclose(x, want, atol=1e-9)


def _power_ema_run(n_steps: int, sigmas: list[float], every: int, dim: int = 16):
    """A random-walk 'training run' with power EMAs tracked and snapshotted every `every` steps."""
    g = torch.Generator().manual_seed(0)
    theta = torch.zeros(dim, dtype=torch.float64)
    gammas = [sigma_rel_to_gamma(s) for s in sigmas]
    emas = [torch.zeros(dim, dtype=torch.float64) for _ in sigmas]
    snaps = []
    for t in range(1, n_steps + 1):
        theta = theta + torch.randn(dim, generator=g, dtype=torch.float64)
        for e, gm in zip(emas, gammas):
            beta = (1 - 1 / t) ** (gm + 1)  # EDM2's power_function_beta with Δt = 1
            e.mul_(beta).add_(theta, alpha=1 - beta)
        if t % every == 0:
            snaps += [(float(t), s, e.clone()) for s, e in zip(sigmas, emas)]
    return snaps


def test_reconstruction_matches_a_directly_tracked_ema():
    snaps = _power_ema_run(4096, [0.05, 0.10], 256)
    target = _power_ema_run(4096, [0.08, 0.13], 4096)
    times, sig = [s[0] for s in snaps], [s[1] for s in snaps]
    stack = torch.stack([s[2] for s in snaps])
    spread = float(stack.std())
    for _, s_out, direct in target:
        x = torch.from_numpy(posthoc_weights(times, sig, s_out))
        rec = (x[:, None] * stack).sum(0)
        assert float((rec - direct).abs().max()) / spread < 2e-3, s_out


def test_checkpoint_power_weights_equal_the_discrete_power_ema():
    sigma = 0.1
    gm = sigma_rel_to_gamma(sigma)
    w = checkpoint_power_weights([1.0, 2.0, 3.0, 4.0, 5.0], sigma)
    # EMA over the 5 checkpoints with β_k = (1 − 1/k)^(γ+1): weight of k is (1−β_k) Π_{j>k} β_j
    betas = [(1 - 1 / k) ** (gm + 1) for k in range(1, 6)]
    ref = [(1 - betas[k]) * math.prod(betas[k + 1 :]) for k in range(5)]
    np.testing.assert_allclose(w, ref, rtol=1e-12)
    assert w.sum() == pytest.approx(1.0)


def test_cli_writes_one_folder_per_sigma(tmp_path):
    import merge.api as api
    from merge.io import load_state_dict, save_state_dict
    from merge.posthoc_ema import write_posthoc_ema

    snaps = _power_ema_run(64, [0.05, 0.10], 16, dim=6)
    paths = []
    for i, (t, s, e) in enumerate(snaps):
        p = tmp_path / f"snap{i:02d}.safetensors"
        save_state_dict(
            {"w": e.float().reshape(2, 3)}, p, metadata={"step": str(int(t)), "sigma_rel": str(s)}
        )
        paths.append(str(p))
    assert api is not None
    out = write_posthoc_ema(paths, [0.05, 0.08], tmp_path / "out", quiet=True)
    assert [p.name for p in out] == ["sigma_0.050", "sigma_0.080"]
    got = load_state_dict(out[0])["w"]
    torch.testing.assert_close(got, snaps[-2][2].float().reshape(2, 3))  # σ 0.05 at t = 64: exact


def test_merge_ema_sigma_rel_command(tmp_path):
    from click.testing import CliRunner

    from merge.cli import cli
    from merge.io import load_state_dict, save_state_dict

    snaps = _power_ema_run(32, [0.05, 0.10], 8, dim=4)
    manifest = {"snapshots": []}
    for i, (t, s, e) in enumerate(snaps):
        save_state_dict({"w": e.float()}, tmp_path / f"s{i}.safetensors")
        manifest["snapshots"].append({"path": f"s{i}.safetensors", "step": t, "sigma_rel": s})
    (tmp_path / "manifest.json").write_text(__import__("json").dumps(manifest))
    res = CliRunner().invoke(
        cli,
        [
            "ema",
            str(tmp_path / "manifest.json"),
            "--sigma-rel",
            "0.1",
            "-o",
            str(tmp_path / "out"),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    got = load_state_dict(tmp_path / "out" / "sigma_0.100")["w"]
    torch.testing.assert_close(got, snaps[-1][2].float())  # σ 0.10 at t = 32 is stored: exact
