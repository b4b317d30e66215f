"""Lazy views over a TensorSource that change how tensors are seen, never the files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from merge.errors import PlanError
from merge.io.sources import TensorMeta, TensorSource


class View(TensorSource):
    """A view of `source`: its tensor names, files, support files and components; its tensors
    as they are unless a subclass shows them otherwise (`meta`, `read_range`)."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.kind = source.kind
        self.path = source.path

    def keys(self) -> list[str]:
        return self.source.keys()

    def files(self) -> list[Path]:
        return self.source.files()

    def root(self) -> Path | None:
        return self.source.root()

    def support_files(self) -> list[tuple[str, Path]]:
        return self.source.support_files()

    def component_stems(self) -> dict[str, str]:
        return self.source.component_stems()

    def meta(self, name: str) -> TensorMeta:
        return self.source.meta(name)

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        return self.source.read_range(name, start, stop, out=out)


class CastView(View):
    """Floating-point tensors of `source` rounded to `dtype` (mergekit casts every input to its
    config's `dtype` before merging; `compat: mergekit` reads through this view to match)."""

    def __init__(self, source: TensorSource, dtype: torch.dtype):
        super().__init__(source)
        self.dtype = dtype

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

    def fingerprint(self) -> dict[str, object]:
        return self.source.fingerprint()

    def close(self) -> None:
        self.source.close()


class ChannelAligned(View):
    """`source` seen with `primary`'s shapes where they differ only in dim 1 (inpainting conv_in).

    A1111's rule: an inpainting (9-channel) or instruct-pix2pix (8-channel) A merged with a
    4-channel B merges only `A[:, :4]` with B; the extra input channels stay A's. Showing B with
    A's extra channels appended gives exactly that for every combination whose coefficients sum
    to one (weighted sum) and for differences (B − C: the extra channels cancel).
    """

    def __init__(self, source: TensorSource, primary: TensorSource):
        super().__init__(source)
        self.primary = primary
        self.padded: list[str] = []
        pkeys = set(primary.keys())
        for k in source.keys():
            if k not in pkeys:
                continue
            s, p = source.meta(k).shape, primary.meta(k).shape
            if s == p:
                continue
            if len(s) == len(p) >= 2 and s[0] == p[0] and s[2:] == p[2:]:
                if s[1] < p[1]:
                    self.padded.append(k)
                    continue
                raise PlanError(
                    f"`{k}` has {s[1]} input channels in {source.path} but {p[1]} in {primary.path}: when merging an "
                    "inpainting (9-channel) or instruct-pix2pix (8-channel) model with a normal one, the special "
                    "model must be the first input (A)"
                )

    def meta(self, name: str) -> TensorMeta:
        m = self.source.meta(name)
        if name in self.padded:
            return TensorMeta(self.primary.meta(name).shape, m.dtype)
        return m

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        if name not in self.padded:
            return self.source.read_range(name, start, stop, out)
        own = self.source.read(name)
        full = self.primary.read(name).to(own.dtype)  # the extra channels are the primary's
        full[:, : own.shape[1]] = own
        flat = full.reshape(-1)[start:stop]
        return out.copy_(flat) if out is not None else flat.clone()
