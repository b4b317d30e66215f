"""One signal policy for every writing verb: SIGINT exits 130, SIGTERM 143, staging removed,
inputs untouched, one line and no traceback; at start-up too. (Issue 15, items 15 and 16.)

Each run is a real `merge` process (`merge.console.main`) whose tensor writer pauses after its
first bytes (`writing_verbs.SLOW_MERGE`), so the signal lands mid-write on any machine.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from writing_verbs import (
    SLOW_MERGE,
    VERBS,
    child_env,
    staging_left,
    start_slow_merge,
    tree_hash,
    wait_for,
)

CASES = [(verb, signal.SIGTERM) for verb in sorted(VERBS)] + [
    (verb, signal.SIGINT) for verb in ("linear", "lora-bake")
]


@pytest.mark.parametrize(("verb", "signum"), CASES, ids=[f"{v}-{s.name}" for v, s in CASES])
def test_a_signal_mid_write_cleans_up_every_writing_verb(
    verb: str, signum: signal.Signals, writing_world: dict[str, Path], tmp_path: Path
) -> None:
    args, inputs = VERBS[verb]
    before = {k: tree_hash(writing_world[k]) for k in inputs}
    out = tmp_path / ("out.safetensors" if verb == "stats" else "out")
    child = start_slow_merge(args(writing_world, str(out)), tmp_path / "ready")
    wait_for((tmp_path / "ready").exists, child, "the first bytes to be written")
    assert staging_left(tmp_path)  # mid-write: the staging is there
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    word = "Terminated" if signum == signal.SIGTERM else "Interrupted"
    assert child.returncode == (143 if signum == signal.SIGTERM else 130), err
    assert f"{word}; the partial output was removed and the inputs are untouched." in err
    assert "Traceback" not in err
    assert staging_left(tmp_path) == [] and not out.exists()
    assert {k: tree_hash(writing_world[k]) for k in inputs} == before


def _libtorch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_exits_cleanly(
    signum: signal.Signals, writing_world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "merge",
            "linear",
            str(writing_world["base"]),
            str(writing_world["tuned"]),
            "-o",
            str(out),
        ],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: _libtorch_loaded(child.pid), child, "torch to start loading", limit=60)
    child.send_signal(signum)  # torch is importing now
    _, err = child.communicate(timeout=120)
    word = "Terminated" if signum == signal.SIGTERM else "Interrupted"
    assert child.returncode == (143 if signum == signal.SIGTERM else 130), err
    # Before the command line has loaded, or while the command's imports run: either way the
    # signal waits for the import to finish, then ends the run with nothing written.
    assert err.strip().splitlines()[-1] in (
        f"{word} during start-up; no output was written and the inputs are untouched.",
        f"{word}; no output was written and the inputs are untouched.",
    ), err
    assert "Traceback" not in err and not out.exists() and staging_left(tmp_path) == []


def test_help_and_usage_errors_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from merge.console import main\n"
        "for args in (['--help'], ['lora', '--help'], ['linear', '--help'], ['nope']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout + r.stderr


def test_a_signal_ignored_by_the_parent_stays_ignored(
    writing_world: dict[str, Path], tmp_path: Path
) -> None:
    """`nohup`/`cmd &` start a run with SIGINT ignored; the policy must not take it back."""
    args, _ = VERBS["linear"]
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, *args(writing_world, str(out))],
        env=child_env(MERGE_TEST_READY=str(tmp_path / "ready")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    wait_for((tmp_path / "ready").exists, child, "the first bytes to be written")
    child.send_signal(signal.SIGINT)  # ignored
    time.sleep(0.5)
    assert child.poll() is None
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    assert staging_left(tmp_path) == [] and not out.exists()
