"""Lazy views over a TensorSource that change how tensors are seen, never the files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from merge.io.sources import TensorMeta, TensorSource


class CastView(TensorSource):
    """Floating-point tensors of `source` rounded to `dtype` (mergekit casts every input to its
    config's `dtype` before merging; `compat: mergekit` reads through this view to match)."""

    def __init__(self, source: TensorSource, dtype: torch.dtype):
        self.source = source
        self.dtype = dtype
        self.kind = source.kind
        self.path = source.path

    def keys(self) -> list[str]:
        return self.source.keys()

    def meta(self, name: str) -> TensorMeta:
        m = self.source.meta(name)
        if not m.is_float or m.dtype == self.dtype:
            return m
        return TensorMeta(m.shape, self.dtype, m.file, m.offset)

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        m = self.source.meta(name)
        if not m.is_float or m.dtype == self.dtype:
            return self.source.read_range(name, start, stop, out=out)
        raw = self.source.read_range(name, start, stop)
        return out.copy_(raw) if out is not None else raw.to(self.dtype)

    def files(self) -> list[Path]:
        return self.source.files()

    def root(self) -> Path | None:
        return self.source.root()

    def support_files(self) -> list[tuple[str, Path]]:
        return self.source.support_files()

    def fingerprint(self) -> dict[str, object]:
        return self.source.fingerprint()

    def close(self) -> None:
        self.source.close()
