"""Progress and the write summary (14.23): plain periodic lines when stderr is not a terminal,
and a closing line that says what was written."""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from merge.cli import cli
from merge.progress import PlainProgress, byte_progress, human_bytes, write_summary


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_tty() -> None:
    log = io.StringIO()
    bar = byte_progress(3_000_000_000, "merging", quiet=False, stream=log)
    assert isinstance(bar, PlainProgress)
    bar.period = 0.0  # a line per update, to see them
    bar.update(1_200_000_000)
    bar.update(1_800_000_000)
    bar.close()
    bar.close()
    lines = log.getvalue().splitlines()
    assert [re.sub(r", \d+ s$", "", x) for x in lines] == [
        "merging: 40% (1.2 GB of 3.0 GB)",
        "merging: 100% (3.0 GB of 3.0 GB)",
        "merging: 100% (3.0 GB of 3.0 GB)",
    ][: len(lines)] and len(lines) == 3
    assert "\r" not in log.getvalue()
    quiet = io.StringIO()
    byte_progress(10, "merging", quiet=True, stream=quiet).update(10)
    assert quiet.getvalue() == ""
    assert type(byte_progress(10, "merging", quiet=False, stream=_Tty())).__name__ == "tqdm"


def test_summary_text() -> None:
    assert human_bytes(999) == "999 B" and human_bytes(1_234_567) == "1.2 MB"
    assert (
        write_summary(
            Path("out"),
            tensors=291,
            nbytes=1_234_567_890,
            files=2,
            seconds=3.41,
            copied=["config.json", "tokenizer.json"],
            source="base",
        )
        == "wrote out: 291 tensors, 1.2 GB in 2 files, 3.4 s; copied from base: config.json, tokenizer.json"
    )


def test_cli_merge_log_has_no_bar_frames_and_says_what_it_wrote(tmp_path: Path) -> None:
    save_file({"a": torch.ones(4, 4), "b": torch.ones(3)}, tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(4, 4), "b": torch.zeros(3)}, tmp_path / "y.safetensors")
    r = CliRunner().invoke(
        cli,
        [
            "linear",
            str(tmp_path / "x.safetensors"),
            str(tmp_path / "y.safetensors"),
            "-o",
            str(tmp_path / "m"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "\r" not in r.output and "it/s" not in r.output and "B/s" not in r.output
    assert re.search(
        rf"wrote {re.escape(str(tmp_path / 'm'))}: 2 tensors, 76 B in 1 file, \d+\.\d s\n", r.output
    ), r.output
    assert re.search(r"^merging: 100% \(228 B of 228 B\), \d+ s$", r.output, re.M), (
        r.output
    )  # read + written


def test_counted_items_write_plain_lines_in_logs(monkeypatch: object) -> None:
    import sys

    from merge.progress import counted

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)  # type: ignore[attr-defined]
    assert list(counted(["a", "b", "c"], "inspecting", quiet=False)) == ["a", "b", "c"]
    assert re.fullmatch(r"inspecting: 100% \(3 of 3 tensors\), \d+ s\n", log.getvalue())
    assert list(counted(["a"], "inspecting", quiet=True)) == ["a"]
    assert log.getvalue().count("\n") == 1
