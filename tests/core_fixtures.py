"""Small state dicts for the core tests (imported by name; `conftest` names clash across folders)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def tensors(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A Llama-ish little state dict: layered float weights, a norm, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g)}
    for i in range(3):
        out[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(12, 8, generator=g)
        out[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(8, generator=g)
    out = {k: v.to(dtype) for k, v in out.items()}
    out["model.position_ids"] = torch.arange(10)
    return out


def sha256_tree(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()
