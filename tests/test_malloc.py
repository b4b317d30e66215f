"""The console script's allocator policy (merge.malloc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from merge.malloc import keep_freed_blocks


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_blocks_takes_on_glibc() -> None:
    assert keep_freed_blocks() is True


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/stat")
def test_chunk_sized_temporaries_stop_page_faulting() -> None:
    # 100 rounds of a chunk's temporaries (six 4 MB tensors alive at once, then freed): glibc
    # gives the freed heap top back to the kernel and faults it in again next round; with the
    # policy the blocks stay in the heap and are reused.
    code = (
        "import sys, torch\n"
        "from merge.malloc import keep_freed_blocks\n"
        "if sys.argv[1] == 'on': keep_freed_blocks()\n"
        "x = torch.ones(1 << 20)\n"
        "def faults(): return int(open('/proc/self/stat').read().split(')')[1].split()[7])\n"
        "f0 = faults()\n"
        "for _ in range(100): ts = [x * i for i in range(6)]; del ts\n"
        "print(faults() - f0)\n"
    )
    got = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", code, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("off", "on")
    }
    # Without the policy glibc faulted 47k to 100k+ pages here (its dynamic mmap and trim
    # thresholds adapt differently from run to run); with it, about the first round's only.
    assert got["on"] < 20_000, got
    assert got["on"] < got["off"], got
