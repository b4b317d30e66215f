"""Safetensors files and sharded folders, read lazily from their headers with positioned reads.

We parse and validate the header ourselves (8-byte little-endian length, then JSON) and read
each tensor's bytes with `os.preadv` into a caller's (reused) buffer, so peak RSS stays a few
chunks whatever the checkpoint size. Inputs are never memory-mapped: a file truncated while a
mapping of it is touched kills the process with SIGBUS, with no message and no clean-up,
whereas a positioned read of a shrunken file returns short and becomes a clear error.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

import torch
from torch import Tensor

from merge.errors import FormatError
from merge.gcpause import collection_paused
from merge.io.sources import FileSource, TensorMeta, check_finite

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
_ITEMSIZE = {code: dt.itemsize for code, dt in ST_DTYPES.items()}
# The reference implementation allows 100 MB. A real header holds ~100 bytes per tensor, so the
# largest checkpoints' headers are a few MB; a bigger one is damaged or hostile, and parsing
# it costs ~0.15 s per MB here. Refusing above this keeps every open under ~4 s.
MAX_HEADER = 25 * 1024 * 1024
MAX_DIM = 2**62  # any real dimension is far below; larger ones overflow torch's int64 sizes


def _shown(name: str) -> str:
    """A tensor name safe to print (lone surrogates and control characters escaped)."""
    try:
        name.encode("utf-8")
        printable = name.isprintable()
    except UnicodeEncodeError:
        printable = False
    text = name if printable else ascii(name)[1:-1]
    return text if len(text) <= 200 else text[:200] + "..."


class _HeaderProblem(ValueError):
    pass


def open_regular(path: Path) -> int:
    """A read-only descriptor of a regular file; FIFOs, devices and folders are refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(
            f"{path}: not a regular file (a FIFO, device or folder); merge reads checkpoint files only"
        )
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return fd


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, __metadata__, byte offset where data starts) of one safetensors file.

    Validated as the reference reader does: the header is a JSON object of tensor entries
    {dtype, shape, data_offsets}; the offsets tile the data section from 0 to the end of the
    file with no gap or overlap, and each tensor's byte count is its dtype size x element count.
    """
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, 8, 0)
        if len(raw) < 8:
            raise FormatError(f"{path}: too short to be a safetensors file ({len(raw)} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            hint = (
                "is it a PyTorch pickle or GGUF file with the wrong extension?"
                if n > 100 * 1024 * 1024
                else f"merge reads headers up to {MAX_HEADER // 2**20} MiB"
            )
            raise FormatError(
                f"{path}: not a safetensors file we can read (header length {n} bytes); {hint}"
            )
        if 8 + n > size:
            raise FormatError(
                f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                "the file is truncated or not safetensors"
            )
        text = b""
        while len(text) < n:
            got = os.pread(fd, n - len(text), 8 + len(text))
            if not got:
                raise FormatError(f"{path}: unexpected end of file in the header")
            text += got
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from e
    finally:
        os.close(fd)
    try:
        if not text.lstrip()[:1] == b"{":
            raise _HeaderProblem("the header is not a JSON object")
        header = json.loads(
            text.decode("utf-8"),
            parse_constant=_refuse_constant,
        )
    except _HeaderProblem as e:
        raise FormatError(f"{path}: malformed safetensors header: {e}") from None
    except UnicodeDecodeError as e:
        raise FormatError(
            f"{path}: the safetensors header is not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    except RecursionError:
        raise FormatError(
            f"{path}: the safetensors header nests too deeply to be a tensor table"
        ) from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: malformed safetensors header: not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise FormatError(
            f"{path}: malformed safetensors header: `__metadata__` must map strings to strings"
        )
    if b"\\u" in text:  # only escapes can make lone surrogates; skip the scan otherwise
        for k, v in meta.items():
            _check_text(path, k, "a `__metadata__` key")
            _check_text(path, v, f"`__metadata__`.{_shown(k)}")
        for name in header:
            _check_text(path, name, "a tensor name")
    spans = []
    itemsize = _ITEMSIZE
    for name, entry in header.items():
        # Fast path for well-formed entries; anything unusual is diagnosed by _check_entry.
        try:
            begin, end = entry["data_offsets"]
            shape = entry["shape"]
            numel = 1
            for d in shape:
                if type(d) is not int or d < 0 or d >= MAX_DIM:
                    raise TypeError
                numel *= d
            if (
                type(begin) is not int
                or type(end) is not int
                or begin < 0
                or end - begin != numel * itemsize[entry["dtype"]]
                or type(shape) is not list
                or len(entry) < 3
            ):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            _check_entry(path, name, entry)  # raises naming the field
            raise FormatError(f"{path}: tensor `{_shown(name)}` has a malformed entry") from None
        spans.append((begin, end, name))
    # The data section is tiled exactly: sorted by start, each tensor begins where the previous
    # one ended, starting at 0 and ending at the end of the file.
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = (
                "overlaps the previous tensor"
                if begin < pos
                else f"leaves a gap of {begin - pos} bytes"
            )
            raise FormatError(
                f"{path}: tensor `{_shown(name)}` has data_offsets [{begin}, {end}] and {what} "
                f"(expected it to start at {pos}); the file is damaged"
            )
        pos = end
    if 8 + n + pos != size:
        raise FormatError(
            f"{path}: the header describes {pos} bytes of tensor data but the file holds "
            f"{size - 8 - n}; the file is truncated or damaged"
        )
    return header, meta, 8 + n


def _refuse_constant(name: str) -> object:
    raise _HeaderProblem(f"`{name}` is not a valid JSON number")


def _check_text(path: Path, text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(
            f"{path}: malformed safetensors header: {what} `{_shown(text)}` is not valid Unicode "
            "(a lone surrogate)"
        ) from None


def _is_int(x: object) -> bool:
    return type(x) is int


def _check_entry(path: Path, name: str, e: object) -> tuple[int, int, str]:
    """(begin, end, name) of one tensor entry after checking its fields and byte count."""
    where = f"{path}: tensor `{_shown(name)}`"
    if not isinstance(e, dict):
        raise FormatError(f"{where}: its header entry is {type(e).__name__}, not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in e:
            raise FormatError(f"{where}: its header entry has no `{field}`")
    code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(code, str):
        raise FormatError(f"{where}: `dtype` must be a string, not {type(code).__name__}")
    if code not in ST_DTYPES:
        raise FormatError(
            f"{where}: has dtype {_shown(code)}, which merge cannot read "
            "(quantized or packed formats must be dequantized first)"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < MAX_DIM for d in shape):
        raise FormatError(
            f"{where}: `shape` must be a list of non-negative integers, not {_short(shape)}"
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise FormatError(
            f"{where}: `data_offsets` must be two non-negative integers [begin, end], not {_short(offsets)}"
        )
    begin, end = offsets
    numel = math.prod(shape)
    if end < begin or end - begin != numel * _ITEMSIZE[code]:
        raise FormatError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but shape {shape} {code} "
            f"needs {numel * _ITEMSIZE[code]}; the file is damaged"
        )
    return begin, end, name


def _short(x: object) -> str:
    text = json.dumps(x, ensure_ascii=True) if not isinstance(x, float) else repr(x)
    return text if len(text) <= 80 else text[:80] + "..."


class SafetensorsSource(FileSource):
    """One or more safetensors files presented as one lazy tensor dict."""

    def __init__(self, files: list[Path], display: str | None = None, root: Path | None = None):
        super().__init__(files, display, root)
        self.metadata: dict[str, str] = {}
        self._fds: dict[int, int] = {}
        # Headers hold up to hundreds of thousands of small objects, all kept: pausing the
        # cyclic GC spares the repeated full collections their allocation would trigger
        # (in a large process each one walks every live object).
        with collection_paused():
            self._read_headers()

    def _read_headers(self) -> None:
        for i, f in enumerate(self._files):
            entries, meta, data_start = read_header(f)
            if i == 0:
                self.metadata = dict(meta)
            file = str(f)
            for name, e in entries.items():
                if name in self._meta:
                    raise FormatError(
                        f"{self.path}: tensor `{_shown(name)}` appears in both "
                        f"{self._meta[name].file} and {f}; remove the duplicate shard"
                    )
                self._meta[name] = TensorMeta(
                    tuple(e["shape"]),
                    ST_DTYPES[e["dtype"]],
                    file,
                    data_start + e["data_offsets"][0],
                )
                self._file_of[name] = i

    def _fd(self, i: int) -> int:
        with self._lock:
            if i not in self._fds:
                self._fds[i] = open_regular(self._files[i])
            return self._fds[i]

    def file_span(self, name: str) -> tuple[int, int] | None:
        return self._fd(self._file_of[name]), self.meta(name).offset

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        m = self.meta(name)
        n = stop - start
        into_callers_buffer = out is not None
        if out is None:
            out = torch.empty(n, dtype=m.dtype)
        item = m.dtype.itemsize
        buf = (out.view(torch.uint8) if out.dtype != torch.uint8 else out).numpy().data
        fd = self._fd(self._file_of[name])
        pos, want, done = m.offset + start * item, n * item, 0
        try:
            while done < want:
                got = os.preadv(fd, [buf[done:]], pos + done)
                if got == 0:
                    raise FormatError(
                        f"{m.file}: the file ended while reading `{_shown(name)}`; it was truncated "
                        "or replaced after merge opened it. Keep inputs unchanged while merging"
                    )
                done += got
        except OSError as e:
            raise FormatError(f"{m.file}: cannot read `{_shown(name)}` ({e.strerror})") from e
        if not into_callers_buffer and out.is_floating_point() and name not in self._warned:
            check_finite(out, name, m.file, self._warned)
        return out

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


def files_from_index(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names, each a regular file inside the index's folder."""
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{index}: not a valid shard index ({str(e)[:200]})") from None
    except OSError as e:
        raise FormatError(f"{index}: cannot read ({e.strerror})") from e
    if not isinstance(data, dict) or "weight_map" not in data:
        raise FormatError(f"{index}: not a valid shard index (no `weight_map`)")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index}: `weight_map` must map tensor names to file names")
    files: dict[str, None] = {}
    for name, f in weight_map.items():
        where = f"{index}: `weight_map`.{ascii(name)[1:-1][:200]}"
        if not isinstance(f, str) or not f or "\0" in f:
            raise FormatError(f"{where} must be a file name, not {json.dumps(f)[:80]}")
        try:
            f.encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError(f"{where} must be a file name, not {ascii(f)[:80]}") from None
        # Shards sit in the index's folder: an index must not reach other files on the machine.
        # (Checked on the name, not the resolved path: hub caches link shards to blobs elsewhere.)
        rel = Path(f)
        if rel.is_absolute() or ".." in rel.parts:
            raise FormatError(
                f"{where} points outside the model folder ({f}); shard files must sit beside the index"
            )
        files[f] = None
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise FormatError(
            f"{index}: shard files listed in the index are missing: {', '.join(missing)}"
        )
    return [index.parent / f for f in files]
