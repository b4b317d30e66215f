"""Output dtype: which one a merge of mixed-precision inputs writes, and no silent overflow.

Without `--dtype` (`output.dtype`), each output tensor takes the dtype of the first checkpoint
that has it. When the inputs mix float dtypes (a float16 model with a bfloat16 one), the plan
says so and which dtype it writes. float16 holds |v| ≤ 65504 where bfloat16 and float32 reach
~3.4e38, so a float16 output is checked as it is written: a tensor with values past that range
(they would become ±inf) is refused by name, with the fix (`--dtype bfloat16` or `float32`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from merge.errors import ExecutionError
from merge.io.sources import TensorSource

if TYPE_CHECKING:
    from merge.plan import Plan

FLOAT16_MAX = 65504.0  # torch.finfo(torch.float16).max


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def input_float_dtypes(
    sources: Mapping[str, TensorSource], inputs: Sequence[str]
) -> dict[str, list[str]]:
    """{dtype name: inputs holding float tensors of it}, over the headers of `inputs`."""
    by_dtype: dict[str, list[str]] = {}
    for n in inputs:
        src = sources[n]
        seen = {src.meta(k).dtype for k in src.keys()}
        for dt in sorted((d for d in seen if d.is_floating_point), key=str):
            by_dtype.setdefault(_name(dt), []).append(n)
    return by_dtype


def mixed_dtype_note(
    sources: Mapping[str, TensorSource], checkpoints: Sequence[str], forced: torch.dtype | None
) -> str | None:
    """A note naming the dtype a merge of mixed float dtypes writes (None when they agree)."""
    by_dtype = input_float_dtypes(sources, checkpoints)
    if len(by_dtype) < 2 or forced is not None:
        return None
    first = checkpoints[0]
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


def float16_checked(plan: Plan) -> set[str]:
    """Output tensors that can overflow float16: written as float16 from anything but a
    float16 copy (a copy of a float16 tensor keeps its values, whatever they are)."""
    names = set()
    for job in plan.jobs:
        if job.out_dtype != torch.float16:
            continue
        if job.mode == "copy" and len(job.inputs) == 1:
            src = plan.sources[job.inputs[0].split("@")[0]]
            if job.name in src.key_set() and src.meta(job.name).dtype == torch.float16:
                continue
        names.add(job.name)
    return names


def guard_float16(
    write: Callable[[str, Tensor], None], plan: Plan
) -> Callable[[str, Tensor], None]:
    """`write` that first refuses the plan's float16 outputs with overflowed (infinite) values."""
    checked = float16_checked(plan)

    def guarded(name: str, tensor: Tensor) -> None:
        if name in checked:
            check_float16_range(name, tensor)
        write(name, tensor)

    return guarded
