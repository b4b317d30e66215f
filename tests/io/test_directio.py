"""Output files written around the page cache: every byte lands in order, whatever the write
sizes; file systems that refuse O_DIRECT get buffered writes; failures leave nothing behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from core_fixtures import sha256_tree

from merge.api import merge_expression
from merge.errors import DiskFullError
from merge.io import directio
from merge.io.directio import ALIGN, DIRECT_IO_ENV, SequentialFile

pytestmark = pytest.mark.skipif(not getattr(os, "O_DIRECT", 0), reason="no O_DIRECT here")

STAGING = 4 * ALIGN  # small, so short writes cross the staging buffer's end many times


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize(
    "sizes",
    [
        [],  # an empty file
        [7],  # only an unaligned tail, written at close
        [STAGING],  # exactly one staging buffer
        [ALIGN * 2],  # whole blocks, less than the buffer
        [1, STAGING - 1, 3, ALIGN, 5 * STAGING + 11],  # crossing the buffer's end
        [8, 1000, 24, 3 * STAGING + ALIGN - 8, 17],  # header-like small pieces between big ones
    ],
)
def test_bytes_land_in_order(tmp_path: Path, sizes: list[int], direct: bool) -> None:
    path = tmp_path / "f.bin"
    pieces = [pattern(n, i) for i, n in enumerate(sizes)]
    f = SequentialFile(path, direct=direct, staging=STAGING)
    assert f.direct is direct  # ext4 and tmpfs on the test machines take O_DIRECT
    for p in pieces:
        f.write(memoryview(p))
    f.close()
    assert path.read_bytes() == b"".join(pieces)


def test_the_environment_can_turn_it_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DIRECT_IO_ENV, "0")
    f = SequentialFile(tmp_path / "f.bin")
    assert not f.direct
    f.close()
    monkeypatch.delenv(DIRECT_IO_ENV)
    f = SequentialFile(tmp_path / "g.bin")
    assert f.direct
    f.close()


def test_staging_must_be_whole_blocks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="staging must be a positive multiple of 4096, got 5000"):
        SequentialFile(tmp_path / "f.bin", staging=5000)


def test_a_file_system_refusing_o_direct_at_open_gets_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refusing(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:  # what Linux returns for a file system without it
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(directio.os, "open", refusing)
    data = pattern(3 * STAGING + 5, 1)
    f = SequentialFile(tmp_path / "f.bin", staging=STAGING)
    assert not f.direct
    f.write(data)
    f.close()
    assert (tmp_path / "f.bin").read_bytes() == data


def test_a_file_system_refusing_direct_writes_falls_back_without_losing_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some FUSE and network file systems open with O_DIRECT and refuse the write itself."""
    import fcntl

    real_write = os.write
    refused = {"n": 0}

    def refusing(fd: int, data: memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused["n"] += 1
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_write(fd, data)

    monkeypatch.setattr(directio.os, "write", refusing)
    data = pattern(5 * STAGING + 123, 2)
    f = SequentialFile(tmp_path / "f.bin", staging=STAGING)
    assert f.direct
    f.write(data[:100])
    f.write(data[100:])
    f.close()
    assert not f.direct and refused["n"] == 1
    assert (tmp_path / "f.bin").read_bytes() == data


@pytest.mark.parametrize("at_close", [True, False])
def test_an_error_of_a_write_in_flight_is_raised_by_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_close: bool
) -> None:
    """Direct writes run on the I/O thread; their failure must not be lost."""
    real_write = os.write
    calls = {"n": 0}

    def full_on_second(fd: int, data: memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(directio.os, "write", full_on_second)
    f = SequentialFile(tmp_path / "f.bin", staging=STAGING)
    f.write(pattern(2 * STAGING, 4))  # two buffers sent; the second fails on the I/O thread
    with pytest.raises(OSError, match="No space left on device"):
        if at_close:
            f.close()
        else:
            f.write(pattern(2 * STAGING, 5))  # waits for the failed buffer before reusing it
    f.discard()
    assert f.fileno() == -1


def test_discard_writes_nothing_staged_and_closes(tmp_path: Path) -> None:
    f = SequentialFile(tmp_path / "f.bin", staging=STAGING)
    f.write(pattern(100, 3))
    fd = f.fileno()
    f.discard()
    assert (tmp_path / "f.bin").stat().st_size == 0
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor was closed
    f.close()  # closing after a discard does nothing


def test_a_full_disk_at_the_last_bytes_is_reported_and_the_output_removed(
    three_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unaligned tail is written when the file closes; a full disk then is still a clear
    error with no partial output left."""
    before = {k: sha256_tree(v) for k, v in three_models.items()}
    real_write = os.write

    def full_when_buffered(fd: int, data: memoryview) -> int:
        import fcntl

        if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:  # the tail, at close
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(directio.os, "write", full_when_buffered)
    with pytest.raises(
        DiskFullError,
        match="the disk filled up while writing to .*; the partial output was removed",
    ):
        merge_expression("base + 0.5 * (a - base)", three_models, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "base"]  # no staging left
    assert {k: sha256_tree(v) for k, v in three_models.items()} == before


def test_merges_are_identical_with_and_without_direct_writes(
    three_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expr = "base + 0.5 * (a - base) + 0.25 * (b - base)"
    direct = merge_expression(expr, three_models, tmp_path / "direct")
    monkeypatch.setenv(DIRECT_IO_ENV, "0")
    buffered = merge_expression(expr, three_models, tmp_path / "buffered")
    files = sorted(p.name for p in Path(direct).iterdir())
    assert files == sorted(p.name for p in Path(buffered).iterdir())
    for name in files:
        assert (Path(direct) / name).read_bytes() == (Path(buffered) / name).read_bytes(), name
