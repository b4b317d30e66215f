"""A Gram statistics pass read straight from the input files, on two threads.

SLERP's norms and angle and Model Stock's cosines are Gram sums over whole tensors
(`methods._gram.BlockGram`): a statistics pass reads every input once more before the apply
pass. Through the engine's chunks that pass is copied out of the page cache in 8 MiB chunks
by one thread and summed by another, so every byte crosses main memory three times (copied
out, written, read back) and the two threads hand each other the GIL per chunk. Here each
thread runs one compiled loop that preads a range of 128K elements of every input into its
own small buffers and sums them while they are in its core's cache: no Python per range, no
GIL, each byte read from memory once.

The sums are `BlockGram`'s, bit for bit: every block of REDUCE_BLOCK elements is summed by
the same loop (`_loops.gram_in_block`, lanes in element order), the blocks' sums are kept by
block index and added in block order by `BlockGram.total`. Which thread read which range
changes nothing.

Inputs qualify when their tensors lie in files as stored (`TensorSource.file_span`:
safetensors) and are bfloat16; anything else goes through the engine's chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, wait
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import numpy as np

from merge.methods._gram import BlockGram

# 128K elements per range: 256 KiB of bfloat16 per input, so a range of four inputs stays in
# a core's cache until summed. Measured on Model Stock's pass over the 8B-shaped set (base + 3,
# 10 GB) in a Python prototype: 256 KiB 1.6 s on two threads, 128 KiB 1.8 s, 1 MiB slower.
RANGE_ELEMENTS = 1 << 17

# How a thread's loop ended (its first return value).
DONE, NOT_FINITE, READ_FAILED = 0, 1, 2


@dataclass(frozen=True)
class GramFiles:
    """A pass's inputs as (descriptor, byte offset) spans, in the Gram's vector order, and the
    span subtracted from each (the base of task vectors), if any."""

    vectors: Sequence[tuple[int, int]]
    base: tuple[int, int] | None
    numel: int


@cache
def _loop() -> ModuleType:
    """The compiled loop, imported on first use (numba's import costs ~0.5 s)."""
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
    loop = _loop()
    first, second = gram.pair_index()
    k = len(files.vectors)
    fds = np.asarray([fd for fd, _ in files.vectors], dtype=np.int64)
    offsets = np.asarray([off for _, off in files.vectors], dtype=np.int64)
    base_fd, base_offset = files.base if files.base is not None else (-1, 0)
    sums = np.zeros((-(-files.numel // gram.size), len(gram.pairs)), dtype=np.float64)
    stop = np.zeros(1, dtype=np.int64)  # set by a thread that failed: the other stops too

    def run(thread: int) -> tuple[int, int]:
        scratch = np.empty((k + 1, RANGE_ELEMENTS), dtype=np.uint16)
        status, at = loop.gram_from_files(
            fds, offsets, base_fd, base_offset, files.numel, RANGE_ELEMENTS, thread, 2,
            first, second, gram.size, sums, scratch, stop,
        )  # fmt: skip
        return int(status), int(at)

    other = helper.submit(run, 1)
    try:
        mine = run(0)
    finally:
        wait([other])  # the helper's reads end before anything else happens
    for status, at in (mine, other.result()):
        if status != DONE:
            start = at * RANGE_ELEMENTS
            failed_range(start, min(files.numel, start + RANGE_ELEMENTS))
            raise RuntimeError(  # the range read fine the second time: say what happened
                f"elements [{start}, {start + RANGE_ELEMENTS}) could not be read or were not "
                "finite, then were on a second read: was an input file changed during the merge?"
            )
    gram.add_block_sums(0, sums)
