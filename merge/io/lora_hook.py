"""Where the engine asks whether an input is a LoRA adapter (a delta) rather than a checkpoint."""

from __future__ import annotations

from pathlib import Path

from merge.io.sources import TensorSource


def looks_like_lora(path: str | Path) -> bool:
    try:
        from merge.io import lora
    except ImportError:  # the LoRA readers are optional until merge/io/lora.py lands
        return False
    return bool(lora.looks_like_lora(Path(path)))


def open_lora(path: str | Path, base: TensorSource | None, *, scale: float = 1.0) -> TensorSource:
    from merge.io import lora

    return lora.open_lora(Path(path), base, scale=scale)  # type: ignore[no-any-return]
