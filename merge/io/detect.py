"""open_checkpoint(anything) -> TensorSource, with a clear error for unknown or refused layouts."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from merge.dtypes import dtype_name
from merge.errors import FormatError, UsageError
from merge.io.diffusers import open_pipeline
from merge.io.safetensors import SafetensorsSource, files_from_index
from merge.io.sources import MemorySource, TensorSource
from merge.io.torchfile import TorchFileSource

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# Key suffixes that only quantized checkpoints have, and the format they name.
QUANTIZED_KEYS = [
    (re.compile(r"\.(qweight|qzeros|g_idx)$"), "GPTQ/AWQ"),
    (re.compile(r"\.(SCB|weight_format)$"), "bitsandbytes int8"),
    (re.compile(r"\.(absmax|quant_map|nested_absmax|quant_state\.\w+)$"), "bitsandbytes 4-bit"),
    (re.compile(r"\.(weight_scale|weight_scale_inv|input_scale)$"), "fp8 (with scale tensors)"),
]
QUANTIZED_ANY = re.compile("|".join(f"(?:{p.pattern})" for p, _ in QUANTIZED_KEYS))


def open_checkpoint(spec: object, *, unsafe_pickle: bool = False) -> TensorSource:
    """A lazy TensorSource for a path, a Hugging Face hub id, a tensor dict or an nn.Module."""
    if isinstance(spec, TensorSource):
        return spec
    if isinstance(spec, nn.Module):
        return MemorySource(spec.state_dict(), name=type(spec).__name__)
    if isinstance(spec, Mapping):
        if not all(isinstance(v, Tensor) for v in spec.values()):
            raise UsageError("a dict input must map names to torch tensors")
        return MemorySource(spec)
    if not isinstance(spec, str | os.PathLike):
        raise UsageError(
            f"cannot open {type(spec).__name__} as a checkpoint; give a path, a hub id, a dict or an nn.Module"
        )
    path = Path(spec)
    try:
        exists = path.exists()
    except (OSError, ValueError) as e:  # a name too long, or with a NUL
        raise UsageError(f"input {spec!r} is not a usable path ({e})") from None
    if not exists:
        if HUB_ID.match(str(spec)) and not str(spec).startswith("."):
            path = resolve_hub_id(str(spec))
        else:
            raise UsageError(f"input {spec} does not exist; check the path")
    source = _open_path(path, unsafe_pickle)
    check_not_quantized(source, path)
    return source


def _open_path(path: Path, unsafe_pickle: bool) -> TensorSource:
    if path.is_file():
        return _open_file(path, unsafe_pickle)
    if not path.is_dir():
        raise FormatError(
            f"{path}: not a regular file (a FIFO, device or socket) nor a folder; "
            "merge reads checkpoint files and folders of them"
        )
    if (path / "model_index.json").is_file():
        return open_pipeline(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = files_from_index(index)
        return SafetensorsSource(files, display=str(path), root=path)
    # Only regular files: opening a FIFO would block, and a device never ends.
    st = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if st:
        return SafetensorsSource(st, display=str(path), root=path)
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        return TorchFileSource(
            files_from_index(index), display=str(path), root=path, unsafe_pickle=unsafe_pickle
        )
    pt = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
    if pt:
        return TorchFileSource(pt, display=str(path), root=path, unsafe_pickle=unsafe_pickle)
    gguf = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if gguf:
        raise FormatError(
            f"{path}: holds GGUF files ({gguf[0].name}), a quantized format merge cannot merge; use the original safetensors weights"
        )
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise FormatError(
        f"{path}: no checkpoint found (looked for *.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin(.index.json), *.pt/*.pth/*.ckpt; found: {found})"
    )


def _open_file(path: Path, unsafe_pickle: bool) -> TensorSource:
    suffix = path.suffix.lower()
    if suffix == ".gguf" or _magic(path) == b"GGUF":
        raise FormatError(
            f"{path}: GGUF is a quantized llama.cpp format that merge cannot merge; use the original safetensors weights"
        )
    if suffix == ".safetensors":
        return SafetensorsSource([path], root=path.parent)
    if suffix in TORCH_SUFFIXES:
        return TorchFileSource([path], root=path.parent, unsafe_pickle=unsafe_pickle)
    if suffix == ".json" and path.name.endswith(".index.json"):
        return _open_path(path.parent, unsafe_pickle)
    raise FormatError(
        f"{path}: unknown checkpoint format `{suffix or path.name}`; merge reads .safetensors, "
        ".bin/.pt/.pth/.ckpt and folders of them"
    )


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def check_not_quantized(source: TensorSource, path: Path) -> None:
    """Refuse quantized checkpoints by config, dtype or key names, naming the format found."""
    root = source.root()
    config = (root / "config.json") if root is not None else None
    if config is not None and config.is_file():
        try:
            q = json.loads(config.read_text()).get("quantization_config")
        except (json.JSONDecodeError, AttributeError):
            q = None
        if q:
            method = q.get("quant_method", "unknown") if isinstance(q, dict) else "unknown"
            raise FormatError(
                f"{path}: is a quantized checkpoint ({method}, from config.json `quantization_config`); merge needs the unquantized weights"
            )
    float8 = {torch.float8_e4m3fn, torch.float8_e5m2}
    for k in source.keys():
        m = source.meta(k)
        if m.dtype in float8:
            raise FormatError(
                f"{path}: tensor `{k}` is {dtype_name(m.dtype)}: an fp8-quantized checkpoint; merge needs bf16/fp16/fp32 weights"
            )
    # One pass of one combined pattern: headers can list hundreds of thousands of names.
    for k in source.keys():
        hit = QUANTIZED_ANY.search(k)
        if hit is not None:
            fmt = next(fmt for pattern, fmt in QUANTIZED_KEYS if pattern.search(k))
            raise FormatError(
                f"{path}: tensor `{k}` marks a {fmt} quantized checkpoint; merge needs the unquantized weights"
            )


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot folder of a hub model: the HF cache first, a download only if allowed."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise UsageError(
            f"`{repo_id}` is not a local path and huggingface_hub is not installed"
        ) from e
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        raise UsageError(
            f"`{repo_id}` is neither a local path nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        )
    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]
            )
        )
    except Exception as e:
        raise UsageError(
            f"`{repo_id}` is neither a local path nor in the Hugging Face cache, and downloading it failed "
            f"({type(e).__name__}); check the name, or download it first with `hf download {repo_id}` (the command of huggingface_hub)"
        ) from e
