"""Diffusers pipeline folders (model_index.json + one folder per component) as one source.

Keys are namespaced by component: `unet/down_blocks.0.resnets.0.conv1.weight`,
`text_encoder/text_model.encoder.layers.0.self_attn.q_proj.weight`, `vae/...`. An output shaped
like a pipeline is written back as a loadable pipeline folder: each component's tensors go to
its own folder under the file name it had (`diffusion_pytorch_model.safetensors`,
`model.safetensors`, sharded with the matching index), and every config, tokenizer and scheduler
file is copied. Single-file SD checkpoints need nothing here: they are plain safetensors files
and are written back as one file with the same keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from merge.errors import FormatError
from merge.io.safetensors import SafetensorsSource
from merge.io.sources import TensorMeta, TensorSource
from merge.io.torchfile import TorchFileSource
from merge.io.writer import FilePlan, OutputTensor

WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model", "pytorch_model")


def _component_files(folder: Path) -> tuple[list[Path], str]:
    """The weight files of one component folder and their name stem (for writing back)."""
    for stem in WEIGHT_PREFIXES:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            from merge.io.detect import files_from_index

            return files_from_index(index), stem
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single], stem
    st = sorted(p for p in folder.glob("*.safetensors") if p.is_file())  # no FIFOs
    if st:
        # a variant such as diffusion_pytorch_model.fp16.safetensors: keep its stem
        return [st[0]], st[0].name[: -len(".safetensors")]
    for stem in WEIGHT_PREFIXES:
        b = folder / f"{stem}.bin"
        if b.is_file():
            return [b], stem
    return [], ""


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


class PipelineSource(TensorSource):
    """A diffusers pipeline folder seen as one lazy tensor dict `component/name`."""

    def __init__(self, path: Path):
        self._root = Path(path)
        self.path = str(path)
        try:
            self.model_index = json.loads((self._root / "model_index.json").read_bytes())
        except (ValueError, RecursionError) as e:  # JSON or UTF-8 errors, absurd nesting
            raise FormatError(
                f"{path}/model_index.json is not valid JSON ({str(e)[:200]})"
            ) from None
        except OSError as e:
            raise FormatError(f"{path}/model_index.json: cannot read ({e.strerror})") from None
        if not isinstance(self.model_index, dict):
            raise FormatError(f"{path}/model_index.json must be a JSON object of components")
        self.components: dict[str, TensorSource] = {}
        self.stems: dict[str, str] = {}
        for name, spec in self.model_index.items():
            if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
                continue
            folder = self._root / name
            if not folder.is_dir():
                continue
            files, stem = _component_files(folder)
            if not files:
                continue  # tokenizer, scheduler, feature extractor: support files only
            src: TensorSource
            if files[0].suffix == ".safetensors":
                src = SafetensorsSource(files, display=str(folder), root=folder)
            else:
                src = TorchFileSource(files, display=str(folder), root=folder)
            self.components[name] = src
            self.stems[name] = stem
        if not self.components:
            raise FormatError(
                f"{path}: model_index.json names no component folder with weights (*.safetensors or *.bin)"
            )
        self._where: dict[str, tuple[str, str]] = {}
        for comp, src in self.components.items():
            for k in src.keys():
                self._where[f"{comp}/{k}"] = (comp, k)

    def keys(self) -> list[str]:
        return list(self._where)

    def _split(self, name: str) -> tuple[TensorSource, str]:
        try:
            comp, k = self._where[name]
        except KeyError:
            raise FormatError(
                f"{self.path}: no tensor named `{name}` (pipeline keys look like `unet/conv_in.weight`)"
            ) from None
        return self.components[comp], k

    def meta(self, name: str) -> TensorMeta:
        src, k = self._split(name)
        return src.meta(k)

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        src, k = self._split(name)
        return src.read_range(k, start, stop, out)

    def files(self) -> list[Path]:
        return [f for s in self.components.values() for f in s.files()]

    def root(self) -> Path | None:
        return self._root

    def support_files(self) -> list[tuple[str, Path]]:
        """model_index.json and every non-weight file of every component folder (configs, tokenizers)."""
        weight_files = {f.resolve() for f in self.files()}
        out: list[tuple[str, Path]] = [("model_index.json", self._root / "model_index.json")]
        for name, spec in self.model_index.items():
            if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
                continue
            folder = self._root / name
            if not folder.is_dir():
                continue
            for f in sorted(folder.rglob("*")):
                if not f.is_file() or f.resolve() in weight_files or f.name.startswith("."):
                    continue
                if name in self.components and (
                    f.name.endswith(".index.json") or f.suffix in (".safetensors", ".bin")
                ):
                    continue
                out.append((str(f.relative_to(self._root)), f))
        return out

    def plan_output(
        self, tensors: list[OutputTensor], *, shard_size: int, metadata: dict[str, str]
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
            stem = self.stems.get(comp, "diffusion_pytorch_model")
            seen[comp] = seen.get(comp, 0) + 1
            n = count[comp]
            fname = (
                f"{stem}.safetensors"
                if n == 1
                else f"{stem}-{seen[comp]:05d}-of-{n:05d}.safetensors"
            )
            meta = dict(metadata)
            meta.setdefault("format", "pt")
            plans.append(ComponentFilePlan.wrap(FilePlan(f"{comp}/{fname}", ts, meta), comp))
            if n > 1:
                weight_maps.setdefault(comp, {}).update({t.name: fname for t in ts})
        indexes: dict[str, object] = {}
        for comp, wm in weight_maps.items():
            stem = self.stems.get(comp, "diffusion_pytorch_model")
            total = sum(p.data_bytes for p in plans if p.relpath.startswith(comp + "/"))
            indexes[f"{comp}/{stem}.safetensors.index.json"] = {
                "metadata": {"total_size": total},
                "weight_map": wm,
            }
        return plans, indexes

    def close(self) -> None:
        for s in self.components.values():
            s.close()


def open_pipeline(path: str | Path) -> PipelineSource:
    return PipelineSource(Path(path))
