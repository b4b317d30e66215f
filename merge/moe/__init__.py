"""Mixture-of-experts checkpoints from dense models, from mergekit-moe's config (`merge moe`).

    from merge.moe import build_moe
    build_moe("moe.yaml", "out/")   # a Mixtral (or Qwen2-MoE) folder that transformers loads

See docs/moe.md for the config keys, the gate modes and how the output is laid out.
"""

from __future__ import annotations

from merge.moe.build import build_moe
from merge.moe.config import GATE_MODES, LoadedConfig, MoEConfig, load_moe_config

__all__ = ["GATE_MODES", "LoadedConfig", "MoEConfig", "build_moe", "load_moe_config"]
