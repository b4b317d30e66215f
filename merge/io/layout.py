"""An output's layout on disk, as a value: the plan computes it, the writer follows it.

`OutputLayout` says what an output is: one safetensors file (`x.safetensors`), a Hugging Face
folder (`model.safetensors`, or `model-0000k-of-0000n.safetensors` with its index), or a
diffusers pipeline folder (each component's tensors in its own folder, under the file name it
had in the input: `unet/diffusion_pytorch_model.safetensors`, sharded with the matching index);
how large the shards are; and which support files (configs, tokenizers, schedulers) are copied
beside the weights. Sources say what they are (`TensorSource.component_stems`, `support_files`);
choosing the layout from them is the plan's (`merge.plan.output_layout`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merge.dtypes import dtype_name
from merge.errors import FormatError
from merge.io.writer import DEFAULT_SHARD_SIZE, FilePlan, OutputTensor, plan_files

PIPELINE_STEM = "diffusion_pytorch_model"  # a component the input did not have gets diffusers' name


@dataclass(frozen=True)
class OutputLayout:
    """How an output is laid out: one file, a model folder, or a pipeline folder.

    Args:
        single_file: one safetensors file, no index and no support files.
        shard_size: the largest shard in bytes (a folder's files split at this size).
        components: for a pipeline folder, each component's weight-file stem (`unet` ->
            `diffusion_pytorch_model`); None for one model.
        support_files: (relpath, file) copied beside the weights of a folder.
        source: where the layout was taken from, for messages.
    """

    single_file: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    components: Mapping[str, str] | None = None
    support_files: tuple[tuple[str, Path], ...] = ()
    source: str = ""

    def file_plans(
        self, tensors: Sequence[OutputTensor], *, metadata: Mapping[str, str]
    ) -> tuple[list[FilePlan], dict[str, object]]:
        """The files to write, tensors in write order: (file plans, {relpath: index JSON})."""
        if self.single_file:
            plans, _ = plan_files(tensors, single_file="", metadata=metadata)
            return plans, {}
        if self.components is not None:
            return _pipeline_files(tensors, self.components, self.shard_size, metadata)
        plans, index = plan_files(tensors, shard_size=self.shard_size, metadata=metadata)
        return plans, ({"model.safetensors.index.json": index} if index else {})


class ComponentFilePlan(FilePlan):
    """A component's file: tensors named `comp/x` for the writer, `x` in the file's header."""

    component: str = ""

    @classmethod
    def wrap(cls, plan: FilePlan, component: str) -> ComponentFilePlan:
        named = [OutputTensor(f"{component}/{t.name}", t.shape, t.dtype) for t in plan.tensors]
        new = cls(plan.relpath, named, plan.metadata)
        new.component = component
        return new

    def header(self) -> bytes:
        n = len(self.component) + 1
        plain = [OutputTensor(t.name[n:], t.shape, t.dtype) for t in self.tensors]
        return FilePlan(self.relpath, plain, self.metadata).header()


def _pipeline_files(
    tensors: Sequence[OutputTensor],
    stems: Mapping[str, str],
    shard_size: int,
    metadata: Mapping[str, str],
) -> tuple[list[FilePlan], dict[str, object]]:
    """One file per component, named as the input named it, sharded with an index as needed.

    The writer fills files in the order of `tensors`, so a component whose tensors come in
    several runs (the engine orders reads by input file) gets one shard per run; diffusers
    loads such a component through its index like any sharded one.
    """
    chunks: list[tuple[str, list[OutputTensor]]] = []  # (component, tensors with plain names)
    size = 0
    for t in tensors:
        comp, _, rest = t.name.partition("/")
        if not rest:
            raise FormatError(
                f"output tensor `{t.name}` has no component prefix; a pipeline output needs `unet/...`-style names"
            )
        plain = OutputTensor(rest, t.shape, t.dtype)
        if (
            chunks
            and chunks[-1][0] == comp
            and (size + t.nbytes <= shard_size or not chunks[-1][1])
        ):
            chunks[-1][1].append(plain)
            size += t.nbytes
        else:
            chunks.append((comp, [plain]))
            size = t.nbytes
    count: dict[str, int] = {}
    for comp, _ in chunks:
        count[comp] = count.get(comp, 0) + 1
    seen: dict[str, int] = {}
    plans: list[FilePlan] = []
    weight_maps: dict[str, dict[str, str]] = {}
    for comp, ts in chunks:
        stem = stems.get(comp, PIPELINE_STEM)
        seen[comp] = seen.get(comp, 0) + 1
        n = count[comp]
        fname = (
            f"{stem}.safetensors" if n == 1 else f"{stem}-{seen[comp]:05d}-of-{n:05d}.safetensors"
        )
        meta = dict(metadata)
        meta.setdefault("format", "pt")
        plans.append(ComponentFilePlan.wrap(FilePlan(f"{comp}/{fname}", ts, meta), comp))
        if n > 1:
            weight_maps.setdefault(comp, {}).update({t.name: fname for t in ts})
    indexes: dict[str, object] = {}
    for comp, wm in weight_maps.items():
        stem = stems.get(comp, PIPELINE_STEM)
        total = sum(p.data_bytes for p in plans if p.relpath.startswith(comp + "/"))
        indexes[f"{comp}/{stem}.safetensors.index.json"] = {
            "metadata": {"total_size": total},
            "weight_map": wm,
        }
    return plans, indexes


def copy_support_files(
    files: Sequence[tuple[str, Path]], dest: Path, dtype: torch.dtype | None
) -> list[str]:
    """Copy (relpath, file) pairs into `dest`; a model's config.json gets the output `dtype`.

    Returns the relpaths copied.
    """
    for rel, src in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        config = _model_config(src) if target.name == "config.json" and dtype is not None else None
        if config is None or dtype is None:
            shutil.copyfile(src, target)  # new files: the umask, not the input's mode
            continue
        config["dtype" if "dtype" in config else "torch_dtype"] = dtype_name(dtype)
        target.write_text(json.dumps(config, indent=2) + "\n")
    return [rel for rel, _ in files]


def _model_config(path: Path) -> dict[str, object] | None:
    """A transformers model config read from `path`, or None for any other file (module and
    diffusers configs carry no dtype)."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(config, dict) or not {"model_type", "architectures"} & set(config):
        return None
    if "_diffusers_version" in config:
        return None
    return config
