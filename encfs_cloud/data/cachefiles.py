"""The disk cache's file primitives: whole-file writes by rename, reads that tell gone from bad."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def valid_pack(pack: str) -> bool:
    """Pack ids are random hex; anything else (a forged commit naming "../x") never becomes
    a path."""
    return 0 < len(pack) <= 64 and all(c in "0123456789abcdef" for c in pack)


def pread_entry(path: Path, off: int, length: int) -> bytes | None:
    """The bytes, b"" if unreadable (a bad entry), None if the file is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        return b""
    try:
        return os.pread(fd, length, off)
    except OSError:
        return b""
    finally:
        os.close(fd)


def write_whole(
    path: Path, data: bytes | bytearray | memoryview, work: Path, stamp: int | None = None
) -> None:
    """Write to a temporary in this mount's own folder `work` and rename it in place:
    readers see whole files only, and no other mount's start or sweep can remove it."""
    tmp = work / f"{path.name}.{os.urandom(4).hex()}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if stamp is not None:  # the use order, set before the entry becomes visible
            os.utime(fd, ns=(stamp, stamp))
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
