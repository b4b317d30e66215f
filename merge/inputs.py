"""A recipe's inputs opened as TensorSources, the one place where every input kind meets.

Checkpoints (files, sharded folders, pipelines: `merge.io.detect`) open first; adapters
(`merge.lora`) then open against the base as delta sources keyed by its tensor names. Under
`compat: mergekit` with a compute dtype, checkpoints are read through a casting view, as
mergekit casts its inputs before merging.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from merge.dtypes import DTYPE_NAMES
from merge.errors import UsageError
from merge.io.detect import open_checkpoint
from merge.io.sources import TensorSource
from merge.io.views import CastView
from merge.lora.source import looks_like_lora, open_lora
from merge.recipe import Program


def open_inputs(
    program: Program,
    *,
    unsafe_pickle: bool = False,
    preopened: Mapping[str, TensorSource] | None = None,
) -> dict[str, TensorSource]:
    """Open every input the output uses: checkpoints first, then adapters against the base
    (`base`, else the first checkpoint), as delta sources keyed by the base's tensor names."""
    sources: dict[str, TensorSource] = dict(preopened or {})
    used = program.used_inputs()
    layout = program.recipe.output.copy_files_from
    if layout and layout not in used:
        used.append(layout)
    missing: list[str] = []
    deferred: list[str] = []
    for name in used:
        if name in sources:
            continue
        path = program.input_path(name)
        if looks_like_lora(path):
            deferred.append(name)
            continue
        if not Path(path).exists() and "/" not in path:
            missing.append(f"inputs.{name}: {path} does not exist")
            continue
        sources[name] = open_checkpoint(path, unsafe_pickle=unsafe_pickle)
    if missing:
        raise UsageError("missing inputs:\n  " + "\n  ".join(missing))
    base = sources.get("base") or next(
        (s for s in sources.values() if s.kind == "checkpoint"), None
    )
    for name in deferred:
        sources[name] = open_lora(program.input_path(name), base)
    options = program.recipe.options
    if options.compat == "mergekit" and options.compute_dtype:  # mergekit casts inputs first
        for name in sources:
            if sources[name].kind == "checkpoint" and name not in (preopened or {}):
                sources[name] = CastView(sources[name], DTYPE_NAMES[options.compute_dtype])
    return sources
