"""`merge lora bake|combine|extract|convert` and `merge inspect` on adapters, end to end."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from merge.cli import cli


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def test_bake_cli(llama: dict, work: Path) -> None:
    code, out = run(
        "lora",
        "bake",
        str(llama["base"]),
        str(llama["adapters"]["plain"]),
        "--scale",
        "1.0",
        "-o",
        str(work / "cli_baked"),
    )
    assert code == 0, out
    assert "baked 1 adapter(s)" in out
    got = load_file(next((work / "cli_baked").glob("*.safetensors")))
    for k, v in llama["merged"]["plain"].items():
        if k in got:
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5)
    code, out = run(
        "lora",
        "bake",
        str(llama["base"]),
        str(llama["adapters"]["plain"]),
        "-o",
        str(work / "cli_baked"),
    )
    assert code == 1 and "already exists; pass --force to replace it" in out
    code, out = run(
        "lora",
        "bake",
        str(llama["base"]),
        str(llama["adapters"]["plain"]),
        "--scale",
        "1,2",
        "-o",
        str(work / "x"),
    )
    assert code == 2 and "--scale has 2 values for 1 adapters" in out


def test_combine_cli_reports_energy(llama: dict, work: Path) -> None:
    code, out = run(
        "lora",
        "combine",
        str(llama["adapters"]["plain"]),
        str(llama["adapters"]["rank8"]),
        "--weights",
        "0.7,0.5",
        "-o",
        str(work / "cli_c"),
    )
    assert code == 0, out
    assert "exactly (ranks 4..12: the weighted sum of the deltas)" in out
    code, out = run(
        "lora",
        "combine",
        str(llama["adapters"]["plain"]),
        str(llama["adapters"]["rank8"]),
        "--weights",
        "0.7,0.5",
        "--rank",
        "2",
        "-o",
        str(work / "cli_c2"),
    )
    assert code == 0, out
    assert "by SVD (rank 2); retained energy" in out and "% overall, lowest" in out
    code, out = run(
        "lora",
        "combine",
        str(llama["adapters"]["plain"]),
        str(llama["adapters"]["rank8"]),
        "--factorwise",
        "-o",
        str(work / "cli_c3"),
    )
    assert code == 1 and "mismatched ranks in a factor-space operation" in out


def test_extract_and_convert_cli(llama: dict, work: Path) -> None:
    code, out = run(
        "lora",
        "extract",
        str(llama["base"]),
        str(work / "cli_baked"),
        "--rank",
        "4",
        "-o",
        str(work / "cli_ex"),
    )
    assert code == 0, out
    assert (
        "retained energy 100.0000% overall" in out or "retained energy 99.99" in out
    )  # a rank-4 change
    assert (work / "cli_ex" / "adapter_config.json").is_file()
    code, out = run(
        "lora",
        "convert",
        str(work / "cli_ex"),
        "--to",
        "kohya",
        "-o",
        str(work / "cli_ex.safetensors"),
    )
    assert code == 0 and "wrote kohya adapter" in out
    code, out = run(
        "lora", "convert", str(work / "cli_ex"), "--to", "kohya", "-o", str(work / "cli_ex_dir")
    )
    assert code == 2 and "a kohya LoRA is one file: give -o a .safetensors name" in out


def test_inspect_adapter(llama: dict) -> None:
    code, out = run("inspect", str(llama["adapters"]["patterns"]))
    assert code == 0, out
    assert "peft adapter, 7 modules" in out
