"""`merge demo`'s alignment act: trains two seeds, writes the plot, returns the barrier table."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from merge.demo import alignment_act


def test_alignment_act_shows_the_barrier_falling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.perf_counter()
    text = alignment_act(tmp_path / "act")
    assert time.perf_counter() - start < 60
    assert capsys.readouterr().out == ""  # no progress callback: silent
    rows = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(naive|aligned)\s+(-?\d+\.\d+)", text, re.M)
    }
    assert set(rows) == {"naive", "aligned"}
    assert rows["aligned"] < 0.25 * rows["naive"]  # experiment E3's pass criterion
    assert "weight matching removes" in text
    plot = tmp_path / "act" / "path.png"
    assert f"plot: {plot}" in text and plot.stat().st_size > 5000
    data = json.loads((tmp_path / "act" / "path.json").read_text())
    assert [c["name"] for c in data["curves"]] == ["naive", "aligned"]
