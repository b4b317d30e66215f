"""An input truncated while a merge reads it: a clear error naming the file, no SIGBUS, no staging left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]


def test_input_truncated_mid_merge_fails_cleanly(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(2):
        p = tmp_path / f"m{i}.safetensors"
        # 8 tensors of 4 MB: the merge takes long enough to be caught in the middle.
        save_file({f"w{j}": torch.randn(1024, 1024, generator=g) for j in range(8)}, p)
        inputs.append(p)
    pristine = inputs[1].read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outcomes = []
    for round_ in range(4):
        inputs[1].write_bytes(pristine)
        out = tmp_path / f"out{round_}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "merge", "linear", *map(str, inputs), "-o", str(out), "-q"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Truncate as soon as the staging folder exists (the merge has started reading),
        # a little later each round.
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(f".{out.name}.tmp") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "merge never started"
            time.sleep(0.002)
        time.sleep(0.01 * round_)
        with open(inputs[1], "r+b") as f:
            f.truncate(len(pristine) // 3)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != -signal.SIGBUS, err
        outcomes.append(proc.returncode)
        if proc.returncode != 0:  # finished before the truncation otherwise
            assert proc.returncode == 1, err
            assert f"{inputs[1]}: the file ended while reading" in err, err
            assert "Traceback" not in err
            assert not out.exists()
        leftovers = [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
        assert leftovers == [], leftovers
    assert 1 in outcomes  # at least one round was caught mid-merge
