"""Dtypes by name, tensor sizes, and the output-dtype rules: mixed inputs, no silent overflow.

The one table of the float dtypes a recipe, an option or a method parameter may name. Without
`--dtype` (`output.dtype`), each output tensor takes the dtype of the first checkpoint that has
it. When the inputs mix float dtypes (a float16 model with a bfloat16 one), the plan says so
and which dtype it writes. float16 holds |v| ≤ 65504 where bfloat16 and float32 reach ~3.4e38,
so a float16 output is checked as it is written: a tensor with values past that range (they
would become ±inf) is refused by name, with the fix (`--dtype bfloat16` or `float32`).

This module imports only torch: files (`merge.io`), math (`merge.methods`) and plans all use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from merge.errors import ExecutionError

# The float dtypes a recipe (`output.dtype`, `options.compute_dtype`), the CLI and methods name.
DtypeName = Literal["float32", "float16", "bfloat16", "float64"]
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
FLOAT_DTYPES = frozenset(DTYPE_NAMES.values())  # what merges; anything else is copied
FLOAT16_MAX = 65504.0  # torch.finfo(torch.float16).max


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16", as recipes, configs and messages write it."""
    return str(dtype).removeprefix("torch.")


class Sized:
    """`numel` and `nbytes` of a tensor described by its `shape` and `dtype` (a header entry,
    a planned output tensor, a file's tensor)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def mixed_dtype_note(
    by_dtype: Mapping[str, Sequence[str]], first: str, forced: torch.dtype | None
) -> str | None:
    """A note naming the dtype a merge of mixed float dtypes writes (None when they agree).

    Args:
        by_dtype: {dtype name: checkpoints holding float tensors of it}.
        first: the first checkpoint, whose dtypes the output keeps.
        forced: the dtype asked for (`--dtype`), which makes the note moot.
    """
    if len(by_dtype) < 2 or forced is not None:
        return None
    firsts = [d for d, ns in by_dtype.items() if first in ns]
    chosen = firsts[0] if len(firsts) == 1 else "the dtype each tensor has in it"
    mix = "; ".join(f"{d}: {', '.join(f'`{n}`' for n in ns)}" for d, ns in by_dtype.items())
    return (
        f"the inputs mix float dtypes ({mix}); the output is {chosen}, as in the first input "
        f"`{first}` (choose with --dtype or `output.dtype`)"
        + (
            "; values beyond float16's range (±65504) are refused, not written as inf"
            if chosen == "float16"
            else ""
        )
    )


def check_float16_range(name: str, tensor: Tensor) -> None:
    """Refuse a float16 output tensor holding ±inf: values past ±65504 overflowed in the cast."""
    if tensor.dtype != torch.float16:
        return
    if tensor.numel() == 0:
        return
    lo, hi = torch.aminmax(tensor)  # 2.7 GB/s on float16 where isinf().any() runs at 0.12
    if bool(torch.isinf(lo)) or bool(torch.isinf(hi)):
        bad = torch.isinf(tensor)
        raise ExecutionError(
            f"`{name}`: {int(bad.sum())} value(s) are beyond float16's range (±65504) and would be "
            "written as inf; write bfloat16 or float32 instead (--dtype bfloat16, or `output.dtype` "
            "in the recipe)"
        )


def guard_float16(
    write: Callable[[str, Tensor], None], checked: Collection[str]
) -> Callable[[str, Tensor], None]:
    """`write` that first refuses the `checked` float16 outputs with overflowed (infinite) values."""

    def guarded(name: str, tensor: Tensor) -> None:
        if name in checked:
            check_float16_range(name, tensor)
        write(name, tensor)

    return guarded
