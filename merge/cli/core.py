"""Core commands: demo, linear, run, validate, inspect, ema."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from merge.cli.options import (
    compose,
    device_option,
    dtype_option,
    force_option,
    no_card_option,
    output_option,
    parse_floats,
    quiet_option,
    shard_size_option,
    unsafe_pickle_option,
    var_option,
    weights_option,
)
from merge.errors import MergeWarning, UsageError
from merge.mergekit_schema import help_text as mergekit_help_text

# Options every writing command shares (see README: "Options shared by the writing commands").
output_options = compose(
    output_option("Output: a folder (sharded) or a .safetensors file."),
    force_option(),
    dtype_option("Output dtype (default: the first checkpoint's, per tensor)."),
    shard_size_option,
    device_option("cpu", "Where the math runs: cpu, cuda, cuda:N or auto."),
    click.option(
        "--keys",
        type=click.Choice(["strict", "intersection", "union"]),
        default=None,
        help="How to reconcile different key sets (default strict).",
    ),
    click.option(
        "--mixed-architectures",
        is_flag=True,
        help="With --keys: write an output its copied config.json does not describe.",
    ),
    unsafe_pickle_option(),
    quiet_option("No progress bar."),
    no_card_option(),
)


def _write(
    recipe: Any,
    command: str,
    opts: dict[str, Any],
    *,
    output_required: bool = True,
    vars: dict[str, float] | None = None,
    **extra: Any,
) -> None:
    """Run a recipe with the shared output options (the writer reports what it wrote)."""
    from merge.api import run_recipe
    from merge.execute import pick_device
    from merge.recipe import load_recipe

    if output_required and opts["output"] is None:
        raise UsageError(f"{command} needs -o/--output")
    pick_device(opts["device"])  # before any work: a bad --device is a clean error
    with _warnings_shown(opts):
        program = load_recipe(recipe, vars=vars)
        _echo_translation(program)
        run_recipe(program, **opts, **extra)


def _echo_translation(program: Any) -> None:
    if program.translated_from:
        click.echo(
            f"note: this is a {program.translated_from} config; translated with `compat: mergekit`",
            err=True,
        )


@contextmanager
def _warnings_shown(opts: dict[str, Any]) -> Iterator[None]:
    """Our warnings, unless -q (which prints errors only)."""
    with warnings.catch_warnings():
        if opts["quiet"]:
            warnings.simplefilter("ignore", MergeWarning)
        yield


def _parse_vars(pairs: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--var takes NAME=NUMBER, like lam=0.5; got `{p}`") from None
    return out


@click.command()
@click.argument("models", nargs=-1, required=True)
@weights_option("Comma-separated weights, one per model (default: equal).")
@click.option(
    "--normalize/--no-normalize",
    default=True,
    show_default=True,
    help="Divide by the sum of the weights (as mergekit does).",
)
@output_options
def linear(models: tuple[str, ...], weights: str | None, normalize: bool, **opts: Any) -> None:
    """Weighted average of checkpoints: Σ w_i·x_i / Σ w_i."""
    from merge.api import linear_recipe

    if len(models) < 2:
        raise UsageError("merge linear needs at least two models")
    w = parse_floats(weights, "--weights") if weights else None
    if w is not None and len(w) != len(models):
        raise UsageError(
            f"--weights has {len(w)} values for {len(models)} models; give one weight per model"
        )
    _write(linear_recipe(list(models), w, normalize=normalize), "merge linear", opts)


@click.command(epilog=mergekit_help_text())  # one table with the importer: they cannot drift
@click.argument("recipe", type=click.Path(path_type=Path))
@var_option()
@output_options
def run(recipe: Path, vars_: tuple[str, ...], **opts: Any) -> None:
    """Run a YAML recipe (ours, or a mergekit config); -o overrides the recipe's output path."""
    _write(recipe, "merge run", opts, vars=_parse_vars(vars_) or None, output_required=False)


@click.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@var_option("Override a recipe var: NAME=NUMBER.")
@click.option(
    "--no-inputs", is_flag=True, help="Check the recipe alone, without opening the inputs' headers."
)
@click.option("--limit", default=12, show_default=True, help="How many planned tensors to list.")
def validate(recipe: Path, vars_: tuple[str, ...], no_inputs: bool, limit: int) -> None:
    """Check a recipe and print the resolved plan (reads headers only, never tensors)."""
    from merge.execute import describe_plan
    from merge.plan import format_form
    from merge.recipe import load_recipe

    program = load_recipe(recipe, vars=_parse_vars(vars_) or None)
    _echo_translation(program)
    if no_inputs:
        click.echo(f"{recipe}: ok")
        for name, form in program.steps.items():
            click.echo(f"  {name} = {format_form(form, name)}")
        return
    from merge.api import plan_recipe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergeWarning)  # describe_plan lists the plan's notes
        plan = plan_recipe(program)
    try:
        click.echo(f"{recipe}: ok")
        click.echo(describe_plan(plan, limit=limit))
    finally:
        plan.close()


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--base", help="Base checkpoint: report task-vector norms (and cosines between several models)."
)
@click.option("--limit", default=40, show_default=True, help="Rows to print (0: all).")
@unsafe_pickle_option("Allow PyTorch pickles with arbitrary objects.")
@quiet_option("No progress bar.")
def inspect(
    paths: tuple[str, ...], base: str | None, limit: int, unsafe_pickle: bool, quiet: bool
) -> None:
    """Tensors, dtypes, shapes, bytes and shards; with --base, task-vector norms and cosines."""
    from merge.inspect import describe_checkpoint, describe_task_vectors

    if base is None:
        for p in paths:
            click.echo(describe_checkpoint(p, limit=limit, unsafe_pickle=unsafe_pickle))
    else:
        click.echo(
            describe_task_vectors(
                base, list(paths), limit=limit, unsafe_pickle=unsafe_pickle, quiet=quiet
            )
        )


@click.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option(
    "--decay",
    type=float,
    help="EMA decay per checkpoint (AveragedModel updated once per checkpoint).",
)
@click.option(
    "--step-decay",
    type=float,
    help="EMA decay per training step; needs --every N or a step in each name (checkpoint-100, step_100, ckpt-0100, epoch=3-step=100).",
)
@click.option(
    "--every", type=int, help="Training steps between consecutive checkpoints (with --step-decay)."
)
@click.option(
    "--warmup-gamma",
    type=float,
    help="timm ModelEmaV3 warm-up, min(decay, 1 - (1 + t/γ)^(-power)), applied at every training step (--step-decay) or checkpoint (--decay).",
)
@click.option("--warmup-power", type=float, default=0.75, show_default=True)
@click.option("--swa", is_flag=True, help="Uniform average (stochastic weight averaging).")
@click.option(
    "--sigma-rel",
    help="Post-hoc EMA (EDM2): comma-separated σ_rel targets from power-EMA snapshots.",
)
@click.option(
    "--buffers",
    type=click.Choice(["average", "last"]),
    default="average",
    show_default=True,
    help="Float buffers (BatchNorm statistics): averaged like weights, or from the last checkpoint. Integer buffers always come from the last.",
)
@output_options
def ema(
    checkpoints: tuple[str, ...],
    decay: float | None,
    step_decay: float | None,
    every: int | None,
    warmup_gamma: float | None,
    warmup_power: float,
    swa: bool,
    sigma_rel: str | None,
    buffers: str,
    **opts: Any,
) -> None:
    """EMA or SWA of an ordered checkpoint sequence, streamed as one weighted sum."""
    from merge.ema import sequence_weights, write_ema
    from merge.posthoc_ema import posthoc_targets

    if opts["output"] is None:
        raise UsageError("merge ema needs -o/--output")
    say = (lambda msg: None) if opts["quiet"] else (lambda msg: click.echo(msg, err=True))
    run = {k: v for k, v in opts.items() if k != "output"}
    if sigma_rel is not None:
        sigmas = parse_floats(sigma_rel, "--sigma-rel")
        for t in posthoc_targets(checkpoints, sigmas, opts["output"]):
            say(f"σ_rel {t.sigma_rel:.3f}: weights " + ", ".join(f"{w:.4g}" for w in t.weights))
            with _warnings_shown(opts):
                write_ema(t.paths, t.weights, t.output, **run)
        return
    chosen = sequence_weights(
        checkpoints,
        decay=decay,
        step_decay=step_decay,
        every=every,
        swa=swa,
        warmup_gamma=warmup_gamma,
        warmup_power=warmup_power,
    )
    if chosen.steps_from_names is not None:
        say(
            "steps read from the names: "
            + ", ".join(
                f"{Path(c).name or c} → {s}" for c, s in zip(checkpoints, chosen.steps_from_names)
            )
        )
    say("weights: " + ", ".join(f"{w:.6g}" for w in chosen.weights))
    with _warnings_shown(opts):
        write_ema(list(checkpoints), chosen.weights, opts["output"], buffers=buffers, **run)


@click.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("demo-output"),
    show_default=True,
    help="Where the demo leaves its checkpoints, recipe and merges.",
)
@force_option("Replace an existing demo folder.")
@quiet_option("Only the final tables.")
def demo(workdir: Path, force: bool, quiet: bool) -> None:
    """Train a tiny base and fine-tunes on synthetic tasks, then show task arithmetic at work."""
    from merge.demo import run_demo

    click.echo(run_demo(workdir, force=force, progress=None if quiet else click.echo))


def register(cli: click.Group) -> None:
    for cmd in (demo, linear, run, validate, inspect, ema):
        cli.add_command(cmd)
