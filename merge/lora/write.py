"""Write LoRA factors as a PEFT adapter folder, a diffusers LoRA file, or a kohya/A1111 file.

Every writer takes `OutModule`s: a module's place (component, dotted path) and factors with an
alpha, so that `ΔW = (alpha / rank) · B·A` (embedding: `((alpha / rank) · B·A)ᵀ`). The outputs
load untouched with `PeftModel.from_pretrained`, diffusers `load_lora_weights`, and kohya/A1111.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from merge.errors import UsageError
from merge.io.writer import StagedOutput, write_json, write_tensors

FORMATS = ("peft", "diffusers", "kohya")
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
KOHYA_PREFIX = {"unet": "lora_unet", "transformer": "lora_transformer", "": "lora"}


def check_output(fmt: str, dest: Path, *, given: bool = True) -> None:
    """Refuse an `-o` that format `fmt` cannot be, before any work: PEFT is a folder, kohya one
    `.safetensors` file, diffusers either (`x.safetensors`, or a folder holding
    `pytorch_lora_weights.safetensors`). `given`: the user chose `fmt` (else it is the default)."""
    if fmt not in FORMATS:
        raise AssertionError(fmt)  # check_output refused it
    chosen = "--to peft" if given else "the default format here, PEFT,"
    if fmt == "peft" and dest.suffix in FILE_SUFFIXES:
        raise UsageError(
            f"-o {dest} names a file, but a PEFT adapter ({chosen}) is a folder "
            "(adapter_config.json + adapter_model.safetensors): give -o a folder name, or "
            "--to kohya or --to diffusers for a single .safetensors file"
        )
    if fmt == "kohya" and dest.suffix != ".safetensors":
        raise UsageError(f"a kohya LoRA is one file: give -o a .safetensors name, not {dest}")
    if fmt == "diffusers" and dest.suffix in FILE_SUFFIXES and dest.suffix != ".safetensors":
        raise UsageError(
            f"a diffusers LoRA is a .safetensors file (or a folder): give -o x.safetensors or a folder name, not {dest}"
        )


@dataclass
class OutModule:
    component: str
    path: str  # dotted module path inside the component
    A: Tensor  # [r, in(,kh,kw)]; embedding [r, num_embeddings]
    B: Tensor  # [out, r(,1,1)];  embedding [dim, r]
    alpha: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    magnitude: Tensor | None = None  # DoRA, per output channel
    bias: Tensor | None = None  # lora_B.bias (already divided by the scale)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def _config(
    mods: Sequence[OutModule], modules_to_save: Sequence[str], base_name: str | None
) -> dict[str, object]:
    """A LoraConfig dict: most common rank/alpha, the others in rank_pattern/alpha_pattern."""
    ranks = collections.Counter(m.rank for m in mods)
    r = ranks.most_common(1)[0][0] if ranks else 8
    alphas = collections.Counter(m.alpha for m in mods if m.rank == r) or collections.Counter(
        m.alpha for m in mods
    )
    alpha = alphas.most_common(1)[0][0] if alphas else r
    rank_pattern = {m.path: m.rank for m in mods if m.rank != r}
    alpha_pattern = {m.path: m.alpha for m in mods if m.alpha != alpha}
    fifo = {m.fan_in_fan_out for m in mods}
    if len(fifo) > 1:
        raise UsageError(
            "cannot write modules with and without fan_in_fan_out into one PEFT adapter"
        )
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted({m.path for m in mods}),
        "modules_to_save": list(modules_to_save) or None,
        "use_rslora": False,
        "use_dora": any(m.magnitude is not None for m in mods),
        "lora_bias": any(m.bias is not None for m in mods),
        "fan_in_fan_out": bool(fifo and fifo.pop()),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _peft_tensors(mods: Sequence[OutModule], prefix: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for m in mods:
        p = f"{prefix}{m.path}"
        if m.embedding:
            out[f"{p}.lora_embedding_A"] = m.A.contiguous()
            out[f"{p}.lora_embedding_B"] = m.B.contiguous()
        else:
            out[f"{p}.lora_A.weight"] = m.A.contiguous()
            out[f"{p}.lora_B.weight"] = m.B.contiguous()
        if m.bias is not None:
            out[f"{p}.lora_B.bias"] = m.bias.contiguous()
        if m.magnitude is not None:
            out[f"{p}.lora_magnitude_vector"] = m.magnitude.reshape(-1).contiguous()
    return out


def write_peft(
    dest: Path,
    mods: Sequence[OutModule],
    *,
    full: Mapping[str, Tensor] | None = None,
    modules_to_save: Sequence[str] = (),
    base_name: str | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Path:
    """`adapter_config.json` + `adapter_model.safetensors`; a sub-folder per component (`unet/`,
    `text_encoder/`, ...) when the adapter spans a pipeline, each loadable on its own component."""
    comps = sorted({m.component for m in mods})
    if not comps or comps == [""]:
        files = _peft_files(mods, full or {}, modules_to_save, base_name, dtype)
        return _write_folder(dest, files, force)
    files = {}
    for c in comps:
        own = [replace(m, component="") for m in mods if m.component == c]
        extra = (full or {}, modules_to_save) if not c else ({}, ())
        for rel, value in _peft_files(own, *extra, base_name, dtype).items():
            files[f"{c or 'model'}/{rel}"] = value
    return _write_folder(dest, files, force)


def _peft_files(
    mods: Sequence[OutModule],
    full: Mapping[str, Tensor],
    modules_to_save: Sequence[str],
    base_name: str | None,
    dtype: torch.dtype,
) -> dict[str, dict[str, Tensor] | dict[str, object]]:
    """{file name: tensors (adapter_model.safetensors) or JSON (adapter_config.json)} of one adapter."""
    tensors = {k: v.to(dtype) for k, v in _peft_tensors(mods, "base_model.model.").items()}
    for k, v in full.items():
        tensors[f"base_model.model.{k}"] = v.to(dtype) if v.is_floating_point() else v
    return {
        "adapter_model.safetensors": tensors,
        "adapter_config.json": _config(mods, modules_to_save, base_name),
    }


def _write_folder(
    dest: Path, files: Mapping[str, dict[str, Tensor] | dict[str, object]], force: bool
) -> Path:
    """A folder of safetensors files (`*.safetensors`: tensors) and JSON files, written atomically."""
    with StagedOutput(dest, is_dir=True, force=force) as staged:
        for rel, value in files.items():
            target = staged.path(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".safetensors"):
                write_tensors(target, value, metadata={"format": "pt"}, force=True)  # type: ignore[arg-type]
            else:
                write_json(target, value)
        return staged.commit()


def write_diffusers(
    dest: Path,
    mods: Sequence[OutModule],
    *,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Path:
    """`pytorch_lora_weights.safetensors` with `unet.`/`text_encoder.` keys and lora_adapter_metadata."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, object] = {}
    for c in sorted({m.component for m in mods}):
        cm = [m for m in mods if m.component == c]
        prefix = f"{c or 'unet'}."
        tensors |= {k: v.to(dtype) for k, v in _peft_tensors(cm, prefix).items()}
        cfg = _config(cm, (), None)
        for k in (
            "r",
            "lora_alpha",
            "rank_pattern",
            "alpha_pattern",
            "target_modules",
            "use_dora",
            "lora_bias",
        ):
            meta[f"{c or 'unet'}.{k}"] = cfg[k]
    md = {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)}
    target = dest if dest.suffix == ".safetensors" else None
    if target is not None:
        return write_tensors(target, tensors, metadata=md, force=force)
    with StagedOutput(dest, is_dir=True, force=force) as staged:
        write_tensors(
            staged.path("pytorch_lora_weights.safetensors"), tensors, metadata=md, force=True
        )
        return staged.commit()


def kohya_name(component: str, path: str, two_text_encoders: bool) -> str:
    """`lora_unet_down_blocks_0_…`, `lora_te_text_model_…` (`lora_te1_`/`lora_te2_` for SDXL)."""
    if path.startswith("lora_") and "." not in path:
        return path  # already a kohya name (no base to resolve it: written back unchanged)
    if component.startswith("text_encoder"):
        if not path.startswith("text_model."):
            path = "text_model." + path  # kohya and A1111 spell CLIP modules with text_model.
        if component == "text_encoder":
            head = "lora_te1" if two_text_encoders else "lora_te"
        else:
            head = "lora_te" + component[len("text_encoder_") :]
    else:
        head = KOHYA_PREFIX.get(component, f"lora_{component}")
    return f"{head}_{path.replace('.', '_')}"


def write_kohya(
    dest: Path,
    mods: Sequence[OutModule],
    *,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    base_version: str | None = None,
) -> Path:
    """One safetensors file: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (+`.dora_scale`)."""
    two = any(m.component == "text_encoder_2" for m in mods)
    tensors: dict[str, Tensor] = {}
    for m in mods:
        if m.embedding:
            raise UsageError(
                f"kohya files have no embedding LoRA; `{m.path}` cannot be written (use --to peft)"
            )
        if m.bias is not None:
            raise UsageError(
                f"kohya files have no lora_B bias; `{m.path}` (lora_bias=True) cannot be written (use --to peft)"
            )
        if m.fan_in_fan_out:
            a, b = (
                m.B.T.contiguous(),
                m.A.T.contiguous(),
            )  # kohya has no fan_in_fan_out: store the transposed product
        else:
            a, b = m.A, m.B
        n = kohya_name(m.component, m.path, two)
        tensors[f"{n}.lora_down.weight"] = a.to(dtype).contiguous()
        tensors[f"{n}.lora_up.weight"] = b.to(dtype).contiguous()
        tensors[f"{n}.alpha"] = torch.tensor(float(m.alpha), dtype=dtype)
        if m.magnitude is not None:
            tensors[f"{n}.dora_scale"] = (
                m.magnitude.reshape(-1, *([1] * (m.B.dim() - 1))).to(dtype).contiguous()
            )
    ranks = collections.Counter(m.rank for m in mods)
    alphas = collections.Counter(m.alpha for m in mods)
    md = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]) if ranks else "0",
        "ss_network_alpha": str(alphas.most_common(1)[0][0]) if alphas else "0",
        "ss_network_args": json.dumps({"dynamic": len(ranks) > 1}),
    }
    if base_version:
        md["ss_base_model_version"] = base_version
    return write_tensors(dest, tensors, metadata=md, force=force)


def write_adapter(fmt: str, dest: Path, mods: Sequence[OutModule], **kw: object) -> Path:
    """Write `mods` as a `fmt` adapter at `dest` (checked by `check_output` first)."""
    check_output(fmt, dest)
    if fmt == "peft":
        return write_peft(dest, mods, **kw)  # type: ignore[arg-type]
    kw.pop("full", None)
    kw.pop("modules_to_save", None)
    kw.pop("base_name", None)
    if fmt == "diffusers":
        return write_diffusers(dest, mods, **kw)  # type: ignore[arg-type]
    if fmt == "kohya":
        return write_kohya(dest, mods, **kw)  # type: ignore[arg-type]
    raise AssertionError(fmt)  # check_output refused it
