"""Where disk caches live: the default folder and budget, and the folders `wipe` removes."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

FOLDERS_FILE = "cache-folders"  # in the device folder: cache_dir= folders used
DEFAULT_MAX = 1 << 30  # the default budget: 1 GiB or a tenth of the free space, the smaller


def default_folder(fs_id: bytes) -> Path:
    """`$XDG_CACHE_HOME/encfs-cloud/<fs id hex>` (XDG's default: ~/.cache)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "encfs-cloud" / fs_id.hex()


def default_size(folder: Path) -> int:
    """1 GiB, or a tenth of the free space where the cache lives if that is less."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return DEFAULT_MAX
    return min(DEFAULT_MAX, free // 10)


def remember(device_folder: Path, folder: Path) -> None:
    """Note a cache folder given with `cache_dir=` in the device folder, so `wipe` finds it."""
    record = device_folder / FOLDERS_FILE
    known = set(record.read_text().splitlines()) if record.is_file() else set()
    if str(folder) in known or not device_folder.is_dir():
        return
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{folder}\n")


def remove_all(device_folder: Path, fs_id: bytes) -> list[Path]:
    """Delete the default cache folder and every one `remember` noted; returns those removed.

    They hold only ciphertext, so unlike the device key they need no overwrite.
    """
    record = device_folder / FOLDERS_FILE
    folders = [default_folder(fs_id)]
    if record.is_file():
        folders += [Path(line) for line in record.read_text().splitlines() if line]
    removed = []
    for folder in folders:
        # Only folders named after the filesystem: never one the user named in cache_dir=.
        if folder.name == fs_id.hex() and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    with contextlib.suppress(OSError):  # like the device folder's root: gone once empty
        default_folder(fs_id).parent.rmdir()
    return removed
