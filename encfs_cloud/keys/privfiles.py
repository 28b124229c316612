"""Private files the way ssh keeps them: owner-only modes, no symlinks, atomic replacement."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from encfs_cloud.errors import KeyFileModeError


def read_private(path: Path) -> bytes:
    """Read a file that must be ours and mode 0600 (or stricter), like ssh does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise KeyFileModeError(
            f"cannot open {path}: {exc.strerror} (a symlink is refused)"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_uid != os.getuid():
            raise KeyFileModeError(
                f"{path} is open to others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run chmod 600 {path}"
            )
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, exclusive: bool) -> None:
    """Write to a 0600 temporary, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        if exclusive:
            os.link(tmp, path)  # fails if `path` exists: two `create`s cannot both win
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_private_dir(folder: Path) -> None:
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileModeError(f"{folder} is not a directory (a symlink is refused)")
    if st.st_mode & 0o077 or st.st_uid != os.getuid():
        raise KeyFileModeError(
            f"{folder} is open to others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run chmod 700 {folder}"
        )


def make_private_dir(folder: Path) -> None:
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
