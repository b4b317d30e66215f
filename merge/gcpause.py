"""Pausing the interpreter's cyclic garbage collector around bulk allocations that all stay alive.

torch, numba and a large safetensors header each create hundreds of thousands of objects that
live as long as the process. While they are being created the collector's thresholds keep
firing, and every full collection walks every live object, so the pauses add up (three full
collections, 0.17 s, during numba's import alone on the 8B-shaped benchmark). Pausing it spares
those walks; freezing afterwards moves the survivors out of all later collections.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collection_paused(*, freeze: bool = False) -> Iterator[None]:
    """No automatic collection inside the block; with `freeze`, what survives it is never
    walked again (for imports: their objects live as long as the process). The collector is
    re-enabled only if it was enabled before, so blocks nest."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was_enabled:
            gc.enable()
