"""A mount's own folder in the disk cache's `spill/`, held by an flock for the mount's life."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path

from encfs_cloud.keys.privfiles import make_private_dir

log = logging.getLogger(__name__)


class SpillFolder:
    """`spill/<random id>/`: this mount's spilled packs and the temporaries of its cache writes.

    Several mounts of one filesystem on one device share the cache folder, so each gets a
    folder of its own, locked (flock) while it runs: the lock goes with the process, so a
    crashed mount's folder is unlocked and the next mount to start removes it (its spilled
    packs were never named by a commit, so fsync never acknowledged them), while a running
    mount's folder is left alone. A starting mount sweeps and creates its own folder under an
    flock of `spill/` itself, so no sweeper can find a new folder before its owner locked it.
    The lock is held by the open file description: a fork (the daemon) keeps it, and closing
    the parent's copy does not release the child's.
    """

    def __init__(self, parent: Path) -> None:
        make_private_dir(parent)
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            locks = _lock(parent_fd, fcntl.LOCK_EX)  # held only while sweeping and creating
            if locks:
                sweep(parent)
            else:  # no flock there: a live mount's folder cannot be told from a dead one's
                log.warning("disk cache: %s cannot be locked; old spill folders stay", parent)
            self.path = parent / os.urandom(8).hex()
            os.mkdir(self.path, 0o700)
            self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            if locks:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(parent_fd)  # releases the sweep lock

    def close(self, *, remove: bool) -> None:
        """Give the folder up: removed first (at unmount) or left for the next sweep.

        Only closes the descriptor, never LOCK_UN: after a fork that would unlock the
        other process's copy too.
        """
        if self._fd is None:
            return
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)
        self._fd = None

    def others(self) -> bool:
        """Whether another mount's folder (live, or a crashed one not yet swept) is there."""
        try:
            return any(e.name != self.path.name for e in os.scandir(self.path.parent))
        except OSError:
            return False


def sweep(parent: Path) -> list[str]:
    """Remove the folders in `parent` whose lock nobody holds; returns their names.

    Files directly in `spill/` are an older version's spilled packs (one shared folder,
    cleared by every starting mount then): removed like a crashed mount's folder.
    """
    removed = []
    for entry in os.scandir(parent):
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(entry.name)
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile (its mount removed it at unmount)
        try:
            if not _lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                continue  # cannot tell: kept
        except BlockingIOError:
            continue  # a live mount's
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(entry.name)
        finally:
            os.close(fd)
    return removed


def _lock(fd: int, how: int) -> bool:
    """flock; False where the file system has none (some network and FUSE file systems)."""
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        raise
    except OSError:
        return False
    return True
