"""The TensorSource contract: a lazy tensor dict (headers first, tensors on demand)."""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from merge.dtypes import FLOAT_DTYPES, Sized
from merge.errors import FormatError, MergeWarning
from merge.io.support_files import select_support_files


@dataclass(frozen=True)
class TensorMeta(Sized):
    """What a header says about one tensor: enough to plan without reading data."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str = ""  # the file holding it ("" for in-memory sources)
    offset: int = 0  # byte offset of its data in `file`, for sequential read order

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def check_finite(chunk: Tensor, name: str, file: str, warned: set[str]) -> None:
    """Warn once per tensor (recorded in `warned`) when a chunk read from `file` holds NaN or Inf.

    A sum is NaN or Inf whenever an element is, so one cheap reduction filters; only a
    non-finite sum (possibly an overflow of finite values) pays for the exact elementwise test.
    """
    if chunk.numel() == 0 or math.isfinite(float(chunk.sum(dtype=torch.float32))):
        return
    bad = int((~torch.isfinite(chunk)).sum())
    if bad:
        warned.add(name)
        warnings.warn(
            f"{file}: tensor `{name}` holds {bad} NaN or Inf values in the range read; "
            "the merged tensor will be non-finite where it uses them",
            MergeWarning,
            stacklevel=2,
        )


class TensorSource:
    """A lazy mapping name -> tensor. Subclasses implement `keys`, `meta` and `read_range`.

    `kind` is "checkpoint" (full weights) or "delta" (a difference, e.g. a LoRA); the planner
    tracks checkpoint coefficients and treats deltas as already-differenced.

    `not_additive` is None for every source whose effect at coefficient k is k times its values.
    A delta that renormalises the weight it is added to (a DoRA adapter) says there what it is,
    for messages ("a DoRA adapter"); it adds only to the base it was opened against, as
    `at_strength(k)` with coefficient 1, and the planner refuses any other use.
    """

    kind: str = "checkpoint"
    path: str = "<memory>"
    not_additive: str | None = None

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, name: str) -> TensorMeta:
        raise NotImplementedError

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Elements [start, stop) of the flattened tensor, in its own dtype, on the CPU.

        When `out` (a 1-D tensor of that dtype with stop-start elements) is given, the data is
        read into it, so a caller can reuse buffers. The result never aliases a file mapping.
        Other reads warn once per tensor about NaN/Inf (`check_finite`); reads into a caller's
        buffer do not: the engine checks what it computes from them, which costs no extra pass.
        """
        raise NotImplementedError

    def file_span(self, name: str) -> tuple[int, int] | None:
        """(open descriptor, byte offset) where the tensor's elements lie as stored, in order,
        for a caller that reads them itself with pread (`merge.file_gram`); None when they
        are computed or converted on reading. The descriptor stays the source's: never close it."""
        return None

    def read(self, name: str) -> Tensor:
        m = self.meta(name)
        return self.read_range(name, 0, m.numel).view(m.shape)

    def at_strength(self, k: float) -> TensorSource:
        """A `not_additive` source's effect at coefficient k, as a source added with coefficient 1."""
        raise NotImplementedError(f"{self.path}: an additive source is scaled by its coefficient")

    def key_set(self) -> frozenset[str]:
        """The tensor names as a set (computed once: sources do not change)."""
        cached: frozenset[str] | None = getattr(self, "_key_set_cache", None)
        if cached is None:
            cached = frozenset(self.keys())
            self._key_set_cache = cached
        return cached

    def __contains__(self, name: object) -> bool:
        return name in self.key_set()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def files(self) -> list[Path]:
        """Tensor files behind this source (for fingerprints and the output-path checks)."""
        return []

    def root(self) -> Path | None:
        """The folder or file the user named, where non-tensor files (config.json...) live."""
        return None

    def support_files(self) -> list[tuple[str, Path]]:
        """Non-tensor files an output copies when this input is `copy_files_from`: (relpath, source).

        The default takes the files a Hugging Face / sentence-transformers folder loads, by name
        (`merge.io.support_files`); layouts such as diffusers pipelines override it.
        """
        root = self.root()
        if root is None or not root.is_dir() or not self.files() or self.files()[0].parent != root:
            return []
        return select_support_files(root, {f.name for f in self.files()})

    def component_stems(self) -> dict[str, str]:
        """For a folder of several models (a diffusers pipeline): each component's folder and
        the stem of its weight files (`unet` -> `diffusion_pytorch_model`). {} for one model."""
        return {}

    def fingerprint(self) -> dict[str, object]:
        """Hashes of the headers and sizes of the files: identifies the input without reading data."""
        h = hashlib.sha256()
        for k in sorted(self.keys()):
            m = self.meta(k)
            h.update(f"{k}|{m.dtype}|{m.shape}".encode())
        size = sum(f.stat().st_size for f in self.files())
        return {
            "path": self.path,
            "tensors": len(self.keys()),
            "bytes": size,
            "header_sha256": h.hexdigest()[:16],
        }

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileSource(TensorSource):
    """Tensors listed in the headers of one or more files (the shards of one checkpoint).

    A subclass reads the headers into `_meta` (name -> TensorMeta) and `_file_of` (name ->
    index into `files()`), and implements `read_range`.
    """

    def __init__(self, files: list[Path], display: str | None = None, root: Path | None = None):
        self._files = [Path(f) for f in files]
        self.path = display or str(self._files[0])
        self._root = root
        self._meta: dict[str, TensorMeta] = {}
        self._file_of: dict[str, int] = {}
        self._warned: set[str] = set()  # tensors already reported as holding NaN or Inf
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._meta[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named `{name}`") from None

    def files(self) -> list[Path]:
        return list(self._files)

    def root(self) -> Path | None:
        return self._root


class MemorySource(TensorSource):
    """A dict of tensors (or an `nn.Module`'s state dict) seen through the TensorSource contract."""

    def __init__(
        self, tensors: Mapping[str, Tensor], name: str = "<memory>", kind: str = "checkpoint"
    ):
        self._t = {k: v.detach() for k, v in tensors.items()}
        self.path = name
        self.kind = kind

    def keys(self) -> list[str]:
        return list(self._t)

    def meta(self, name: str) -> TensorMeta:
        t = self._t[name]
        return TensorMeta(tuple(t.shape), t.dtype)

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        flat = self._t[name].reshape(-1)[start:stop].cpu()
        if out is not None:
            return out.copy_(flat)
        return flat.clone()

    def fingerprint(self) -> dict[str, object]:
        fp = super().fingerprint()
        fp["bytes"] = sum(self.meta(k).nbytes for k in self.keys())
        return fp
