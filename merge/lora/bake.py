"""Bake adapters into a base: W' = W + Σ k_i·ΔW_i, streamed tensor by tensor by the core engine.

Equals peft `merge_and_unload` (transformers models) and diffusers `fuse_lora(lora_scale=k)`
(pipelines). A DoRA adapter is baked with peft's formula at the base, the scale applied inside
the norm: W' = m · (W + kΔW) / ‖W + kΔW‖.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from merge.api import merge_expression
from merge.errors import MergeWarning, UsageError
from merge.io.detect import open_checkpoint
from merge.lora.source import LoraSource, open_lora


def bake(
    base: str | Path,
    adapters: Sequence[tuple[str | Path, float]],
    output: str | Path,
    *,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
    quiet: bool = True,
    unmatched: list[str] | None = None,
) -> Path:
    """Write base + Σ scale_i · adapter_i to `output` (same layout as the base, support files copied)."""
    if not adapters:
        raise UsageError("give at least one adapter to bake")
    src = open_checkpoint(base)
    inputs: dict[str, object] = {"base": src}
    terms = []
    for i, (path, scale) in enumerate(adapters):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MergeWarning)
            lora: LoraSource = open_lora(path, src, scale=scale)
        for w in caught:
            if unmatched is not None:
                unmatched.append(str(w.message))
            else:
                warnings.warn(str(w.message), MergeWarning, stacklevel=2)
        name = f"lora{i}"
        inputs[name] = lora
        terms.append(name)
    # scales are inside the sources (DoRA needs them there), so every term has coefficient 1
    expression = "base + " + " + ".join(terms)
    out = merge_expression(
        expression,
        inputs,
        output,
        dtype=dtype,
        shard_size=shard_size,
        copy_files_from="base",
        force=force,
        quiet=quiet,
    )
    assert isinstance(out, Path)
    return out
