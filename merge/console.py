"""The console entry point of `merge` and `mergewright` (and `python -m merge`).

Kept outside `merge.cli` so it runs before torch is imported. First it installs the signal
policy (`merge.signals`): a Ctrl-C or SIGTERM during the start-up imports is recorded and acted
on once they are done, so it never tears an import (a traceback, or an abort inside torch) nor
gets swallowed. Then the interpreter's cyclic garbage collector is paused while the command
line loads (torch and its dependencies create about a million objects, and each full collection
during the later imports walked all of them), and the loaded objects are frozen out of future
collections: about 0.1 to 0.3 s off every command's start.
"""

from __future__ import annotations

import os
import sys

from merge.gcpause import collection_paused
from merge.malloc import keep_freed_blocks
from merge.signals import defer_signals, exit_code, raise_on_signals


def single_threaded_blas() -> None:
    """One OpenBLAS thread unless the user chose otherwise, set before numpy and scipy load
    it. The command's heavy math is torch's; numpy and scipy (both bring an OpenBLAS, which
    numba's import loads) only do small solves, and each OpenBLAS pool of a thread per core
    spins after start-up: measured, a SLERP merge of the 8B-shaped set spent 0.4 s of CPU on
    the two pools' spinning, on a 2-core machine whose cores the merge itself uses."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(args: list[str] | None = None, *, standalone_mode: bool = True) -> None:
    defer_signals()
    single_threaded_blas()
    keep_freed_blocks()  # before torch's imports allocate: see merge.malloc
    with collection_paused(freeze=True):
        from merge.cli import cli
    pending = raise_on_signals()
    if pending is not None:
        from merge.errors import Terminated

        e: KeyboardInterrupt = Terminated() if pending == 15 else KeyboardInterrupt()
        _interrupted(e, "during start-up; no output was written and the inputs are untouched.")
    try:
        cli(
            prog_name="merge",
            args=sys.argv[1:] if args is None else args,
            standalone_mode=standalone_mode,
        )
    except KeyboardInterrupt as e:  # outside a command (parsing, exit): nothing was staged
        if not standalone_mode:
            raise
        _interrupted(e, "; no output was written and the inputs are untouched.")


def _interrupted(e: KeyboardInterrupt, what: str) -> None:
    from merge.errors import Terminated

    word = "Terminated" if isinstance(e, Terminated) else "Interrupted"
    sep = "" if what.startswith(";") else " "
    sys.stderr.write(f"{word}{sep}{what}\n")
    sys.exit(exit_code(e))
