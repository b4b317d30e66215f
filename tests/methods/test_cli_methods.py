"""`merge methods`, `merge stats`, `merge data-merge` through the click group."""

from __future__ import annotations

import textwrap

import torch
from click.testing import CliRunner

from merge.cli import cli
from merge.io import load_state_dict, save_state_dict
from merge.methods.regmean import regmean


def test_methods_lists_every_registered_method():
    from merge.methods import list_methods

    res = CliRunner().invoke(cli, ["methods"])
    assert res.exit_code == 0
    for s in list_methods():
        assert f"\n{s.name:<17} {s.summary}" in "\n" + res.output


def test_methods_detail_shows_defaults_and_reference():
    res = CliRunner().invoke(cli, ["methods", "dare_ties"])
    assert res.exit_code == 0
    assert "density (per model, default 1.0)" in res.output
    assert "rescale=True" in res.output and "compat='paper'" in res.output
    assert "random (seeded per tensor)" in res.output
    assert "ref: Yu et al. 2024" in res.output
    res = CliRunner().invoke(cli, ["methods", "dare*"])
    assert res.output.splitlines()[0].startswith("dare_linear") and "dare_ties" in res.output


def test_methods_unknown_pattern_suggests():
    res = CliRunner().invoke(cli, ["methods", "slurp"])
    assert res.exit_code == 2
    assert "no merge method matches `slurp` (did you mean `slerp`?)" in res.output


USER_CODE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_model():
        return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

    def data_a():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(12, 3, generator=g)
        return [(x, (x[:, 0] > 0).long())]

    def data_b():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(12, 3, generator=g)
        return [(x, (x[:, 1] > 0).long())]
    """
)


def _setup(tmp_path):
    user = tmp_path / "user.py"
    user.write_text(USER_CODE)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        p = tmp_path / f"m{seed}.safetensors"
        save_state_dict(dict(m.state_dict()), p)
        paths.append(str(p))
    return user, paths


def test_stats_and_data_merge_regmean(tmp_path):
    user, paths = _setup(tmp_path)
    runner = CliRunner()
    grams = []
    for p, d in zip(paths, ("data_a", "data_b")):
        out = tmp_path / f"g_{d}.safetensors"
        res = runner.invoke(
            cli,
            [
                "stats",
                "regmean",
                p,
                "--model",
                f"{user}:make_model",
                "--data",
                f"{user}:{d}",
                "-o",
                str(out),
            ],
        )
        assert res.exit_code == 0, res.output
        grams.append(load_state_dict(out))
    assert set(grams[0]) == {"0.weight", "2.weight"}
    merged_path = tmp_path / "merged.safetensors"
    res = runner.invoke(
        cli,
        [
            "data-merge",
            "regmean",
            *paths,
            "--model",
            f"{user}:make_model",
            "--data",
            f"{user}:data_a",
            "--data",
            f"{user}:data_b",
            "--alpha",
            "0.5",
            "-o",
            str(merged_path),
        ],
    )
    assert res.exit_code == 0, res.output
    merged = load_state_dict(merged_path)
    states = [load_state_dict(p) for p in paths]
    want = regmean(
        [s["0.weight"] for s in states],
        weight=[1, 1],
        statistics=[g["0.weight"] for g in grams],
        alpha=0.5,
    )
    torch.testing.assert_close(merged["0.weight"], want)
    torch.testing.assert_close(merged["0.bias"], (states[0]["0.bias"] + states[1]["0.bias"]) / 2)


def test_data_merge_fisher_runs_and_differs_from_the_mean(tmp_path):
    user, paths = _setup(tmp_path)
    out = tmp_path / "f.safetensors"
    res = CliRunner().invoke(
        cli,
        [
            "data-merge",
            "fisher",
            *paths,
            "--model",
            f"{user}:make_model",
            "--data",
            f"{user}:data_a",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    merged = load_state_dict(out)
    states = [load_state_dict(p) for p in paths]
    lo = torch.minimum(states[0]["2.weight"], states[1]["2.weight"])
    hi = torch.maximum(states[0]["2.weight"], states[1]["2.weight"])
    assert bool(
        ((merged["2.weight"] >= lo - 1e-6) & (merged["2.weight"] <= hi + 1e-6)).all()
    )  # a convex combination
    assert not torch.allclose(
        merged["2.weight"], (states[0]["2.weight"] + states[1]["2.weight"]) / 2
    )


def test_data_merge_wrong_weight_count(tmp_path):
    user, paths = _setup(tmp_path)
    res = CliRunner().invoke(
        cli,
        [
            "data-merge",
            "fisher",
            *paths,
            "--model",
            f"{user}:make_model",
            "--data",
            f"{user}:data_a",
            "--weights",
            "1",
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert res.exit_code == 2
    assert "--weights has 1 values for 2 checkpoints" in res.output
