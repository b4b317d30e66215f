"""Safetensors files and sharded folders, read lazily from their headers with positioned reads.

We parse the header ourselves (8-byte little-endian length, then JSON) and read each tensor's
bytes with `os.preadv` into a caller's buffer, or map just one chunk's pages (`map_range`) for
the streaming loop. Neither keeps a whole file mapped, so peak RSS stays a few chunks whatever
the checkpoint size.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from merge.errors import FormatError
from merge.io.sources import TensorMeta, TensorSource

# safetensors dtype codes -> torch dtypes (quantized formats are refused by detect.py).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit
# Pre-fault the chunk's pages in the mapping call (Linux), so the reader thread pays the page
# faults and the compute thread finds the pages mapped.
_MAP_FLAGS = getattr(mmap, "MAP_SHARED", 0) | getattr(mmap, "MAP_POPULATE", 0)


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, __metadata__, byte offset where data starts) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path}: too short to be a safetensors file ({len(raw)} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER:
                raise FormatError(
                    f"{path}: not a safetensors file (header length {n} is implausible); "
                    "is it a PyTorch pickle or GGUF file with the wrong extension?"
                )
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from e
    meta = header.pop("__metadata__", None) or {}
    return header, meta, 8 + n


class SafetensorsSource(TensorSource):
    """One or more safetensors files presented as one lazy tensor dict."""

    def __init__(self, files: list[Path], display: str | None = None, root: Path | None = None):
        self._files = [Path(f) for f in files]
        self.path = display or str(self._files[0])
        self._root = root
        self._meta: dict[str, TensorMeta] = {}
        self._file_of: dict[str, int] = {}
        self.metadata: dict[str, str] = {}
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        for i, f in enumerate(self._files):
            entries, meta, data_start = read_header(f)
            if i == 0:
                self.metadata = dict(meta)
            size = f.stat().st_size
            for name, e in entries.items():
                if name in self._meta:
                    raise FormatError(
                        f"{self.path}: tensor `{name}` appears in both {self._meta[name].file} and {f}; "
                        "remove the duplicate shard"
                    )
                code = e.get("dtype")
                if code not in ST_DTYPES:
                    raise FormatError(
                        f"{f}: tensor `{name}` has dtype {code}, which merge cannot read "
                        "(quantized or packed formats must be dequantized first)"
                    )
                begin, end = e["data_offsets"]
                meta_t = TensorMeta(tuple(e["shape"]), ST_DTYPES[code], str(f), data_start + begin)
                if end - begin != meta_t.nbytes or data_start + end > size:
                    raise FormatError(
                        f"{f}: tensor `{name}` is truncated or malformed "
                        f"(header says {end - begin} bytes for shape {e['shape']} {code}); the file may be incomplete"
                    )
                self._meta[name] = meta_t
                self._file_of[name] = i

    def keys(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._meta[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named `{name}`") from None

    def _fd(self, i: int) -> int:
        with self._lock:
            if i not in self._fds:
                self._fds[i] = os.open(self._files[i], os.O_RDONLY)
            return self._fds[i]

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        m = self.meta(name)
        n = stop - start
        if out is None:
            out = torch.empty(n, dtype=m.dtype)
        item = m.dtype.itemsize
        buf = (out.view(torch.uint8) if out.dtype != torch.uint8 else out).numpy().data
        fd = self._fd(self._file_of[name])
        pos, want, done = m.offset + start * item, n * item, 0
        while done < want:
            got = os.preadv(fd, [buf[done:]], pos + done)
            if got == 0:
                raise FormatError(f"{m.file}: unexpected end of file while reading `{name}`")
            done += got
        return out

    def map_range(self, name: str, start: int, stop: int) -> Tensor | None:
        m = self.meta(name)
        item = m.dtype.itemsize
        begin = m.offset + start * item
        if os.name == "nt" or begin % item or stop <= start:
            return None
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        length = begin - aligned + (stop - start) * item
        fd = self._fd(self._file_of[name])
        if os.fstat(fd).st_size < begin + (stop - start) * item:
            # Touching a mapping past the end of a file kills the process (SIGBUS): check first.
            raise FormatError(f"{m.file}: unexpected end of file while reading `{name}`")
        mapped = mmap.mmap(fd, length, flags=_MAP_FLAGS, prot=mmap.PROT_READ, offset=aligned)
        with warnings.catch_warnings():
            # torch warns that the buffer is read-only; the engine never writes to inputs.
            warnings.simplefilter("ignore", UserWarning)
            # The tensor keeps `mapped` alive; the pages are unmapped when the tensor is freed.
            return torch.frombuffer(
                mapped, dtype=m.dtype, count=stop - start, offset=begin - aligned
            )

    def files(self) -> list[Path]:
        return list(self._files)

    def root(self) -> Path | None:
        return self._root

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
