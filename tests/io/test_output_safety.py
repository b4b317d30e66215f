"""Where outputs go: one output check for every writing verb, --force only over our own outputs,
a swap that is never half done, concurrent and killed runs, OS errors, umask, path-free bytes.
(Issue 15, items 1, 2, 3, 7, 14, 17, 20; issue 14, item 20.)"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from writing_verbs import VERBS, staging_left, start_slow_merge, tree_hash, wait_for

from merge.cli import cli
from merge.errors import PlanError
from merge.io import output as output_mod
from merge.io.output import MARKER, StagedOutput


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def text(r: Result) -> str:
    return r.output + (r.stderr if r.stderr_bytes is not None else "")


def out_for(verb: str, folder: Path) -> Path:
    return folder / ("out.safetensors" if verb == "stats" else "out")


def assert_clean_error(r: Result, pattern: str, code: int = 1) -> None:
    """Exit `code` (1, or 2 for usage) with the message, and no traceback (not a raw exception)."""
    import re

    assert r.exit_code == code, text(r)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert re.search(pattern, text(r)), text(r)


# ---- 15.1: one output check for every writing verb ----------------------------------------------


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_writing_verb_refuses_an_input_as_its_output(
    verb: str, writing_world: dict[str, Path]
) -> None:
    args, inputs = VERBS[verb]
    target = writing_world[inputs[0]]
    before = {k: tree_hash(writing_world[k]) for k in inputs}
    r = invoke(*args(writing_world, str(target)), "--force")
    assert_clean_error(r, r"refusing to write the output to .*: it (is|lies inside) (the )?input")
    assert {k: tree_hash(writing_world[k]) for k in inputs} == before
    assert staging_left(target.parent) == []


@pytest.mark.parametrize("verb", ["linear", "lora-extract", "lora-convert"])
def test_an_output_containing_an_input_is_refused(
    verb: str, writing_world: dict[str, Path]
) -> None:
    args, inputs = VERBS[verb]
    r = invoke(*args(writing_world, str(writing_world[inputs[0]].parent)), "--force")
    assert_clean_error(r, r"refusing to write the output to .*: it contains (the )?input")


# ---- 15.2: --force replaces only what a merge wrote -------------------------------------------


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_force_replaces_our_own_output_of_every_verb(
    verb: str, writing_world: dict[str, Path], tmp_path: Path
) -> None:
    args, _ = VERBS[verb]
    out = out_for(verb, tmp_path)
    assert invoke(*args(writing_world, str(out))).exit_code == 0
    r = invoke(*args(writing_world, str(out)))
    assert_clean_error(r, r"already exists; pass --force to replace it")
    r = invoke(*args(writing_world, str(out)), "--force")
    assert r.exit_code == 0, text(r)
    assert staging_left(tmp_path) == []


def test_force_refuses_a_folder_that_is_not_a_merge_output(
    writing_world: dict[str, Path], tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("years of work")
    (mine / "model.safetensors").write_bytes(b"not ours")
    before = tree_hash(mine)
    args, _ = VERBS["linear"]
    r = invoke(*args(writing_world, str(mine)), "--force")
    assert_clean_error(
        r,
        r"refusing to replace .*mine with --force: it holds files no merge wrote "
        r"\(model.safetensors, notes.txt\); move them away or choose another -o",
    )
    assert tree_hash(mine) == before and staging_left(tmp_path) == []


def test_force_refuses_files_added_to_a_merge_output(
    writing_world: dict[str, Path], tmp_path: Path
) -> None:
    args, _ = VERBS["lora-extract"]
    out = tmp_path / "out"
    assert invoke(*args(writing_world, str(out))).exit_code == 0
    assert (out / MARKER).is_file()
    (out / "README.md").write_text("my notes")
    r = invoke(*args(writing_world, str(out)), "--force")
    assert_clean_error(r, r"holds files no merge wrote \(README.md\)")
    assert (out / "README.md").read_text() == "my notes"


def test_force_over_an_empty_folder(writing_world: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    args, _ = VERBS["linear"]
    assert invoke(*args(writing_world, str(tmp_path / "out")), "--force").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---- 15.3: the --force swap is never half done, and the Ctrl-C message is true ------------------


@pytest.mark.parametrize("at", [1, 2, 3])
def test_interrupting_the_force_swap_leaves_a_complete_output(
    three_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: int
) -> None:
    from merge.api import merge_expression

    out = tmp_path / "out"
    merge_expression("base + 0.5 * (a - base)", three_models, out)
    old = tree_hash(out)
    merge_expression("base + 0.25 * (a - base)", three_models, tmp_path / "ref")
    new = tree_hash(tmp_path / "ref")
    calls = {"n": 0}

    def interrupted(real):  # type: ignore[no-untyped-def]
        def rename(*a: object, **k: object) -> object:
            calls["n"] += 1
            if calls["n"] == at:
                raise KeyboardInterrupt
            return real(*a, **k)

        return rename

    monkeypatch.setattr(os, "replace", interrupted(os.replace))
    monkeypatch.setattr(os, "rename", interrupted(os.rename))
    try:
        merge_expression("base + 0.25 * (a - base)", three_models, out, force=True)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert out.is_dir() and tree_hash(out) in (old, new)
    assert staging_left(tmp_path) == []


def test_ctrl_c_right_after_the_commit_says_the_output_is_in_place(
    writing_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = StagedOutput.commit

    def commit_then_interrupt(self: StagedOutput) -> Path:
        real(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(StagedOutput, "commit", commit_then_interrupt)
    args, _ = VERBS["linear"]
    r = invoke(*args(writing_world, str(tmp_path / "out")))
    assert r.exit_code == 130
    assert "Interrupted; the output " in text(r) and "is in place" in text(r), text(r)
    assert "removed" not in text(r)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_signal_during_the_commit_waits_for_it(
    writing_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = output_mod._rename

    def signalled(*a: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # held back until the swap is done
        real(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(output_mod, "_rename", signalled)
    args, _ = VERBS["linear"]
    r = invoke(*args(writing_world, str(tmp_path / "out")))
    assert r.exit_code == 130, text(r)
    assert "had been written completely and is in place" in text(r)
    assert (tmp_path / "out" / "model.safetensors").is_file() and staging_left(tmp_path) == []


def test_ctrl_c_while_writing_says_the_partial_output_was_removed(
    writing_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from merge.io import writer

    def interrupted(self: object, data: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.TensorFileWriter, "_raw_write", interrupted)
    args, _ = VERBS["lora-bake"]
    r = invoke(*args(writing_world, str(tmp_path / "out")))
    assert r.exit_code == 130
    assert "Interrupted; the partial output was removed and the inputs are untouched." in text(r)
    assert not (tmp_path / "out").exists() and staging_left(tmp_path) == []


# ---- 15.7 and 15.17: concurrent runs and what killed runs leave ---------------------------------


def test_a_second_run_into_a_destination_being_written_is_refused(
    writing_world: dict[str, Path], tmp_path: Path
) -> None:
    args, _ = VERBS["linear"]
    out = tmp_path / "out"
    child = start_slow_merge(args(writing_world, str(out)), tmp_path / "ready")
    try:
        wait_for((tmp_path / "ready").exists, child, "the first run to start writing")
        for extra in ([], ["--force"]):
            r = invoke(*args(writing_world, str(out)), *extra)
            assert_clean_error(
                r,
                rf"another merge \(process {child.pid}\) is writing .*out now .*; wait for it "
                "to finish or choose another -o",
            )
        assert not out.exists()
    finally:
        child.send_signal(signal.SIGTERM)
        child.communicate(timeout=60)
    assert child.returncode == 143 and staging_left(tmp_path) == []


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    refused = pytest.raises(PlanError, match="was written by another run while this one worked")
    with refused, StagedOutput(dest, is_dir=True) as staged:
        (staged.path() / "model.safetensors").write_bytes(b"ours")
        dest.mkdir()  # another writer commits first
        (dest / "model.safetensors").write_bytes(b"theirs")
        staged.commit()
    assert (dest / "model.safetensors").read_bytes() == b"theirs"
    assert staging_left(tmp_path) == []


def test_staging_of_a_killed_run_is_removed_by_the_next_run(
    writing_world: dict[str, Path], tmp_path: Path
) -> None:
    args, _ = VERBS["lora-extract"]
    out = tmp_path / "out"
    (tmp_path / ".other.tmp-1-abc").mkdir()  # another destination's: not ours to judge
    child = start_slow_merge(args(writing_world, str(out)), tmp_path / "ready")
    wait_for((tmp_path / "ready").exists, child, "the run to start writing")
    child.kill()
    child.communicate(timeout=60)
    left = [p for p in staging_left(tmp_path) if p.startswith(".out.tmp-") and "/" not in p]
    assert left == [f".out.tmp-{child.pid}-" + left[0].split("-", 2)[2]]
    r = invoke(*args(writing_world, str(out)))
    assert r.exit_code == 0, text(r)
    assert (
        f"note: removed {tmp_path / left[0]}, left by an interrupted run (process {child.pid}, "
        "no longer running)" in text(r)
    )
    assert staging_left(tmp_path) == [".other.tmp-1-abc"]


# ---- 15.14: OS errors are clear errors, staging removed -----------------------------------------


def _fail_copy(name: str, err: int):  # type: ignore[no-untyped-def]
    real = shutil.copyfile

    def copyfile(src: object, dst: object, **kw: object) -> object:
        if Path(str(dst)).name == name:
            raise OSError(err, os.strerror(err), str(dst))
        return real(src, dst, **kw)  # type: ignore[arg-type]

    return copyfile


def test_disk_full_while_copying_a_support_file(
    writing_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "copyfile", _fail_copy("generation_config.json", errno.ENOSPC))
    args, _ = VERBS["linear"]
    r = invoke(*args(writing_world, str(tmp_path / "out")))
    assert_clean_error(
        r,
        r"the disk filled up \(no space or no free inodes\) while writing .*out "
        r"\(.*generation_config.json\); the partial output was removed",
    )
    assert not (tmp_path / "out").exists() and staging_left(tmp_path) == []


@pytest.mark.parametrize(
    ("err", "message"),
    [
        (errno.ENOSPC, r"the disk filled up \(no space or no free inodes\) while creating"),
        (errno.EROFS, r"cannot write the output .*out: the file system is read-only"),
        (errno.EACCES, r"cannot write the output .*out: permission denied"),
    ],
)
def test_os_errors_creating_the_staging(
    writing_world: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    err: int,
    message: str,
) -> None:
    real = tempfile.mkdtemp

    def refuse(*a: object, **k: object) -> str:
        if k.get("dir") == tmp_path:  # the staging beside the output; other temp folders work
            raise OSError(err, os.strerror(err), str(tmp_path))
        return real(*a, **k)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    args, _ = VERBS["lora-convert"]
    assert_clean_error(invoke(*args(writing_world, str(tmp_path / "out"))), message)
    assert staging_left(tmp_path) == []


def test_os_errors_anywhere_else_are_clear_errors(
    writing_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*a: object, **k: object) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/scratch")

    monkeypatch.setattr(tempfile, "mkdtemp", full)  # the staging folder (lora convert has no other)
    args, _ = VERBS["lora-convert"]
    r = invoke(*args(writing_world, str(tmp_path / "out")))
    assert_clean_error(
        r,
        r"Error: the disk filled up \(no space or no free inodes\) while creating .*out "
        r"\(/tmp/scratch\); the partial output was removed; free some space or write elsewhere",
    )
    assert staging_left(tmp_path) == []


def test_a_dangling_symlink_as_output_is_refused(
    writing_world: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    args, _ = VERBS["linear"]
    r = invoke(*args(writing_world, str(tmp_path / "out")), "--force")
    assert_clean_error(
        r, r"output .*out is a symbolic link to .*nowhere \(missing\); give -o the real path"
    )
    assert (tmp_path / "out").is_symlink() and not (tmp_path / "nowhere").exists()


def test_an_output_under_a_file_is_refused(writing_world: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    args, _ = VERBS["lora-bake"]
    r = invoke(*args(writing_world, str(tmp_path / "file" / "out")))
    assert_clean_error(r, r"cannot create the output .*file/out: .*file is a file, not a folder")


def test_the_current_folder_is_refused_as_output(
    writing_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    args, _ = VERBS["linear"]
    for out in (".", "..", str(tmp_path)):
        r = invoke(*args(writing_world, out), "--force")
        assert_clean_error(r, r"is the current folder or contains it; give -o a new folder name")
    assert (tmp_path / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("1e400GB", r"size `1e400GB` is too large"),
        ("-5GB", r"size `-5GB` is out of range; give a positive size"),
        ("0", r"size `0` is out of range; give a positive size"),
        ("nanGB", r"size `nanGB` is out of range; give a positive size"),
    ],
)
def test_an_impossible_shard_size_is_a_clear_error(
    writing_world: dict[str, Path], tmp_path: Path, size: str, message: str
) -> None:
    from merge.io.writer import parse_size

    with pytest.raises(PlanError, match=message):
        parse_size(size)  # the recipe's `shard_size` and the Python API
    args, _ = VERBS["linear"]
    r = invoke(*args(writing_world, str(tmp_path / "out")), "--shard-size", size)
    # A usage error (exit 2), found while parsing the option, before anything is read.
    assert_clean_error(r, message, code=2)
    assert staging_left(tmp_path) == []


# ---- 15.20: the same inputs, spelled differently, give the same bytes ---------------------------


def test_same_inputs_spelled_differently_give_the_same_bytes(
    writing_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, tuned = writing_world["base"], writing_world["tuned"]
    (tmp_path / "link").symlink_to(base.parent)
    monkeypatch.chdir(base.parent)
    spellings = [
        (str(base), str(tuned)),
        ("base", "./tuned/"),
        (str(tmp_path / "link" / "base"), f"{tuned.parent}/../{tuned.parent.name}/tuned"),
    ]
    hashes = set()
    for i, (b, t) in enumerate(spellings):
        out = tmp_path / f"out{i}"
        r = invoke("linear", b, t, "-o", str(out), "-q")
        assert r.exit_code == 0, text(r)
        hashes.add(tree_hash(out))
    assert len(hashes) == 1


# ---- 14.20: outputs respect the umask ----------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("verb", ["linear", "stats", "lora-extract"])
def test_outputs_respect_the_umask(
    writing_world: dict[str, Path], tmp_path: Path, umask: int, verb: str
) -> None:
    args, _ = VERBS[verb]
    out = out_for(verb, tmp_path)
    old = os.umask(umask)
    try:
        r = invoke(*args(writing_world, str(out)))
    finally:
        os.umask(old)
    assert r.exit_code == 0, text(r)
    paths = [out, *out.rglob("*")] if out.is_dir() else [out]
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))
