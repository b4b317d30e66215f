"""Shared fixtures: small checkpoints written in real formats, built in process."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from merge.io import save_state_dict


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


@pytest.fixture
def three_models(tmp_path: Path) -> dict[str, Path]:
    """base, a, b as sharded safetensors folders (float32), with a config.json."""
    paths = {}
    for seed, name in enumerate(["base", "a", "b"]):
        p = save_state_dict(tensors(seed), tmp_path / name, shard_size=1200)
        (p / "config.json").write_text('{"model_type": "toy", "torch_dtype": "float32"}\n')
        paths[name] = p
    return paths
