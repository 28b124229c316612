"""Unmount as the user sees it: detach, then wait while the daemon flushes, showing progress."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from encfs_cloud.daemon.control import FlushProgress
from encfs_cloud.daemon.runtime import daemon_pid, fusermount, pid_alive
from encfs_cloud.errors import EncfsCloudError, MountpointError


def unmount(mountpoint: Path, timeout: float | None = None) -> None:
    """Unmount and wait until the daemon has put everything in the bucket and exited."""
    mountpoint = mountpoint.absolute()
    pid = daemon_pid(mountpoint)
    if not os.path.ismount(mountpoint):
        raise MountpointError(f"{mountpoint} is not mounted")
    done = fusermount(mountpoint)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        if "busy" in reason.lower():
            raise MountpointError(f"{mountpoint} is busy: close the files and shells using it")
        raise EncfsCloudError(f"could not unmount {mountpoint}: {reason}")
    if pid is None:
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    progress = FlushProgress(mountpoint, sys.stderr)
    try:
        while pid_alive(pid):
            if deadline is not None and time.monotonic() > deadline:
                raise EncfsCloudError(
                    f"the daemon (pid {pid}) is still flushing; it will finish alone"
                )
            progress.tick()
            time.sleep(0.05)
    finally:
        progress.done()
