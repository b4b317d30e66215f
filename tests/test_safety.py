"""Nothing is ever lost: interrupted, failed or refused runs leave no output and untouched inputs."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from core_fixtures import sha256_tree

from merge.api import merge_expression
from merge.errors import DiskFullError, PlanError
from merge.io import writer as writer_mod

EXPR = "base + 0.5 * (a - base)"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_interrupt_removes_the_partial_output(
    three_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {k: sha256_tree(v) for k, v in three_models.items()}
    calls = {"n": 0}
    real = writer_mod.TensorFileWriter.write

    def interrupted(self: writer_mod.TensorFileWriter, name: str, data: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(self, name, data)  # type: ignore[arg-type]

    monkeypatch.setattr(writer_mod.TensorFileWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_expression(EXPR, three_models, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
    assert {k: sha256_tree(v) for k, v in three_models.items()} == before


def test_full_disk_removes_the_partial_output(
    three_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {k: sha256_tree(v) for k, v in three_models.items()}
    written = {"bytes": 0}
    real = writer_mod.TensorFileWriter._raw_write

    def filling(self: writer_mod.TensorFileWriter, data: bytes | memoryview) -> None:
        written["bytes"] += len(memoryview(data))
        if written["bytes"] > 1500:
            # What the OS raises when the disk is full, seen through the real code path.
            self._fh.write = lambda _: (_ for _ in ()).throw(
                OSError(errno.ENOSPC, "No space left on device")
            )  # type: ignore[attr-defined]
        real(self, data)

    monkeypatch.setattr(writer_mod.TensorFileWriter, "_raw_write", filling)
    with pytest.raises(
        DiskFullError,
        match="the disk filled up while writing to .*; the partial output was removed",
    ):
        merge_expression(EXPR, three_models, tmp_path / "out", shard_size="1KB")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert {k: sha256_tree(v) for k, v in three_models.items()} == before


def test_free_space_is_checked_before_writing(
    three_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 100))
    with pytest.raises(
        DiskFullError,
        match=r"not enough disk space for the output at .*: need 0.00 GB, 0.00 GB free",
    ):
        merge_expression(EXPR, three_models, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_each_output_file_is_reserved_whole_before_its_bytes(
    three_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fallocate(2) once per shard, for the file's final size, before any tensor is written."""
    real = writer_mod._FALLOCATE
    assert real is not None  # Linux with glibc: the machines the tests run on
    reserved: list[tuple[int, int, int]] = []
    written_before: list[int] = []
    raw_writes = {"n": 0}
    real_write = writer_mod.TensorFileWriter._raw_write

    def counting(self: writer_mod.TensorFileWriter, data: bytes | memoryview) -> None:
        raw_writes["n"] += 1
        real_write(self, data)

    def recording(fd: int, mode: int, offset: int, size: int) -> int:
        reserved.append((mode, offset, size))
        written_before.append(raw_writes["n"])
        return int(real(fd, mode, offset, size))

    monkeypatch.setattr(writer_mod, "_FALLOCATE", recording)
    monkeypatch.setattr(writer_mod.TensorFileWriter, "_raw_write", counting)
    merge_expression(EXPR, three_models, tmp_path / "out", shard_size="1KB")
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1
    assert sorted(size for _, _, size in reserved) == sorted(p.stat().st_size for p in shards)
    assert all(mode == 0 and offset == 0 for mode, offset, _ in reserved)
    # the first file is reserved before any byte of it is written (its header included)
    assert written_before[0] == 0 and written_before == sorted(set(written_before))


def test_a_disk_that_cannot_hold_the_output_is_refused_before_merging(
    three_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes

    def full(fd: int, mode: int, offset: int, size: int) -> int:
        ctypes.set_errno(errno.ENOSPC)
        return -1

    tensors = {"n": 0}
    real_write = writer_mod.TensorFileWriter.write

    def counting(self: writer_mod.TensorFileWriter, name: str, data: object) -> None:
        tensors["n"] += 1
        real_write(self, name, data)  # type: ignore[arg-type]

    monkeypatch.setattr(writer_mod, "_FALLOCATE", full)
    monkeypatch.setattr(writer_mod.TensorFileWriter, "write", counting)
    with pytest.raises(
        DiskFullError,
        match=r"the disk cannot hold .*model.safetensors \(0.00 GB\), found before writing it; "
        r"the partial output was removed; free some space or write elsewhere with -o",
    ):
        merge_expression(EXPR, three_models, tmp_path / "out")
    assert tensors["n"] == 0  # refused before any tensor was merged
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_file_system_without_fallocate_writes_the_same_bytes(
    three_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes

    merge_expression(EXPR, three_models, tmp_path / "reserved")

    def unsupported(fd: int, mode: int, offset: int, size: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(writer_mod, "_FALLOCATE", unsupported)
    merge_expression(EXPR, three_models, tmp_path / "appended")
    assert sha256_tree(tmp_path / "appended") == sha256_tree(tmp_path / "reserved")


def test_existing_output_needs_force(three_models: dict[str, Path], tmp_path: Path) -> None:
    merge_expression(EXPR, three_models, tmp_path / "out")
    first = sha256_tree(tmp_path / "out")
    with pytest.raises(PlanError, match="already exists; pass --force to replace it"):
        merge_expression("base + 0.25 * (a - base)", three_models, tmp_path / "out")
    assert sha256_tree(tmp_path / "out") == first
    merge_expression("base + 0.25 * (a - base)", three_models, tmp_path / "out", force=True)
    assert sha256_tree(tmp_path / "out") != first
    assert leftovers(tmp_path) == []


def test_force_never_replaces_a_folder_a_merge_did_not_write(
    three_models: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(PlanError, match=r"it holds files no merge wrote \(keep.txt\)"):
        merge_expression(EXPR, three_models, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_overlapping_an_input_is_refused(three_models: dict[str, Path], where: str) -> None:
    base = three_models["base"]
    target = {"same": base, "inside": base / "sub", "contains": base.parent}[where]
    before = sha256_tree(base)
    with pytest.raises(PlanError, match="refusing to write the output to .*input `base`"):
        merge_expression(EXPR, three_models, target, force=True)
    assert sha256_tree(base) == before
