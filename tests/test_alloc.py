"""The daemon's malloc settings: applied where the C library is glibc, harmless elsewhere."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from encfs_cloud.daemon import alloc

GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_settings_take_on_glibc() -> None:
    # In a child: the settings last for the process, and the test runner should keep its own.
    code = (
        "from encfs_cloud.daemon import alloc\n"
        "assert alloc.tune_malloc()\n"
        "assert alloc.tune_malloc()\n"  # a second mount in one process (tests) is fine
        "bufs = [bytes(8 << 20) for _ in range(4)]\n"  # large allocations still work
        "assert sum(map(len, bufs)) == 32 << 20\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_settings_stay_within_what_glibc_accepts() -> None:
    values = dict(alloc.SETTINGS)
    # glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
    assert values[alloc.M_MMAP_THRESHOLD] <= 32 << 20
    assert values[alloc.M_ARENA_MAX] >= 1
    # Freed buffers kept for reuse must cover a few packs, or every GET faults again.
    assert values[alloc.M_TRIM_THRESHOLD] >= 4 * (8 << 20)
