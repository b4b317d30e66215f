"""When the compiled loops (`_loops`) can take a pass, and the lazy import that loads them."""

from __future__ import annotations

import os
from functools import cache
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from merge.gcpause import collection_paused

# MERGE_NO_LOOPS=1 runs every pass as torch operations (the reference the loops are tested
# against, and what CUDA tensors always use).
NO_LOOPS = "MERGE_NO_LOOPS"


@cache
def loops() -> ModuleType:
    """`merge.methods._loops`, imported on first use (numba's import and the compiled code's
    load cost ~0.5 s, which a run without a streaming method never pays). numba's objects
    live as long as the process: the collector does not walk them while they are created, nor
    after."""
    with collection_paused(freeze=True):
        from merge.methods import _loops

        # numba loads its lowering registries (numpy's functions, which import scipy) at the
        # first call of any compiled function: here, inside the pause, rather than in a merge's
        # first pass (a full collection, ~0.1 s, in a SLERP merge).
        _loops.all_finite_bfloat16(np.zeros(0, dtype=np.uint16))

    return _loops


def enabled() -> bool:
    """Whether the loops may run at all (`MERGE_NO_LOOPS` unset)."""
    return os.environ.get(NO_LOOPS, "") in ("", "0")


def usable(*tensors: Tensor | None, widen: bool = False) -> bool:
    """Whether the loops take these tensors: contiguous float32 on the CPU, all of them, or
    (`widen`) also bfloat16 ones, which the loops read as their exact float32 values."""
    dtypes = (torch.float32, torch.bfloat16) if widen else (torch.float32,)
    return enabled() and all(
        t is None or (t.device.type == "cpu" and t.dtype in dtypes and t.is_contiguous())
        for t in tensors
    )


def as_array(t: Tensor) -> np.ndarray:
    """A loop's view of a `usable` tensor: float32 values, or bfloat16 as their uint16 bits
    (the loops' `value` widens those)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


# The output a loop that writes float32 or bfloat16 (bits) does not write this time, and the
# absent base of a loop that takes one.
NO_FLOAT32 = np.empty(0, dtype=np.float32)
NO_BFLOAT16 = np.empty(0, dtype=np.uint16)
