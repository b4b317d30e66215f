"""The console entry point of `merge` and `mergewright` (and `python -m merge`).

Kept outside `merge.cli` so it runs before torch is imported: the interpreter's cyclic garbage
collector is paused while the command line loads (torch and its dependencies create about a
million objects, and each full collection during the later imports walked all of them), then the
loaded objects are frozen out of future collections. This takes about 0.1 to 0.3 s off every
command's start, which is a tenth of a merge of a 1 GB model.
"""

from __future__ import annotations

import gc
import sys


def main(args: list[str] | None = None, *, standalone_mode: bool = True) -> None:
    gc.disable()
    try:
        from merge.cli import cli
    finally:
        gc.freeze()
        gc.enable()
    cli(
        prog_name="merge",
        args=sys.argv[1:] if args is None else args,
        standalone_mode=standalone_mode,
    )
