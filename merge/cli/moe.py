"""`merge moe`: a mixture-of-experts checkpoint from a dense base and dense experts."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from merge.cli.options import (
    dtype_option,
    force_option,
    no_card_option,
    output_option,
    quiet_option,
    shard_size_option,
)
from merge.errors import MergeWarning, UsageError


@click.command("moe")
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@output_option("Output folder (or give it after CONFIG).")
@force_option()
@dtype_option(
    "Output dtype (default: the config's `dtype`, else the base's).",
    choices=("float32", "float16", "bfloat16"),
)
@shard_size_option
@click.option(
    "--random-seed",
    "seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the random gates and expert noise (mergekit's --random-seed draws the same gates).",
)
@click.option(
    "--i-understand-this-is-not-useful-without-training",
    "allow_all_same",
    is_flag=True,
    help="Allow every expert to be the same model (as mergekit-moe's flag).",
)
@quiet_option("No progress or summary.")
@no_card_option("Write no model card (README.md) or config file beside the weights.")
def moe(
    config: Path,
    out: Path | None,
    output: Path | None,
    force: bool,
    dtype: str | None,
    shard_size: str | None,
    seed: int,
    allow_all_same: bool,
    quiet: bool,
    no_card: bool,
) -> None:
    """Build a Mixtral or Qwen2-MoE checkpoint from a mergekit-moe CONFIG.

    Attention, norms and embeddings come from `base_model`; each layer's experts are the MLPs
    of the `experts` models; the routers come from `gate_mode` (hidden, cheap_embed, random).
    """
    from merge.moe import build_moe

    if out is not None and output is not None and out != output:
        raise UsageError(f"two outputs given ({out} and -o {output}); give one")
    dest = output or out
    if dest is None:
        raise UsageError("merge moe needs an output folder: merge moe CONFIG -o OUT")
    with warnings.catch_warnings():
        if quiet:  # -q prints errors only
            warnings.simplefilter("ignore", MergeWarning)
        build_moe(
            config,
            dest,
            force=force,
            dtype=dtype,
            shard_size=shard_size,
            seed=seed,
            quiet=quiet,
            card=not no_card,
            allow_all_same=allow_all_same,
        )


def register(cli: click.Group) -> None:
    cli.add_command(moe)
