"""Progress and the closing summary of a write: a tqdm bar on a terminal, plain lines in logs.

On a terminal, stderr shows a tqdm bar that redraws in place. When stderr is not a TTY (CI logs,
`nohup`, a pipe), redraw frames would fill the log, so a plain line is written at most every
`PLAIN_PERIOD_S` seconds, plus one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Protocol, TextIO, TypeVar

T = TypeVar("T")

PLAIN_PERIOD_S = 30.0  # seconds between two plain progress lines


class Progress(Protocol):
    def update(self, n: int) -> object: ...
    def close(self) -> None: ...


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks and the shard size count)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


class PlainProgress:
    """`desc: 40% (1.2 GB of 3.0 GB), 12 s` every `period` seconds and once when closed."""

    def __init__(
        self,
        total: int,
        desc: str,
        stream: TextIO,
        period: float = PLAIN_PERIOD_S,
        unit: str = "B",
    ):
        self.total, self.desc, self.stream, self.period = total, desc, stream, period
        self.unit = unit
        self.done = 0
        self.start = self.last = time.monotonic()
        self.closed = False

    def _line(self, now: float) -> None:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        if self.unit == "B":
            amount = f"{human_bytes(self.done)} of {human_bytes(self.total)}"
        else:
            amount = f"{self.done} of {self.total} {self.unit}"
        self.stream.write(f"{self.desc}: {pct:.0f}% ({amount}), {now - self.start:.0f} s\n")
        self.stream.flush()
        self.last = now

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.period:
            self._line(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(time.monotonic())


class NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def byte_progress(total: int, desc: str, *, quiet: bool, stream: TextIO | None = None) -> Progress:
    """A progress counter of `total` bytes: tqdm on a TTY, `PlainProgress` otherwise, none if quiet."""
    stream = stream or sys.stderr
    if quiet:
        return NoProgress()
    if not stream.isatty():
        return PlainProgress(total, desc, stream)
    from tqdm import tqdm

    bar: Progress = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        file=stream,
    )
    return bar


def counted(items: Collection[T], desc: str, *, quiet: bool, unit: str = "tensors") -> Iterator[T]:
    """`items` with progress: tqdm on a TTY, plain lines every PLAIN_PERIOD_S otherwise."""
    stream = sys.stderr
    if quiet:
        yield from items
        return
    if stream.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, leave=False, file=stream)
        return
    bar = PlainProgress(len(items), desc, stream, unit=unit)
    for x in items:
        yield x
        bar.update(1)
    bar.close()


def write_summary(
    path: Path,
    *,
    tensors: int,
    nbytes: int,
    files: int,
    seconds: float,
    copied: list[str],
    source: str = "",
) -> str:
    """`wrote out: 291 tensors, 1.2 GB in 2 files, 3.4 s; copied from base: config.json, ...`."""
    noun = "file" if files == 1 else "files"
    text = (
        f"wrote {path}: {tensors} tensors, {human_bytes(nbytes)} in {files} {noun}, {seconds:.1f} s"
    )
    if copied:
        shown = ", ".join(copied[:12]) + (
            f" and {len(copied) - 12} more" if len(copied) > 12 else ""
        )
        text += f"; copied from {source}: {shown}" if source else f"; copied {shown}"
    return text
