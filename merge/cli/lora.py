"""`merge lora bake|combine|extract|convert`: LoRA adapters as weight deltas."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from merge.cli.options import (
    DEFAULT_SHARD_TEXT,
    dtype_option,
    force_option,
    lora_format_option,
    output_option,
    parse_floats,
    quiet_option,
    shard_size_option,
    weights_option,
)
from merge.errors import MergeWarning, UsageError

SAVE_DTYPES = ("float32", "float16", "bfloat16")  # names only: torch loads when a command runs


def _floats(text: str | None, flag: str) -> list[float] | None:
    return None if text is None else parse_floats(text, flag)


def _echo_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)


@click.group("lora")
def lora_group() -> None:
    """LoRA adapters (PEFT, diffusers, kohya/A1111, LyCORIS) as weight deltas."""


@lora_group.command("bake")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option(
    "--scale",
    "scales",
    default="1.0",
    help="Strength per adapter, comma-separated (one value applies to all).",
)
@output_option("Output folder or .safetensors file.", required=True)
@dtype_option("Output dtype (default: the base's).")
@shard_size_option
@force_option()
@quiet_option("No progress bar or summary.")
def bake_cmd(
    base: str,
    adapters: tuple[str, ...],
    scales: str,
    output: Path,
    dtype: str | None,
    shard_size: str | None,
    force: bool,
    quiet: bool,
) -> None:
    """Write BASE + Σ scale·ADAPTER (= peft merge_and_unload / diffusers fuse_lora; DoRA included)."""
    from merge.io.output import check_output
    from merge.lora.bake import bake

    check_output(output, [base, *adapters], force=force)

    s = _floats(scales, "--scale") or [1.0]
    if len(s) == 1:
        s = s * len(adapters)
    if len(s) != len(adapters):
        raise UsageError(
            f"--scale has {len(s)} values for {len(adapters)} adapters; give one, or one per adapter"
        )
    unmatched: list[str] = []
    out = bake(
        base,
        list(zip(adapters, s)),
        output,
        dtype=dtype,
        shard_size=shard_size or DEFAULT_SHARD_TEXT,
        force=force,
        quiet=quiet,
        unmatched=unmatched,
    )
    for u in unmatched:
        click.echo(f"warning: {u}", err=True)
    if not quiet:
        click.echo(f"baked {len(adapters)} adapter(s) into {base} -> {out}")


@lora_group.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@weights_option("Weight per adapter, comma-separated (default 1 each).")
@click.option(
    "--rank",
    type=int,
    default=None,
    help="Re-factorise to this rank by SVD (lossy; energy reported).",
)
@click.option(
    "--energy",
    type=float,
    default=None,
    help="Re-factorise keeping this fraction of Σσ² per module.",
)
@lora_format_option(
    "Output format (default: kohya for kohya/LyCORIS inputs and a .safetensors -o, diffusers "
    "for pipeline adapters, else peft, a folder)."
)
@click.option(
    "--base",
    default=None,
    type=click.Path(),
    help="Base model: names kohya modules and checks shapes.",
)
@click.option(
    "--factorwise",
    is_flag=True,
    help="peft's `linear` factor mixing (approximate, equal ranks only).",
)
@output_option("Output folder or .safetensors file.", required=True)
@force_option()
def combine_cmd(
    adapters: tuple[str, ...],
    weights: str | None,
    rank: int | None,
    energy: float | None,
    fmt: str | None,
    base: str | None,
    factorwise: bool,
    output: Path,
    force: bool,
) -> None:
    """One adapter equal to Σ w_i·ΔW_i: exact (concatenated ranks) unless --rank/--energy."""
    from merge.io.output import check_output
    from merge.lora.combine import combine

    check_output(output, [*adapters, *([base] if base else [])], force=force)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MergeWarning)
        report, _ = combine(
            list(adapters),
            _floats(weights, "--weights"),
            output,
            rank=rank,
            energy=energy,
            fmt=fmt,
            base=base,
            factorwise=factorwise,
            force=force,
        )
    _echo_warnings(caught)
    for u in report.unmatched:
        click.echo(f"warning: no module of the base matches {u}", err=True)
    for u in report.dropped:
        click.echo(f"warning: not combined: {u}", err=True)
    if report.energy:
        for name, e in sorted(report.energy.items(), key=lambda kv: kv[1])[:10]:
            click.echo(f"  {e:.4%}  rank {report.rank_out[name]}  {name}")
    if factorwise:
        click.echo(
            "note: factor-wise mixing is an approximation (cross terms B_i·A_j), not the weighted sum of deltas"
        )
    click.echo(report.summary())


@lora_group.command("extract")
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@click.option("--rank", type=int, default=None, help="Rank per module (capped by the matrix).")
@click.option(
    "--energy",
    type=float,
    default=None,
    help="Smallest rank keeping this fraction of Σσ², per module.",
)
@lora_format_option(
    "Default from the base: peft (a folder) for a model folder, kohya (one .safetensors) "
    "for single-file SD, diffusers for pipelines. -o must fit the format."
)
@click.option(
    "--svd", type=click.Choice(["auto", "full", "randomized"]), default="auto", show_default=True
)
@click.option(
    "--min-diff",
    type=float,
    default=0.0,
    show_default=True,
    help="Skip tensors whose max |ΔW| is at most this.",
)
@click.option(
    "--save-dtype", type=click.Choice(list(SAVE_DTYPES)), default="float32", show_default=True
)
@output_option("Output folder or .safetensors file.", required=True)
@force_option()
def extract_cmd(
    base: str,
    tuned: str,
    rank: int | None,
    energy: float | None,
    fmt: str | None,
    svd: str,
    min_diff: float,
    save_dtype: str,
    output: Path,
    force: bool,
) -> None:
    """A LoRA from TUNED − BASE by truncated SVD per module."""
    import torch

    from merge.io.output import check_output
    from merge.lora.extract import extract

    check_output(output, [base, tuned], force=force)

    report, _ = extract(
        base,
        tuned,
        output,
        rank=rank,
        energy=energy,
        fmt=fmt,
        svd=svd,
        min_diff=min_diff,
        dtype=getattr(torch, save_dtype),
        force=force,
    )
    click.echo(report.summary())


@lora_group.command("convert")
@click.argument("adapter", type=click.Path())
@lora_format_option(required=True)
@click.option(
    "--base",
    default=None,
    type=click.Path(),
    help="Base model for kohya names outside the SD1.x/SDXL tables.",
)
@output_option("Output folder or .safetensors file.", required=True)
@force_option()
def convert_cmd(adapter: str, fmt: str, base: str | None, output: Path, force: bool) -> None:
    """Rewrite ADAPTER in another format; the delta is unchanged."""
    from merge.io.output import check_output
    from merge.lora.convert import convert

    check_output(output, [adapter, *([base] if base else [])], force=force)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MergeWarning)
        out = convert(adapter, fmt, output, base=base, force=force)
    _echo_warnings(caught)
    click.echo(f"wrote {fmt} adapter {out}")


def register(cli: click.Group) -> None:
    cli.add_command(lora_group)
