"""Unmount as the user sees it: detach, then wait while the daemon flushes, showing progress."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from encfs_cloud.daemon.runtime import daemon_pid, fusermount, pid_alive, take_outcome
from encfs_cloud.errors import (
    ChangesSpooledError,
    EncfsCloudError,
    Interrupted,
    MountpointError,
    StoreError,
)


def unmount(
    mountpoint: Path,
    timeout: float | None = None,
    on_wait: Callable[[], None] | None = None,
) -> None:
    """Unmount and wait until the daemon has put everything in the bucket and exited.

    `on_wait` is called about every 50 ms while waiting (the command's progress line).

    Returns only if every change reached the bucket; otherwise raises with what happened
    to them (kept in the local spool, discarded after losing the lease, or an error).
    """
    mountpoint = mountpoint.absolute()
    pid = daemon_pid(mountpoint)
    if not os.path.ismount(mountpoint):
        raise MountpointError(f"{mountpoint} is not mounted")
    try:
        done = fusermount(mountpoint)
    except KeyboardInterrupt:
        # fusermount may already have detached the mount when the signal came.
        if os.path.ismount(mountpoint) or pid is None:
            raise
        raise _goes_on(mountpoint, pid) from None
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        if "busy" in reason.lower():
            raise MountpointError(f"{mountpoint} is busy: close the files and shells using it")
        raise EncfsCloudError(f"could not unmount {mountpoint}: {reason}")
    if pid is None:
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while pid_alive(pid):
            if deadline is not None and time.monotonic() > deadline:
                raise EncfsCloudError(
                    f"the daemon (pid {pid}) is still flushing; it will finish alone"
                )
            if on_wait is not None:
                on_wait()
            time.sleep(0.05)
    except KeyboardInterrupt:
        raise _goes_on(mountpoint, pid) from None
    _check_outcome(mountpoint, pid)


def _goes_on(mountpoint: Path, pid: int) -> Interrupted:
    return Interrupted(
        f"interrupted: {mountpoint} is unmounted, but the daemon (pid {pid}) goes on "
        "uploading the last changes in the background; its log says when it is done"
    )


def _check_outcome(mountpoint: Path, pid: int) -> None:
    """Turn the verdict the daemon left into success or the error that describes it."""
    outcome = take_outcome(mountpoint, pid)
    if outcome is None:
        raise EncfsCloudError(
            f"the daemon (pid {pid}) exited without saying whether every change reached the "
            "bucket; see its log"
        )
    result = outcome.get("result")
    if result == "ok":
        return
    if result == "spooled":
        size = int(str(outcome.get("bytes", 0)))
        raise ChangesSpooledError(
            f"the store did not take the last changes: {_size(size)} kept sealed in "
            f"{outcome.get('spool')}; the next mount on this device uploads them"
        )
    raise StoreError(
        f"the last changes may not be in the bucket: {outcome.get('error', 'unknown error')}"
    )


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"
