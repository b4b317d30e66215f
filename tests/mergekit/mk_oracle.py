"""Helpers for the mergekit-parity tests: tiny Llama checkpoints, and one config run both by
`merge run` and by mergekit 0.1.5 in process (the oracle; the `compare` extra)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from merge.cli import cli
from merge.errors import MergeWarning

try:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    HAVE_MERGEKIT = True
except ImportError:  # pragma: no cover - the compare extra is not installed
    HAVE_MERGEKIT = False

needs_mergekit = pytest.mark.skipif(not HAVE_MERGEKIT, reason="mergekit (the compare extra) absent")


def tiny_llama(
    path: Path, seed: int, *, layers: int = 2, dtype: torch.dtype = torch.float32
) -> Path:
    """A pico Llama (hidden 32, vocab 64) saved as safetensors in `dtype`."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_hidden_layers=layers,
        max_position_embeddings=32,
    )
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_ours(config: dict[str, Any] | Path, out: Path) -> dict[str, torch.Tensor]:
    """`merge run` on a config (a dict is written beside `out` first); MergeWarnings about
    mergekit's ignored parameters are allowed, any other fails the test."""
    if not isinstance(config, Path):
        path = out.parent / f"{out.name}.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        config = path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MergeWarning)
        res = CliRunner().invoke(cli, ["run", str(config), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    for w in caught:
        if issubclass(w.category, MergeWarning):
            assert str(w.message).startswith("mergekit config: "), w.message
    return tensors(out)


def run_mergekit(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5 on the same config (it logs an error about the tiny models' missing
    tokenizer, which does not concern the tensors)."""
    logging.disable(logging.ERROR)
    try:
        run_merge(
            MergeConfiguration.model_validate(config),
            out_path=str(out),
            options=MergeOptions(quiet=True),
        )
    finally:
        logging.disable(logging.NOTSET)
    return tensors(out)
