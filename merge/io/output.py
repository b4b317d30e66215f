"""Where outputs go: the one output-path check, staging beside the destination, the atomic swap.

Every writing command goes through `check_output` (directly, and again through `StagedOutput`):
an output may not be, contain or lie inside an input; an existing output is replaced only with
`--force`, and only when a merge wrote it (folders carry `MARKER`, the list of files we wrote).
Output is staged as `.NAME.tmp-PID-XXXX` beside the destination, with an exclusive `flock` held
on it for the life of the run: that lock tells a live run from a dead one, so a later run into
the same destination refuses while one is writing and removes what a killed run left. `commit`
swaps the staged output in with one `renameat2` call (RENAME_NOREPLACE, or RENAME_EXCHANGE with
`--force`), so at every instant the destination holds a complete old output, a complete new
one, or nothing it held before; SIGINT and SIGTERM are held back while it runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from merge.errors import DiskFullError, PlanError
from merge.signals import signals_held

MARKER = ".merge-output.json"  # in every folder output: what we wrote, so --force knows it is ours

# What this process's outputs became, for a true message when it is interrupted.
_state: dict[str, list[Path]] = {"removed": [], "committed": []}


def reset_state() -> None:
    _state["removed"].clear()
    _state["committed"].clear()


def interrupted_message(terminated: bool = False) -> str:
    """What an interrupt left behind, as the CLI prints it: true before and after the commit."""
    what = "Terminated" if terminated else "Interrupted"
    if _state["removed"]:
        left = "the partial output was removed"
    elif _state["committed"]:
        done = ", ".join(str(p) for p in _state["committed"])
        left = f"the output {done} had been written completely and is in place"
    else:
        left = "no output was written"
    return f"{what}; {left} and the inputs are untouched."


# ---- the check ----------------------------------------------------------------------------------


def foreign_files(folder: Path) -> list[str]:
    """Files of `folder` that no merge wrote (none: a merge output, or empty).

    A merge lists what it wrote in `MARKER` at the top of each folder output (subfolders may be
    outputs of their own, like the per-component folders of a LoRA or `ema --sigma-rel`).
    """
    listed: set[Path] = set()
    for marker in folder.rglob(MARKER):
        try:
            data = json.loads(marker.read_text())
            files = data.get("files", []) if isinstance(data, dict) else []
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        listed |= {marker.parent / f for f in files if isinstance(f, str)}
    foreign = []
    for p in sorted(folder.rglob("*")):
        if p.name == MARKER or (p.is_dir() and not p.is_symlink()) or p in listed:
            continue
        foreign.append(p.relative_to(folder).as_posix())
    return foreign


Input = str | Path | tuple[str, str | Path]  # a path, or (recipe name, path)


def check_output(dest: str | Path, inputs: Iterable[Input] = (), *, force: bool = False) -> Path:
    """Refuse an output that cannot or must not be written; returns the path.

    Refused: an output that is, contains or lies inside an input; an existing one without
    `force`; with `force`, a folder holding files no merge wrote; a symbolic link; the current
    folder or one above it; a path under a file.
    """
    raw = str(dest)
    if not raw.strip():
        raise PlanError("the output path is empty; give -o a file or folder name")
    path = Path(dest).expanduser()
    if path.is_symlink():
        target = os.readlink(path)
        missing = "" if path.exists() else " (missing)"
        raise PlanError(
            f"output {path} is a symbolic link to {target}{missing}; give -o the real path, "
            "or remove the link"
        )
    out = path.resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or cwd.is_relative_to(out):
        raise PlanError(
            f"output {raw} is the current folder or contains it; give -o a new folder name "
            "(a merge output replaces the whole folder)"
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PlanError(
                    f"cannot create the output {raw}: {parent} is a file, not a folder; "
                    "choose another -o"
                )
            break
    for inp in inputs:
        label, spelled = inp if isinstance(inp, tuple) else (None, inp)
        p = Path(spelled).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            rel = "is" if out == p else ("contains" if p.is_relative_to(out) else "lies inside")
            what = f"input `{label}` ({p})" if label else f"the input {spelled} ({p})"
            raise PlanError(
                f"refusing to write the output to {raw}: it {rel} {what}; "
                "choose an output path outside every input"
            )
    if path.exists():
        if not force:
            raise PlanError(
                f"output {raw} already exists; pass --force to replace it, or choose another -o"
            )
        if path.is_dir():
            foreign = foreign_files(path)
            if foreign:
                shown = ", ".join(foreign[:5]) + (
                    f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
                )
                raise PlanError(
                    f"refusing to replace {raw} with --force: it holds files no merge wrote ({shown}); "
                    "move them away or choose another -o"
                )
    return path


# ---- staging, locks and the swap ----------------------------------------------------------------

_STAGING = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[^/]*$")


def _lock(fd: int) -> bool:
    """Take the exclusive lock on `fd` without waiting; False when a live process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # file systems without flock: fall back to the pid in the name
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_alive(p: Path, pid: int) -> bool:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return False
    try:
        if not _lock(fd):
            return True
        # Unlocked: dead, unless it is a run that has not taken its lock yet (a few microseconds).
        return pid == os.getpid() or (_pid_alive(pid) and _pid_is_merge(pid))
    finally:
        os.close(fd)


def _pid_is_merge(pid: int) -> bool:
    """A live pid that may still be the run that staged (its lock is checked first)."""
    try:
        return b"merge" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def sweep_stale(dest: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` staging beside `dest` that no live process owns; refuse live ones."""
    parent = dest.parent if str(dest.parent) else Path(".")
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    prefix = f".{dest.name}.tmp-"
    for p in sorted(parent.iterdir()):
        if not p.name.startswith(prefix):
            continue
        m = _STAGING.match(p.name)
        if m is None or m["name"] != dest.name:
            continue
        pid = int(m["pid"])
        if _owner_alive(p, pid):
            raise PlanError(
                f"another merge (process {pid}) is writing {dest} now ({p.name}); wait for it to "
                "finish or choose another -o"
            )
        with signals_held():
            _remove(p)
        removed.append(p)
        print(
            f"note: removed {p}, left by an interrupted run (process {pid}, no longer running)",
            file=sys.stderr,
        )
    return removed


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the racy way, once
    os.umask(mask)
    return mask


def os_error(e: OSError, dest: Path, doing: str) -> Exception:
    """A clear error for an OS failure while writing `dest` (the staging is removed by then)."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"the disk filled up (no space or no free inodes) while {doing} {dest}{where}; "
            "the partial output was removed; free some space or write elsewhere with -o"
        )
    if e.errno == errno.EROFS:
        return PlanError(
            f"cannot write the output {dest}: the file system is read-only{where}; choose another -o"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return PlanError(
            f"cannot write the output {dest}: permission denied{where}; choose a folder you can "
            "write to with -o"
        )
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return PlanError(
            f"cannot create the output {dest}: a file stands where a folder is needed{where}; "
            "choose another -o"
        )
    return PlanError(
        f"cannot write the output {dest}: {e.strerror or e}{where}; the partial output was removed"
    )


def describe_os_error(e: OSError) -> str:
    """One line for an OS error met anywhere (the CLI's last resort: no traceback)."""
    where = f" at {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device (or no free inodes){where}; free some space or write elsewhere"
    if e.errno == errno.EROFS:
        return f"read-only file system{where}; write elsewhere"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; check the path and its permissions"
    return f"{(e.strerror or str(e)).lower()}{where}"


class StagedOutput:
    """A temporary file or folder beside `dest` that becomes `dest` only on `commit()`.

    Use as a context manager: leaving it without `commit()` (an exception, Ctrl-C, SIGTERM)
    removes the temporary path, and an OSError inside becomes a clear MergeError.
    """

    def __init__(
        self, dest: Path, *, is_dir: bool, force: bool = False, inputs: Iterable[Input] = ()
    ):
        self.dest = check_output(dest, inputs, force=force)
        self.is_dir = is_dir
        self.force = force
        self.committed = False
        self._fd: int | None = None
        self._made: list[Path] = []
        parent = self.dest.parent
        # Folders this run creates above the output, removed again if it ends without output.
        self._made = [p for p in (parent, *parent.parents) if not p.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(self.dest)
            prefix = f".{self.dest.name}.tmp-{os.getpid()}-"
            umask = _umask()
            with signals_held():  # no staging without its lock
                if is_dir:
                    self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
                    os.chmod(self.tmp, 0o777 & ~umask)
                    self._fd = os.open(self.tmp, os.O_RDONLY)
                else:
                    self._fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
                    self.tmp = Path(name)
                    os.chmod(self.tmp, 0o666 & ~umask)
                _lock(self._fd)
        except OSError as e:
            raise os_error(e, self.dest, "creating") from e

    def path(self, relpath: str = "") -> Path:
        return self.tmp / relpath if relpath else self.tmp

    def commit(self) -> Path:
        if self.is_dir:
            files = sorted(
                p.relative_to(self.tmp).as_posix()
                for p in self.tmp.rglob("*")
                if not p.is_dir() and p.name != MARKER
            )
            (self.tmp / MARKER).write_text(
                json.dumps({"written_by": "merge", "files": files}) + "\n"
            )
        with signals_held():
            try:
                _rename(self.tmp, self.dest, _NOREPLACE)
            except FileExistsError:
                # Another run committed to the destination while this one wrote (their locks only
                # overlap when both started together): replace it only as --force allows.
                if not self.force:
                    raise PlanError(
                        f"output {self.dest} was written by another run while this one worked; "
                        "this run's output was removed and nothing was replaced; pass --force "
                        "to replace it"
                    ) from None
                check_output(self.dest, force=True)
                _exchange(self.tmp, self.dest)
                _remove(self.tmp)  # now the old output
            self.committed = True
            _state["committed"].append(self.dest)
            self._unlock()
        return self.dest

    def _unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        if not self.committed and hasattr(self, "tmp"):
            with signals_held():
                _remove(self.tmp)
                self._unlock()
                for p in self._made:  # deepest first; a folder someone else filled stays
                    try:
                        p.rmdir()
                    except OSError:
                        break
                _state["removed"].append(self.dest)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, et: object, e: object, tb: object) -> None:
        self.abort()
        if isinstance(e, OSError) and not isinstance(e, BlockingIOError):
            raise os_error(e, self.dest, "writing") from e


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


# renameat2(2): RENAME_NOREPLACE fails if the target exists; RENAME_EXCHANGE swaps two paths.
_NOREPLACE, _EXCHANGE = 1, 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def _rename(src: Path, dst: Path, flags: int) -> None:
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    # No renameat2 here (or not on this file system): the same checks, without the atomicity.
    if flags == _NOREPLACE:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))
        os.rename(src, dst)
    else:
        aside = dst.with_name(f".{dst.name}.swap-{os.getpid()}")
        os.rename(dst, aside)
        os.rename(src, dst)
        os.rename(aside, src)


def _exchange(src: Path, dst: Path) -> None:
    _rename(src, dst, _EXCHANGE)
