"""`merge moe`: a mixture-of-experts checkpoint from a dense base and dense experts."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from merge.cli.core import _check_shard_size
from merge.errors import MergeWarning, UsageError


@click.command("moe")
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output folder (or give it after CONFIG).",
)
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Output dtype (default: the config's `dtype`, else the base's).",
)
@click.option(
    "--shard-size",
    default=None,
    callback=_check_shard_size,
    help="Largest shard, e.g. 5GB (default) or 500MB; at least 1MB.",
)
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
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary.")
@click.option(
    "--no-card",
    is_flag=True,
    help="Write no model card (README.md) or config file beside the weights.",
)
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
