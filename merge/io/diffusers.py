"""Diffusers pipeline folders (model_index.json + one folder per component) as one source.

Keys are namespaced by component: `unet/down_blocks.0.resnets.0.conv1.weight`,
`text_encoder/text_model.encoder.layers.0.self_attn.q_proj.weight`, `vae/...`. An output shaped
like a pipeline is written back as a loadable pipeline folder (`merge.io.layout`): the source
says which components it has and the stem of each one's weight files (`component_stems`), and which
config, tokenizer and scheduler files an output copies (`support_files`). Single-file SD
checkpoints need nothing here: they are plain safetensors files and are written back as one
file with the same keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from merge.errors import FormatError
from merge.io.safetensors import SafetensorsSource, files_from_index
from merge.io.sources import TensorMeta, TensorSource
from merge.io.torchfile import TorchFileSource

WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model", "pytorch_model")


def _component_files(folder: Path) -> tuple[list[Path], str]:
    """The weight files of one component folder and their name stem (for writing back)."""
    for stem in WEIGHT_PREFIXES:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
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
        for name, folder in self._folders():
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

    def _folders(self) -> list[tuple[str, Path]]:
        """(name, folder) of each component model_index.json lists that has a folder."""
        out = []
        for name, spec in self.model_index.items():
            if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
                continue
            folder = self._root / name
            if folder.is_dir():
                out.append((name, folder))
        return out

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
        for name, folder in self._folders():
            for f in sorted(folder.rglob("*")):
                if not f.is_file() or f.resolve() in weight_files or f.name.startswith("."):
                    continue
                if name in self.components and (
                    f.name.endswith(".index.json") or f.suffix in (".safetensors", ".bin")
                ):
                    continue
                out.append((str(f.relative_to(self._root)), f))
        return out

    def component_stems(self) -> dict[str, str]:
        return dict(self.stems)

    def close(self) -> None:
        for s in self.components.values():
            s.close()


def open_pipeline(path: str | Path) -> PipelineSource:
    return PipelineSource(Path(path))
