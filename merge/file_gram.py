"""SLERP's and Model Stock's two passes read straight from the input files, on two threads.

SLERP's norms and angle and Model Stock's cosines are Gram sums over whole tensors
(`methods._gram.BlockGram`); both then apply an ordered sum Σ c_v·x_v to the same inputs. Through
the engine's chunks each pass is copied out of the page cache in 8 MiB chunks by the reader
thread and computed by the main thread, so every byte crosses main memory three times (copied
out, written, read back). Here each of two threads (the main thread and the reader thread) runs
one compiled loop (`merge._file_gram_loop`) that preads alternate ranges of 128K elements of
every input into its own 256 KiB buffers and computes on them while they are in its core's
cache: no Python per range, no GIL (a Python loop over such ranges on two threads was slower
than one thread: the GIL changed hands per range), each byte read from memory once.

Same bits as the chunks: every Gram block of REDUCE_BLOCK elements is summed by the loop
`BlockGram.add` uses (`_loops.gram_in_block`) and the block sums are added in block order by
`BlockGram.total`; the ordered sum is elementwise, in the kernels' loops' arithmetic. Which
thread read which range changes nothing.

Inputs qualify when their tensors lie in files as stored (`TensorSource.file_span`:
safetensors) and are bfloat16; anything else goes through the engine's chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, wait
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import TypeVar

import numpy as np

from merge.gcpause import collection_paused
from merge.methods._gram import BlockGram

# 128K elements per range: 256 KiB of bfloat16 per input, so a range of four inputs stays in
# a core's cache until summed. Measured on Model Stock's pass over the 8B-shaped set (base + 3,
# 10 GB) in a Python prototype: 256 KiB 1.6 s on two threads, 128 KiB 1.8 s, 1 MiB slower.
RANGE_ELEMENTS = 1 << 17

_R = TypeVar("_R")


@dataclass(frozen=True)
class GramFiles:
    """A pass's inputs as (descriptor, byte offset) spans, in the Gram's vector order, and the
    span subtracted from each (the base of task vectors), if any."""

    vectors: Sequence[tuple[int, int]]
    base: tuple[int, int] | None
    numel: int


@cache
def _loop() -> ModuleType:
    """The compiled loop, imported on first use (numba's import costs ~0.5 s); its objects live
    as long as the process, so the collector is paused while they are created (`loops()`)."""
    with collection_paused(freeze=True):
        from merge import _file_gram_loop

    return _file_gram_loop


def fill_gram(
    gram: BlockGram,
    files: GramFiles,
    helper: Executor,
    failed_range: Callable[[int, int], None],
) -> None:
    """Fill `gram` (empty, flat) with the sums of `files`' vectors: the calling thread and one
    `helper` thread take alternate ranges. When a range cannot be read or holds NaN/inf,
    `failed_range(start, stop)` is called with its elements (it re-reads them the ordinary way
    and raises the error that names the file or the input) once both threads have stopped."""
    assert gram.cols == 1 and RANGE_ELEMENTS % gram.size == 0, "flat sums, whole blocks"
    first, second = gram.pair_index()
    k = len(files.vectors)
    fds, offsets = _spans(files.vectors)
    base_fd, base_offset = files.base if files.base is not None else (-1, 0)
    sums = np.zeros((-(-files.numel // gram.size), len(gram.pairs)), dtype=np.float64)

    def run(thread: int, flag: np.ndarray) -> tuple[int, int]:
        scratch = np.empty((k + 1, RANGE_ELEMENTS), dtype=np.uint16)
        status, at = _loop().gram_from_files(
            fds, offsets, base_fd, base_offset, files.numel, RANGE_ELEMENTS, thread, 2,
            first, second, gram.size, sums, scratch, flag,
        )  # fmt: skip
        return int(status), int(at)

    for status, at in _on_two_threads(run, helper):
        _raise_for(status, at, 0, files.numel, failed_range)
    gram.add_block_sums(0, sums)


def fill_sum(
    operands: Sequence[tuple[int, int]],
    coefs: Sequence[float],
    start: int,
    stop: int,
    out: np.ndarray,
    helper: Executor,
    failed_range: Callable[[int, int], None],
) -> bool:
    """out (bfloat16 bits of elements [start, stop)) = Σ coefs[v]·operand_v, each product
    rounded and added in order, then rounded to bfloat16 (`Kernel.ordered_sum`), read from the
    operands' spans by this thread and `helper` in alternate ranges; returns whether every
    value is finite. A range that cannot be read goes to `failed_range` as in `fill_gram`."""
    fds, offsets = _spans(operands)
    weights = np.asarray(coefs, dtype=np.float32)

    def run(thread: int, flag: np.ndarray) -> tuple[int, int, bool]:
        scratch = np.empty((len(operands), RANGE_ELEMENTS), dtype=np.uint16)
        status, at, finite = _loop().sum_from_files(
            fds, offsets, weights, start, stop, RANGE_ELEMENTS, thread, 2, out, scratch, flag
        )
        return int(status), int(at), bool(finite)

    done = _on_two_threads(run, helper)
    for status, at, _ in done:
        _raise_for(status, at, start, stop, failed_range)
    return all(finite for _, _, finite in done)


def _spans(spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.asarray([fd for fd, _ in spans], dtype=np.int64),
        np.asarray([off for _, off in spans], dtype=np.int64),
    )


def _on_two_threads(run: Callable[[int, np.ndarray], _R], helper: Executor) -> list[_R]:
    """`run(thread, stop)` for threads 0 (this one) and 1 (`helper`); `stop` is the flag a
    failing loop sets to end the other's. Both have returned when this does."""
    stop = np.zeros(1, dtype=np.int64)
    other = helper.submit(run, 1, stop)
    try:
        mine = run(0, stop)
    finally:
        wait([other])  # the helper's reads end before anything else happens
    return [mine, other.result()]


def _raise_for(
    status: int, at: int, start: int, stop: int, failed_range: Callable[[int, int], None]
) -> None:
    if status == _loop().DONE:
        return
    lo = start + at * RANGE_ELEMENTS
    hi = min(stop, lo + RANGE_ELEMENTS)
    failed_range(lo, hi)
    raise RuntimeError(  # the range read fine the second time: say what happened
        f"elements [{lo}, {hi}) could not be read or were not finite, then were on a second "
        "read: was an input file changed during the merge?"
    )
