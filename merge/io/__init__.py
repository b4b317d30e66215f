"""Reading and writing tensor dicts; knows files, not math.

Map of the package: docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from merge.io.detect import open_checkpoint
from merge.io.sources import MemorySource, TensorMeta, TensorSource
from merge.io.writer import DEFAULT_SHARD_SIZE, write_tensors


def load_state_dict(spec: object, *, unsafe_pickle: bool = False) -> dict[str, Tensor]:
    """Every tensor of a checkpoint, in memory (for small models: alignment, evaluation, tests)."""
    src = open_checkpoint(spec, unsafe_pickle=unsafe_pickle)
    try:
        return {k: src.read(k) for k in src.keys()}
    finally:
        src.close()


def save_state_dict(
    tensors: Mapping[str, Tensor],
    dest: str | Path,
    *,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> Path:
    """Write a tensor dict atomically: `x.safetensors` -> one file, any other path -> a sharded folder."""
    return write_tensors(Path(dest), tensors, metadata=metadata, force=force, shard_size=shard_size)


__all__ = [
    "MemorySource",
    "TensorMeta",
    "TensorSource",
    "load_state_dict",
    "open_checkpoint",
    "save_state_dict",
]
