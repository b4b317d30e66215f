"""The `merge` command line: one click group; each area registers its commands from its module.

A new verb goes in its area's module (docs/architecture.md, "Where would a new CLI verb go?");
shared options come from `merge.cli.options`.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

import click

from merge.errors import MergeError, MergeWarning


def _merge_warning_printer(previous: Any) -> Any:
    """A showwarning that prints our own warnings as one clean line (no internal path), each
    distinct one once per command, and hands any other warning to `previous`."""
    shown: set[str] = set()

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, MergeWarning):
            previous(message, category, *args, **kwargs)
            return
        text = str(message)
        if text not in shown:
            shown.add(text)
            click.echo(f"warning: {text}", err=True)

    return show


class MergeGroup(click.Group):
    """Maps MergeError to one clear message and its exit code; `--debug` shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        output = sys.modules.get("merge.io.output")  # not imported yet: nothing to reset
        if output is not None:
            output.reset_state()
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _merge_warning_printer(warnings.showwarning)
                warnings.simplefilter("always", MergeWarning)  # printed once each, above
                return super().invoke(ctx)
        except MergeError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:  # outside the writers, which name their output themselves
            if ctx.obj and ctx.obj.get("debug"):
                raise
            from merge.io.output import describe_os_error

            click.echo(f"Error: {describe_os_error(e)}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM as `Terminated` (merge.signals)
            if ctx.obj and ctx.obj.get("debug"):
                raise
            from merge.errors import Terminated
            from merge.io.output import interrupted_message
            from merge.signals import exit_code

            click.echo(interrupted_message(isinstance(e, Terminated)), err=True)
            ctx.exit(exit_code(e))


@click.group(cls=MergeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for merge errors.")
@click.version_option(package_name="mergewright", prog_name="merge")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Merge models and do task-vector arithmetic, from the command line or YAML recipes."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _heavy_imports_first(command: click.Command) -> None:
    """Import torch before the command body runs, with SIGINT/SIGTERM held back meanwhile.

    `merge --help` and usage errors never import it; a signal during the import (seconds) is
    acted on right after it instead of tearing it (tracebacks, aborts, or swallowed).
    """
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _heavy_imports_first(sub)
        return
    body = command.callback
    if body is None:
        return

    @functools.wraps(body)
    def run(*args: Any, **kwargs: Any) -> Any:
        from merge.gcpause import collection_paused
        from merge.signals import signals_held

        # torch's objects live as long as the process: the collector paused while they are
        # created (two full collections, ~0.07 s, in a SLERP merge) and never walks them after
        with signals_held(), collection_paused(freeze=True):
            import torch  # noqa: F401

        return body(*args, **kwargs)

    command.callback = run


def _register_all() -> None:
    from merge.cli import align, core, evaluate, lora, methods, moe

    for module in (core, methods, lora, align, evaluate, moe):
        module.register(cli)
    for command in cli.commands.values():
        _heavy_imports_first(command)


_register_all()
