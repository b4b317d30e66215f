"""One adapter module in canonical form and the formula that turns it into a dense float32 delta.

Notation (reference §0): a LoRA module has A/down `[r, in(,kh,kw)]`, B/up `[out, r(,1,1)]` and a
scale s (alpha/r, alpha/sqrt(r) for rsLoRA); its delta is `ΔW = s · B·A`. LyCORIS kinds (Tucker
LoCon, LoHa, LoKr, full diff) have their own products; every one ends as `ΔW · scale`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

Getter = Callable[[str], Tensor]  # file key -> tensor (read lazily, any dtype)

KINDS = ("lora", "tucker", "loha", "lokr", "full", "embedding")


@dataclass
class LoraModule:
    """One adapted module: where it sits, which file keys hold its factors, and its scale.

    `component` is a pipeline component (`unet`, `text_encoder`, ...) or "" for a plain model;
    `path` is the dotted module path inside it, or kohya's underscored name when `dotted` is False.
    """

    component: str
    path: str
    dotted: bool
    kind: str
    keys: dict[str, str]  # role (`A`, `B`, `mid`, `w1a`, ...) -> key in the adapter file
    scale: float = 1.0
    rank: int = 0
    alpha: float | None = None
    fan_in_fan_out: bool = False
    dora_key: str | None = None  # magnitude vector (PEFT) or `dora_scale` (kohya/LyCORIS)
    bias_key: str | None = None  # lora_B.bias / diff_b: a delta for `<module>.bias`
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.component}/{self.path}" if self.component else self.path

    @property
    def is_dora(self) -> bool:
        return self.dora_key is not None


def _f32(get: Getter, key: str) -> Tensor:
    return get(key).to(torch.float32)


def module_delta(mod: LoraModule, get: Getter) -> Tensor:
    """ΔW of one module in float32, scale included, in its natural shape.

    Linear `[out, in]`, conv `[out, in, kh, kw]`, embedding `[num_embeddings, dim]`; LoHa and
    non-Tucker LoKr of convs come out 2-D or 4-D as their factors say (callers reshape to the base).
    """
    k = mod.keys
    if mod.kind == "lora":
        a, b = _f32(get, k["A"]), _f32(get, k["B"])
        r = a.shape[0]
        # conv kxk: (B[out, r] @ A[r, in*kh*kw]).reshape(out, in, kh, kw); 1x1 and linear alike
        d = (b.reshape(b.shape[0], r) @ a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:])
        if mod.fan_in_fan_out:
            d = d.T  # the base stores [in, out] (GPT-2 Conv1D)
    elif mod.kind == "embedding":
        a, b = _f32(get, k["A"]), _f32(get, k["B"])  # A [r, num], B [dim, r]
        d = (b @ a).T  # [num, dim]
    elif mod.kind == "tucker":
        mid, up, down = _f32(get, k["mid"]), _f32(get, k["B"]), _f32(get, k["A"])
        r = mid.shape[0]
        d = torch.einsum("nmkl,in,mj->ijkl", mid, up.reshape(up.shape[0], -1), down.reshape(r, -1))
    elif mod.kind == "loha":
        d = _hada_rebuild(get, k, 1) * _hada_rebuild(get, k, 2)
    elif mod.kind == "lokr":
        w1 = _f32(get, k["w1"]) if "w1" in k else _f32(get, k["w1a"]) @ _f32(get, k["w1b"])
        if "w2" in k:
            w2 = _f32(get, k["w2"])
        elif "t2" in k:
            # w2 = t2 ×_0 w2a ×_1 w2b : [r, r, kh, kw] -> [c, d, kh, kw]
            w2 = torch.einsum(
                "ijkl,ip,jr->prkl", _f32(get, k["t2"]), _f32(get, k["w2a"]), _f32(get, k["w2b"])
            )
        else:
            w2 = _f32(get, k["w2a"]) @ _f32(get, k["w2b"])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1.contiguous(), w2.contiguous())
    elif mod.kind == "full":
        d = _f32(get, k["diff"])
    else:  # pragma: no cover - kinds are fixed by the reader
        raise ValueError(mod.kind)
    return d * mod.scale


def _hada_rebuild(get: Getter, k: dict[str, str], i: int) -> Tensor:
    wa, wb = _f32(get, k[f"w{i}a"]), _f32(get, k[f"w{i}b"])
    t = k.get(f"t{i}")
    if t is not None:
        # Tucker: t [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw]
        return torch.einsum("ijkl,jr,ip->prkl", _f32(get, t), wb, wa)
    return wa @ wb  # [out, r] @ [r, in*kh*kw]


def dora_axis(magnitude_shape: tuple[int, ...], weight_shape: tuple[int, ...], peft: bool) -> int:
    """Which axis a DoRA magnitude normalises: 0 = per output channel, 1 = per input column.

    PEFT stores `[out]` (linear) or `[1, out, 1, 1]` (conv), always per output channel.
    Kohya/LyCORIS `dora_scale` is `[out, 1(,1,1)]` (wd_on_out) or legacy `[1, in(,1,1)]`.
    """
    if peft:
        return 0
    if (
        magnitude_shape
        and magnitude_shape[0] == weight_shape[0]
        and (len(magnitude_shape) == 1 or magnitude_shape[1] == 1)
    ):
        return 0
    return 1


def dora_weight(w: Tensor, delta: Tensor, magnitude: Tensor, axis: int) -> Tensor:
    """DoRA merge: W' = m · (W + ΔW) / ‖W + ΔW‖, the norm over every dim but `axis`, in float32."""
    v = w.to(torch.float32) + delta
    n = v.shape[axis]
    if magnitude.numel() != n:
        raise ValueError(
            f"DoRA magnitude of shape {tuple(magnitude.shape)} does not fit axis {axis} of a weight {tuple(v.shape)}"
        )
    dims = tuple(d for d in range(v.dim()) if d != axis)
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    shape = [1] * v.dim()
    shape[axis] = n
    return v * (magnitude.to(torch.float32).reshape(shape) / norm)
