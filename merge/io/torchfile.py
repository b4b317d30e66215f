"""PyTorch checkpoints (.bin/.pt/.pth/.ckpt), loaded with `weights_only=True` and mmap.

Pickles never run arbitrary code here: `torch.load(weights_only=True)` only unpickles tensors
and a small allow-list of harmless types. A pickle that needs any other global is refused with
the list of globals it names, unless the user passes `--unsafe-pickle` explicitly.
"""

from __future__ import annotations

import collections
import pickletools
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merge.errors import FormatError
from merge.io.sources import FileSource, TensorMeta, check_finite

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


_ANNOUNCED: set[str] = set()


def _load(path: Path, unsafe_pickle: bool) -> object:
    mmap = zipfile.is_zipfile(path)  # legacy (non-zip) pickles cannot be memory-mapped
    if unsafe_pickle:
        if str(path) not in _ANNOUNCED:  # once per file, though shards are reopened
            _ANNOUNCED.add(str(path))
            found = _unsafe_globals(path)
            names = ", ".join(found) if found else "none beyond tensors"
            print(
                f"--unsafe-pickle: loading {path} with full pickle; it may run code. "
                f"Globals it names beyond tensors (all allowed): {names}",
                file=sys.stderr,
            )
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as e:
            raise FormatError(
                f"{path}: cannot load this PyTorch file, even with --unsafe-pickle "
                f"({type(e).__name__}: {str(e)[:300]}); a module it needs may be missing"
            ) from None
    try:
        with torch.serialization.safe_globals(HARMLESS_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        found = _unsafe_globals(path)
        if not found and "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise FormatError(
                f"{path}: cannot read this PyTorch file ({type(e).__name__}: {str(e)[:300]})"
            ) from None
        names = ", ".join(found) if found else "(see the message below)"
        raise FormatError(
            f"{path}: refusing to unpickle objects beyond tensors; globals found: {names}. "
            "Loading them could run code. If you trust this file, pass --unsafe-pickle; better, "
            "convert it once to safetensors."
            + ("" if found else f"\n  torch said: {str(e).splitlines()[0][:300]}")
        ) from None


def _allowed_names() -> set[str]:
    names = {
        f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}" for g in HARMLESS_GLOBALS
    }
    try:  # what torch's weights-only unpickler accepts by itself (tensor rebuilds, storages)
        from torch._weights_only_unpickler import _get_allowed_globals

        names |= set(_get_allowed_globals())
    except Exception:  # pragma: no cover - a private helper; the zip path does not need it
        pass
    return names


def _unsafe_globals(path: Path) -> list[str] | None:
    """Globals the pickle names beyond the allowed ones (None when the file cannot be scanned)."""
    try:
        if zipfile.is_zipfile(path):
            found = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        else:
            found = _legacy_pickle_globals(path)
    except Exception:
        return None
    allowed = _allowed_names()
    return [g for g in dict.fromkeys(found) if g not in allowed]


def _legacy_pickle_globals(path: Path) -> list[str]:
    """`module.name` of every GLOBAL / STACK_GLOBAL in a legacy torch file's pickles.

    The legacy format is a run of pickles (magic number, protocol, system info, the object,
    the storage keys) followed by raw storage bytes; only opcodes are read, nothing is run.
    """
    found: list[str] = []
    with open(path, "rb") as f:
        for _ in range(5):
            strings: list[object] = []  # recent string pushes, for STACK_GLOBAL
            memo: dict[object, object] = {}
            try:
                for op, arg, _pos in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif "UNICODE" in op.name or op.name.endswith("STRING"):
                        strings.append(arg)
                    elif op.name in ("MEMOIZE",):
                        memo[len(memo)] = strings[-1] if strings else None
                    elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[arg] = strings[-1] if strings else None
                    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                        strings.append(memo.get(arg))
                    if op.name == "STOP":
                        break
            except Exception:  # the raw storage bytes after the last pickle
                break
    return found


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


class TorchFileSource(FileSource):
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
        super().__init__(files, display, root)
        self._unsafe = unsafe_pickle
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

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        t = self._shard(self._file_of[name])[name]
        flat = t.reshape(-1)[start:stop]
        result = out.copy_(flat) if out is not None else flat.clone()
        if out is None and result.is_floating_point() and name not in self._warned:
            check_finite(result, name, str(self._files[self._file_of[name]]), self._warned)
        return result

    def close(self) -> None:
        self._open = None
