"""Convert an adapter between PEFT, diffusers and kohya formats without changing its delta.

LoRA factors are copied as they are, each module keeping its alpha (kohya `.alpha`, PEFT/diffusers
`alpha_pattern`), so the delta is bit-identical in float32. Kohya's underscored names become dotted
ones through `--base` or the built-in SD1.x/SDXL tables. LyCORIS kinds (LoHa, LoKr, Tucker LoCon,
full diffs) have no LoRA factors: they are written only by re-factorising (`merge lora combine
--energy 1`), which is refused here because it would not be a format change.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merge.errors import PlanError, UsageError
from merge.io.detect import open_checkpoint
from merge.io.sources import TensorSource
from merge.lora.canon import place
from merge.lora.read import Adapter, read_adapter
from merge.lora.write import OutModule, check_output, write_adapter


def convert(
    adapter: str | Path | Adapter,
    to: str,
    output: str | Path,
    *,
    base: str | Path | TensorSource | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """Write `adapter` in format `to` (peft | kohya | diffusers) at `output`."""
    check_output(to, Path(output))
    a = adapter if isinstance(adapter, Adapter) else read_adapter(adapter)
    base_src = (
        open_checkpoint(base) if base is not None and not isinstance(base, TensorSource) else base
    )
    placed = place(a, base_src)
    if placed.unresolved_kohya and to != "kohya":
        bad = [m.path for m in placed.modules.values() if not m.dotted][:3]
        raise UsageError(
            f"{a.path}: kohya names such as {', '.join(bad)} are not in the built-in SD1.x/SDXL tables; "
            "pass --base (the model the LoRA was trained on) to turn them into module names"
        )
    if a.full and to != "peft":
        raise UsageError(
            f"{a.path} has modules_to_save tensors ({', '.join(list(a.full)[:3])}) that only a PEFT adapter can hold; use --to peft"
        )
    mods: list[OutModule] = []
    not_lora = []
    for (comp, path), m in placed.modules.items():
        if m.kind not in ("lora", "embedding"):
            not_lora.append(f"{m.name} ({m.kind})")
            continue
        A, B = a.tensor(m.keys["A"]), a.tensor(m.keys["B"])
        shape = placed.shapes.get((comp, path))
        if shape is not None and m.kind == "lora" and len(shape) == 2 and A.dim() == 4:
            A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)  # 1x1 conv LoRA on a Linear
        rank = int(A.shape[0])
        alpha = m.alpha if m.alpha is not None else float(rank)
        # keep ΔW: alpha / rank must equal the module's scale (rsLoRA: fold the difference into A)
        fold = m.scale / (alpha / rank)
        if abs(fold - 1) > 1e-7:
            A = A * fold
        mag = a.tensor(m.dora_key) if m.dora_key else None
        if (
            mag is not None
            and not m.extra.get("dora_peft")
            and mag.dim() >= 2
            and mag.shape[0] == 1
            and mag.shape[1] != 1
        ):
            raise PlanError(
                f"`{m.name}`: its dora_scale is per input column (legacy LyCORIS); PEFT and diffusers DoRA are per output channel"
            )
        bias = a.tensor(m.bias_key) if m.bias_key else None
        out = OutModule(
            comp,
            path,
            A,
            B,
            alpha,
            embedding=m.kind == "embedding",
            fan_in_fan_out=m.fan_in_fan_out,
            magnitude=mag,
            bias=bias,
        )
        mods.append(out)
    if not_lora:
        raise UsageError(
            f"{a.path}: {len(not_lora)} modules are not LoRA factor pairs and have no {to} LoRA form: "
            f"{', '.join(not_lora[:4])}; re-factorise them with `merge lora combine {a.path} --energy 0.999 -o OUT` "
            "(an SVD; reports the energy it keeps)"
        )
    kw: dict[str, object] = {"force": force}
    if dtype is not None:
        kw["dtype"] = dtype
    if to == "peft":
        kw["full"] = {k: a.tensor(v) for k, v in a.full.items()}
        kw["modules_to_save"] = list(a.config.get("modules_to_save") or [])  # type: ignore[call-overload]
        kw["base_name"] = a.config.get("base_model_name_or_path")
    return write_adapter(to, Path(output), mods, **kw)
