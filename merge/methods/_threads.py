"""Run the chunked kernels on one intra-op thread.

Each chunk op takes tens of microseconds; splitting it across OpenMP threads gains little and,
when other processes hold the cores, every op waits at a barrier for a descheduled thread
(measured on the 2-vCPU machine under load: TIES 5-8x slower with 2 threads than with 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """torch.set_num_threads(1) for the block, then the previous setting again."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
