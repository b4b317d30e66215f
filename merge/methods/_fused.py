"""When the compiled loops (`_loops`) can take a pass, and the lazy import that loads them."""

from __future__ import annotations

import os
from functools import cache
from types import ModuleType

import torch
from torch import Tensor

# MERGE_NO_LOOPS=1 runs every pass as torch operations (the reference the loops are tested
# against, and what CUDA tensors always use).
NO_LOOPS = "MERGE_NO_LOOPS"


@cache
def loops() -> ModuleType:
    """`merge.methods._loops`, imported on first use (numba's import and the compiled code's
    load cost ~0.5 s, which a run without a streaming method never pays)."""
    from merge.methods import _loops

    return _loops


def usable(*tensors: Tensor | None) -> bool:
    """Whether the loops take these tensors: contiguous float32 on the CPU, all of them."""
    if os.environ.get(NO_LOOPS, "") not in ("", "0"):
        return False
    return all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())
        for t in tensors
    )
