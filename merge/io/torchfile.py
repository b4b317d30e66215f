"""PyTorch checkpoints (.bin/.pt/.pth/.ckpt), loaded with `weights_only=True` and mmap.

Pickles never run arbitrary code here: `torch.load(weights_only=True)` only unpickles tensors
and a small allow-list of harmless types. A pickle that needs any other global is refused with
the list of globals it names, unless the user passes `--unsafe-pickle` explicitly.
"""

from __future__ import annotations

import collections
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merge.errors import FormatError
from merge.io.sources import TensorMeta, TensorSource

# Types found in real training checkpoints that cannot run code when unpickled.
HARMLESS_GLOBALS: list[Any] = [
    collections.OrderedDict,
    collections.defaultdict,
    dict,
    list,
    tuple,
    set,
    int,
    float,
    str,
    bool,
    complex,
    slice,
    range,
    torch.Size,
]
try:  # numpy scalars and arrays appear in Lightning and optimizer states
    import numpy as np

    _core = getattr(np, "_core", None)
    HARMLESS_GLOBALS += [np.dtype, np.ndarray]
    if _core is not None:
        HARMLESS_GLOBALS.append(_core.multiarray._reconstruct)
    HARMLESS_GLOBALS += [
        type(np.dtype(np.float32)),
        type(np.dtype(np.int64)),
        np.float64,
        np.float32,
        np.int64,
    ]
except Exception:  # pragma: no cover
    pass

# Keys under which trainers nest the weights.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema_state_dict", "params")


def _load(path: Path, unsafe_pickle: bool) -> object:
    mmap = zipfile.is_zipfile(path)  # legacy (non-zip) pickles cannot be memory-mapped
    if unsafe_pickle:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(HARMLESS_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        found = _unsafe_globals(path)
        if found is None and "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise FormatError(
                f"{path}: cannot read this PyTorch file ({type(e).__name__}: {str(e)[:300]})"
            ) from e
        names = ", ".join(found) if found else "(see the message below)"
        raise FormatError(
            f"{path}: refusing to unpickle objects beyond tensors; globals found: {names}. "
            "Loading them could run code. If you trust this file, pass --unsafe-pickle; better, "
            "convert it once to safetensors."
            + ("" if found else f"\n  torch said: {str(e).splitlines()[0][:300]}")
        ) from None


def _unsafe_globals(path: Path) -> list[str] | None:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return None
    allowed = {
        f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}" for g in HARMLESS_GLOBALS
    }
    return [g for g in found if g not in allowed]


def _find_tensors(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors
        for key in NESTED_KEYS:
            if key in obj and isinstance(obj[key], dict):
                inner = _find_tensors(obj[key], path)
                if inner:
                    return inner
        if tensors:
            return tensors
    raise FormatError(
        f"{path}: no tensor dict found (top-level keys: {list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__}); "
        f"expected a state dict, possibly nested under one of {', '.join(NESTED_KEYS)}"
    )


class TorchFileSource(TensorSource):
    """One or more PyTorch files (a sharded `pytorch_model.bin.index.json` set) as one tensor dict.

    Zip-format files are memory-mapped, so tensors are read on demand; each shard is opened when
    a tensor of it is first asked for and dropped when another shard is needed.
    """

    def __init__(
        self,
        files: list[Path],
        display: str | None = None,
        root: Path | None = None,
        weight_map: dict[str, str] | None = None,
        unsafe_pickle: bool = False,
    ):
        self._files = [Path(f) for f in files]
        self.path = display or str(self._files[0])
        self._root = root
        self._unsafe = unsafe_pickle
        self._lock = threading.Lock()
        self._meta: dict[str, TensorMeta] = {}
        self._file_of: dict[str, int] = {}
        self._open: tuple[int, dict[str, Tensor]] | None = None
        for i, f in enumerate(self._files):
            tensors = self._shard(i)
            for k, v in tensors.items():
                if k in self._meta:
                    raise FormatError(
                        f"{self.path}: tensor `{k}` appears in two shards; remove the duplicate"
                    )
                self._meta[k] = TensorMeta(tuple(v.shape), v.dtype, str(f), i)
                self._file_of[k] = i

    def _shard(self, i: int) -> dict[str, Tensor]:
        with self._lock:
            if self._open is None or self._open[0] != i:
                self._open = None
                self._open = (i, _find_tensors(_load(self._files[i], self._unsafe), self._files[i]))
            return self._open[1]

    def keys(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._meta[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named `{name}`") from None

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        t = self._shard(self._file_of[name])[name]
        flat = t.reshape(-1)[start:stop]
        if out is not None:
            return out.copy_(flat)
        return flat.clone()

    def files(self) -> list[Path]:
        return list(self._files)

    def root(self) -> Path | None:
        return self._root

    def close(self) -> None:
        self._open = None
