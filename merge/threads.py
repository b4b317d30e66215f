"""How many intra-op threads torch uses, and when: the one place that sets them.

Small ops lose to thread hand-offs: each chunk op of a streamed merge, the training step of a toy
model, one evaluation point of a small network take tens of microseconds to milliseconds, and
splitting them across OpenMP threads gains little. When other processes hold the cores, every
op also waits at a barrier for a descheduled thread (measured on the 2-vCPU machine under load:
TIES 5-8x slower with 2 threads than with 1). So:

- chunked kernels and toy training run under `one_thread()` / `threads(1)`;
- whole-matrix work (SVD, large matmuls) keeps torch's setting;
- process-pool workers split the cores between them (`threads_per_worker`); a Ray actor, which
  asks Ray for one CPU, uses one thread (`pin_threads(1)`).

The streaming engine (`merge.execute`) switches per item between one thread and the caller's
setting itself, as its loop knows which item is whole-matrix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block on `n` intra-op threads (None: torch's setting), then restore the count."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread() -> AbstractContextManager[None]:
    """`threads(1)`: for chunked kernels and tiny models."""
    return threads(1)


def pin_threads(n: int) -> None:
    """Set this process's intra-op threads for good (a worker process, at start)."""
    torch.set_num_threads(max(1, n))


def threads_per_worker(workers: int) -> int:
    """The cores split evenly between `workers` processes, at least one thread each."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
