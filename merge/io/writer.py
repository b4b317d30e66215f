"""Streaming safetensors writer: headers computed up front, bytes appended in order, atomic rename.

Every header is known from the plan before any tensor exists, so each shard file gets its
header first and the tensors' bytes are then appended in plan order, chunk by chunk; no shard
is ever held in memory. Output goes to a temporary path beside the destination and is renamed
into place only when complete; any exception, Ctrl-C or a full disk removes it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from merge.dtypes import Sized
from merge.errors import DiskFullError, ExecutionError, PlanError
from merge.io.directio import SequentialFile
from merge.io.output import StagedOutput
from merge.io.safetensors import TORCH_TO_ST

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FilePlan",
    "OutputTensor",
    "StagedOutput",
    "TensorFileWriter",
    "check_free_space",
    "parse_size",
    "plan_files",
    "write_json",
    "write_tensors",
]

DEFAULT_SHARD_SIZE = 5 * 1000**3  # "5GB", as Hugging Face and mergekit count it


@dataclass(frozen=True)
class OutputTensor(Sized):
    """One tensor of an output file: its name, shape and dtype (its bytes come later)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class FilePlan:
    """One safetensors file of the output: its relative path and its tensors in write order."""

    relpath: str
    tensors: list[OutputTensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def header(self) -> bytes:
        entries: dict[str, object] = {}
        if self.metadata:
            entries["__metadata__"] = self.metadata
        pos = 0
        for t in self.tensors:
            entries[t.name] = {
                "dtype": TORCH_TO_ST[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [pos, pos + t.nbytes],
            }
            pos += t.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer pads
        return len(raw).to_bytes(8, "little") + raw

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, plain integers are bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 1000,
        "MB": 1000**2,
        "GB": 1000**3,
        "TB": 1000**4,
        "B": 1,
    }
    value: float | None = None
    for u, mult in units.items():
        if s.endswith(u):
            try:
                value = float(s[: -len(u)]) * mult
            except ValueError:
                pass
            break
    else:
        try:
            value = float(int(s))
        except ValueError:
            pass
    if value is None:
        raise PlanError(f"cannot read size `{text}`; write it like 5GB, 500MB or 2GiB")
    if value > 2**63:  # inf included: `1e400GB`
        raise PlanError(f"size `{text}` is too large")  # the recipe's wording (merge.recipe)
    if not math.isfinite(value) or value < 1:
        raise PlanError(f"size `{text}` is out of range; give a positive size, like 5GB or 500MB")
    return int(value)


def plan_files(
    tensors: Sequence[OutputTensor],
    *,
    single_file: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    prefix: str = "model",
    subfolder: str = "",
    metadata: Mapping[str, str] | None = None,
) -> tuple[list[FilePlan], dict[str, object] | None]:
    """Split tensors (in write order) into shard files named as Hugging Face does, plus the index.

    Returns (file plans, index JSON or None for a single file).
    """
    meta = dict(metadata or {})
    meta.setdefault("format", "pt")
    sub = f"{subfolder}/" if subfolder else ""
    if single_file is not None:
        return [FilePlan(single_file, list(tensors), meta)], None
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return [FilePlan(f"{sub}{prefix}.safetensors", groups[0], meta)], None
    n = len(groups)
    plans = [
        FilePlan(f"{sub}{prefix}-{i + 1:05d}-of-{n:05d}.safetensors", g, meta)
        for i, g in enumerate(groups)
    ]
    weight_map = {t.name: Path(p.relpath).name for p in plans for t in p.tensors}
    index = {"metadata": {"total_size": sum(p.data_bytes for p in plans)}, "weight_map": weight_map}
    return plans, index


def check_free_space(where: Path, needed: int) -> None:
    """Refuse before writing when the file system lacks `needed` bytes (plus 1% slack)."""
    probe = where if where.exists() else where.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * 1.01:
        raise DiskFullError(
            f"not enough disk space for the output at {where}: need {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free; free some space or write elsewhere with -o"
        )


def _libc_fallocate() -> Any:
    """Linux's fallocate(2) through libc, or None (another system, or no libc found)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _libc_fallocate()


def reserve(fd: int, size: int, path: Path) -> None:
    """Allocate a new file's `size` bytes before writing them: ext4/xfs then map its blocks
    once instead of on every append (measured: a 2.5 GB output written in 0.6-0.9 s instead of
    1.0-3.9 s), and a disk that cannot hold it is reported now, not after the merge's work.
    The fallocate(2) system call, not posix_fallocate, whose fallback on file systems without
    it writes the whole file an extra time; there nothing is reserved."""
    if _FALLOCATE is None or size <= 0:
        return
    if _FALLOCATE(fd, 0, 0, size) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(
            f"the disk cannot hold {path} ({size / 1e9:.2f} GB), found before writing it; the "
            "partial output was removed; free some space or write elsewhere with -o"
        )
    # EOPNOTSUPP, EINVAL and the like: a file system without it; appends allocate as they go


class TensorFileWriter:
    """Appends tensors, in plan order and possibly in chunks, to the files of a staged output.

    Files are written around the page cache where the file system allows (`SequentialFile`).
    Use it as a context manager: leaving on an exception closes the open file without writing
    what is staged (the staged output, and the file with it, is then removed).
    """

    def __init__(self, root: Path, plans: Sequence[FilePlan]):
        self.root = root
        self.plans = list(plans)
        self._where: dict[str, tuple[int, int]] = {}
        for fi, p in enumerate(self.plans):
            for ti, t in enumerate(p.tensors):
                self._where[t.name] = (fi, ti)
        self._file_idx = -1
        self._tensor_idx = 0
        self._written = 0  # bytes of the current tensor written so far
        self._fh: SequentialFile | None = None
        self._open_next_file()

    def _open_next_file(self) -> None:
        self._close_file()
        self._file_idx += 1
        self._tensor_idx = 0
        self._written = 0
        if self._file_idx < len(self.plans):
            p = self.plans[self._file_idx]
            path = self.root / p.relpath if p.relpath else self.root
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = SequentialFile(path)  # closed in _close_file, or discarded in __exit__
            header = p.header()
            reserve(self._fh.fileno(), len(header) + p.data_bytes, path)
            self._raw_write(header)

    def _close_file(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with self._disk_errors():
                fh.close()  # writes the staged tail; the descriptor is closed even if that fails

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is not None and self._fh is not None:
            self._fh.discard()
            self._fh = None

    def _raw_write(self, data: bytes | memoryview) -> None:
        assert self._fh is not None
        with self._disk_errors():
            self._fh.write(data)

    @contextmanager
    def _disk_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(
                    f"the disk filled up while writing to {self.root}; the partial output was removed"
                ) from e
            raise

    def expected(self) -> OutputTensor | None:
        """The tensor the writer expects next, or None when every file is complete."""
        while self._file_idx < len(self.plans) and self._tensor_idx >= len(
            self.plans[self._file_idx].tensors
        ):
            self._open_next_file()
        if self._file_idx >= len(self.plans):
            return None
        return self.plans[self._file_idx].tensors[self._tensor_idx]

    def write(self, name: str, data: Tensor) -> None:
        """Append `data` (all or the next chunk of tensor `name`) in its file."""
        t = self.expected()
        if t is None or t.name != name:
            raise ExecutionError(
                f"internal: writer expected `{t.name if t else None}` but got `{name}`"
            )
        if data.dtype != t.dtype:
            raise ExecutionError(
                f"internal: `{name}` arrived as {data.dtype}, planned as {t.dtype}"
            )
        data = data.detach().reshape(-1).contiguous().cpu()
        raw = data.view(torch.uint8) if data.dtype != torch.bool else data.to(torch.uint8)
        self._raw_write(raw.numpy().data)
        self._written += raw.numel()
        if self._written > t.nbytes:
            raise ExecutionError(f"internal: more bytes than planned for `{name}`")
        if self._written == t.nbytes:
            self._tensor_idx += 1
            self._written = 0

    def finish(self) -> None:
        if self.expected() is not None:
            t = self.expected()
            raise ExecutionError(
                f"internal: output is incomplete, `{t.name if t else ''}` was never written"
            )
        self._close_file()


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_tensors(
    dest: Path,
    tensors: Mapping[str, Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    extra_files: Iterable[tuple[str, Path]] = (),
) -> Path:
    """Write an in-memory tensor dict atomically: `x.safetensors` -> one file, else a sharded folder."""
    dest = Path(dest)
    single = dest.suffix == ".safetensors"
    order = [OutputTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    plans, index = plan_files(
        order, single_file="" if single else None, shard_size=shard_size, metadata=metadata
    )
    with StagedOutput(dest, is_dir=not single, force=force) as staged:
        check_free_space(dest, sum(p.data_bytes for p in plans))
        with TensorFileWriter(staged.path(), plans) as w:
            for k, v in tensors.items():
                w.write(k, v)
            w.finish()
        if index is not None:
            write_json(staged.path("model.safetensors.index.json"), index)
        if not single:
            for rel, src in extra_files:
                shutil.copyfile(src, staged.path(rel))
        return staged.commit()
