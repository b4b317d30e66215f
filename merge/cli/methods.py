"""`merge methods` (the catalogue), `merge stats` and `merge data-merge` (Fisher, RegMean)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import click

from merge.cli.options import (
    data_option,
    fisher_kind_option,
    force_option,
    model_option,
    n_examples_option,
    output_option,
    parse_floats,
    weights_option,
)
from merge.errors import UsageError, did_you_mean


def _spec_lines(spec: object, verbose: bool) -> list[str]:
    from merge.methods import MethodSpec

    assert isinstance(spec, MethodSpec)
    base = (
        "base required"
        if spec.needs_base
        else ("base optional" if spec.accepts_base else "no base")
    )
    count = (
        f"{spec.min_models}"
        if spec.max_models == spec.min_models
        else f"{spec.min_models}+"
        if spec.max_models is None
        else f"{spec.min_models}-{spec.max_models}"
    )
    tags = [base, f"models {count}"]
    if spec.random:
        tags.append("random (seeded per tensor)")
    if spec.elementwise:
        tags.append("elementwise")
    lines = [f"{spec.name:<17} {spec.summary}"]
    if verbose:
        lines.append(f"{'':<17} params: {', '.join(spec.describe_params()) or 'none'}")
        lines.append(f"{'':<17} {'; '.join(tags)}")
        lines.append(f"{'':<17} ref: {spec.reference}")
    return lines


@click.command("methods")
@click.argument("pattern", required=False)
@click.option(
    "-v", "--verbose", is_flag=True, help="Parameters with defaults, base/model counts, reference."
)
def methods_cmd(pattern: str | None, verbose: bool) -> None:
    """List the merge methods (PATTERN: a name or a wildcard such as `dare*`)."""
    from merge.methods import list_methods

    specs = list_methods()
    names = [s.name for s in specs]
    if pattern:
        chosen = [s for s in specs if fnmatch.fnmatchcase(s.name, pattern)]
        if not chosen:
            raise UsageError(f"no merge method matches `{pattern}`{did_you_mean(pattern, names)}")
        verbose = verbose or len(chosen) == 1
    else:
        chosen = specs
    for s in chosen:
        for line in _spec_lines(s, verbose):
            click.echo(line)
    if not verbose:
        click.echo("\n`merge methods NAME` (or -v) shows parameters, defaults and references.")


@click.command("stats")
@click.argument("kind", type=click.Choice(["fisher", "regmean"]))
@click.argument("checkpoint", type=click.Path())
@model_option(
    "`module:function` building the model (make_model).", required=True, dest="model_spec"
)
@data_option("`module:function` returning batches (make_data).", required=True, dest="data_spec")
@output_option("A .safetensors file.", required=True)
@n_examples_option("Examples used for the statistics.")
@fisher_kind_option
@click.option(
    "--normalize", is_flag=True, help="Fisher: divide by its global L2 norm over the model."
)
@force_option()
def stats_cmd(
    kind: str,
    checkpoint: str,
    model_spec: str,
    data_spec: str,
    output: Path,
    n_examples: int,
    fisher_kind: str,
    normalize: bool,
    force: bool,
) -> None:
    """Save Fisher diagonals or RegMean Gram matrices of CHECKPOINT (same tensor names)."""
    from merge.entrypoints import make_data, make_model
    from merge.io import load_state_dict, save_state_dict
    from merge.io.output import check_output
    from merge.methods.data_aware import compute_statistics

    check_output(output, [checkpoint], force=force)
    model = make_model(model_spec)
    stats = compute_statistics(
        kind,
        model,
        load_state_dict(checkpoint),
        make_data(data_spec),
        n_examples=n_examples,
        fisher_kind=fisher_kind,
        normalize=normalize,
    )
    meta = {"merge_statistics": kind, "source": str(checkpoint), "n_examples": str(n_examples)}
    out = save_state_dict(stats, output, metadata=meta, force=force)
    click.echo(f"{kind} statistics for {len(stats)} tensors -> {out}")


@click.command("data-merge")
@click.argument("method", type=click.Choice(["fisher", "regmean"]))
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@model_option(
    "`module:function` building the model (make_model).", required=True, dest="model_spec"
)
@data_option(
    "`module:function` returning batches; once for all, or once per checkpoint.",
    required=True,
    dest="data_specs",
    multiple=True,
)
@weights_option("Weight per checkpoint, comma-separated (default 1 each).")
@click.option(
    "--alpha",
    default=0.1,
    show_default=True,
    help="RegMean: off-diagonal scale of the Gram matrices.",
)
@n_examples_option("Examples per model for the statistics.")
@fisher_kind_option
@output_option("Output folder or .safetensors file.", required=True)
@force_option()
def data_merge_cmd(
    method: str,
    checkpoints: tuple[str, ...],
    model_spec: str,
    data_specs: tuple[str, ...],
    weights: str | None,
    alpha: float,
    n_examples: int,
    fisher_kind: str,
    output: Path,
    force: bool,
) -> None:
    """Fisher or RegMean merge of CHECKPOINTS in memory, statistics computed from --data."""
    from merge.entrypoints import make_data, resolve
    from merge.io import load_state_dict, save_state_dict
    from merge.io.output import check_output
    from merge.methods.data_aware import merge_with_data

    check_output(output, checkpoints, force=force)
    w = None
    if weights is not None:
        w = parse_floats(weights, "--weights")
        if len(w) != len(checkpoints):
            raise UsageError(f"--weights has {len(w)} values for {len(checkpoints)} checkpoints")
    merged = merge_with_data(
        method,
        [load_state_dict(c) for c in checkpoints],
        make_model=lambda: resolve(model_spec, "--model")(),
        data=[make_data(d) for d in data_specs],
        weight=w,
        n_examples=n_examples,
        fisher_kind=fisher_kind,
        alpha=alpha,
    )
    out = save_state_dict(merged, output, metadata={"merge_method": method}, force=force)
    click.echo(f"{method} merge of {len(checkpoints)} checkpoints -> {out}")


def register(cli: click.Group) -> None:
    for cmd in (methods_cmd, stats_cmd, data_merge_cmd):
        cli.add_command(cmd)
