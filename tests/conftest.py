"""Shared fixtures: small checkpoints written in real formats, built in process."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from core_fixtures import tensors

from merge.io import save_state_dict

# A suite started with SIGINT ignored (`make test &` in a script, nohup) would pass that on to
# every `merge` child, which then rightly leaves Ctrl-C ignored, and the signal tests would fail.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def three_models(tmp_path: Path) -> dict[str, Path]:
    """base, a, b as sharded safetensors folders (float32), with a config.json."""
    paths = {}
    for seed, name in enumerate(["base", "a", "b"]):
        p = save_state_dict(tensors(seed), tmp_path / name, shard_size=1200)
        (p / "config.json").write_text('{"model_type": "toy", "torch_dtype": "float32"}\n')
        paths[name] = p
    return paths


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`cuda` tests skip, saying why, where torch sees no CUDA device (CI has none)."""
    import os

    import torch

    if torch.cuda.is_available() or os.environ.get("MERGE_TEST_DEVICE", "cuda") != "cuda":
        return
    why = pytest.mark.skip(
        reason=f"needs a CUDA device: torch {torch.__version__} sees none (run `make gpu-check` on a GPU machine)"
    )
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(why)


@pytest.fixture(scope="session")
def writing_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny real inputs for every writing command (`tests/writing_verbs.py`); never written to."""
    from writing_verbs import build_world

    return build_world(tmp_path_factory.mktemp("writing_world"))
