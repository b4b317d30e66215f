"""Options shared by several commands, each defined once: its flags, type, default and check.

A command that needs one calls its factory here (`force_option()`), passing only what its docs
say differently: the help line, whether it is required, and, for `--device`, `--metric` and
`--seed`, the default its page promises (writing commands and `merge align` run on the CPU
unless told otherwise; evaluations pick `auto`). Nothing here imports torch: `merge --help`
stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from merge.errors import UsageError

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

# Output dtypes (`merge.dtypes.DTYPE_NAMES`, kept here so the CLI loads without torch).
DTYPES = ("float32", "float16", "bfloat16", "float64")
DEFAULT_SHARD_TEXT = "5GB"  # `merge.recipe.DEFAULT_SHARD_TEXT`


def compose(*decorators: Decorator) -> Decorator:
    """Apply `decorators` as if stacked in this order above a function (so --help lists them so)."""

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for deco in reversed(decorators):
            fn = deco(fn)
        return fn

    return apply


# -- writing an output ---------------------------------------------------------------------


def output_option(
    help: str, *, required: bool = False, file_okay: bool = True, default: Any = None
) -> Decorator:
    """`-o/--output`: where the command writes (a Path)."""
    return click.option(
        "-o",
        "--output",
        type=click.Path(file_okay=file_okay, path_type=Path),
        required=required,
        default=default,
        help=help,
    )


def force_option(help: str = "Replace an existing output.") -> Decorator:
    return click.option("--force", is_flag=True, help=help)


def quiet_option(help: str) -> Decorator:
    return click.option("-q", "--quiet", is_flag=True, help=help)


def dtype_option(help: str, *, choices: tuple[str, ...] = DTYPES) -> Decorator:
    """`--dtype`: an output dtype name; `choices` narrows them where a builder supports fewer."""
    return click.option("--dtype", type=click.Choice(choices), default=None, help=help)


def _check_shard_size(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`--shard-size` as typed: readable and at least 1 MB (`5B` is surely a typo for 5GB)."""
    if value is None:
        return None
    from merge.recipe import parse_shard_size

    try:
        parse_shard_size(value)
    except UsageError as e:
        raise click.BadParameter(str(e)) from None
    return value


# None, not "5GB": `merge run` keeps the recipe's own `output.shard_size` unless told otherwise.
shard_size_option = click.option(
    "--shard-size",
    default=None,
    callback=_check_shard_size,
    help=f"Largest shard of a folder output, e.g. {DEFAULT_SHARD_TEXT} (default) or 500MB; at least 1MB.",
)


def no_card_option(
    help: str = "Write no model card (README.md) or recipe file beside the weights.",
) -> Decorator:
    return click.option("--no-card", is_flag=True, help=help)


def device_option(default: str, help: str) -> Decorator:
    """`--device cpu|cuda|cuda:N|auto`, checked by `merge.execute.pick_device` when the command runs."""
    return click.option("--device", default=default, show_default=True, help=help)


def unsafe_pickle_option(
    help: str = "Allow PyTorch pickles with arbitrary objects (runs their code: trusted files only).",
) -> Decorator:
    return click.option("--unsafe-pickle", is_flag=True, help=help)


def var_option(help: str = "Override a recipe var: NAME=NUMBER (repeatable).") -> Decorator:
    return click.option("--var", "vars_", multiple=True, help=help)


def weights_option(help: str) -> Decorator:
    """`--weights 0.5,0.3,0.2`: one number per input (read with `parse_floats`)."""
    return click.option("--weights", default=None, help=help)


def parse_floats(text: str, flag: str) -> list[float]:
    """`0.5,0.3,0.2` -> [0.5, 0.3, 0.2]: finite numbers, or a UsageError naming `flag`."""
    parts = [x.strip() for x in text.split(",") if x.strip()]
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise UsageError(
            f"{flag} takes comma-separated numbers, like 0.5,0.3,0.2; got `{text}`"
        ) from None
    bad = [x for x, v in zip(parts, values) if not math.isfinite(v)]
    if bad:
        raise UsageError(f"{flag} must be finite numbers; got {', '.join(bad)} in `{text}`")
    return values


# -- user code: models and data ------------------------------------------------------------


def model_option(help: str, *, required: bool = False, dest: str = "model") -> Decorator:
    """`--model MODULE:FN`: make_model() -> nn.Module (merge.entrypoints)."""
    return click.option("--model", dest, metavar="MODULE:FN", required=required, help=help)


def data_option(
    help: str, *, required: bool = False, dest: str = "data", multiple: bool = False
) -> Decorator:
    """`--data MODULE:FN`: make_data() -> batches (merge.entrypoints)."""
    return click.option(
        "--data", dest, metavar="MODULE:FN", required=required, multiple=multiple, help=help
    )


def seed_option(help: str | None = None) -> Decorator:
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def n_examples_option(help: str) -> Decorator:
    return click.option("--n-examples", default=256, show_default=True, help=help)


fisher_kind_option = click.option(
    "--fisher-kind",
    type=click.Choice(["exact", "sampled", "empirical"]),
    default="exact",
    show_default=True,
)


# -- evaluation results --------------------------------------------------------------------


def metric_option(default: str, help: str) -> Decorator:
    return click.option("--metric", default=default, show_default=True, help=help)


def save_option(help: str) -> Decorator:
    return click.option("--save", type=click.Path(file_okay=False), help=help)


def no_plot_option(help: str | None = None) -> Decorator:
    return click.option("--no-plot", is_flag=True, help=help)


def range_option(default: str, help: str | None = None, *, dest: str = "range_") -> Decorator:
    return click.option(
        "--range", dest, default=default, show_default=True, metavar="START:STOP", help=help
    )


def grid_option(default: int) -> Decorator:
    return click.option(
        "--grid", type=int, default=default, show_default=True, help="Points per axis."
    )


# -- LoRA adapters -------------------------------------------------------------------------

LORA_FORMATS = ("peft", "diffusers", "kohya")


def lora_format_option(help: str | None = None, *, required: bool = False) -> Decorator:
    """`--to peft|diffusers|kohya`."""
    return click.option(
        "--to", "fmt", type=click.Choice(LORA_FORMATS), required=required, default=None, help=help
    )
