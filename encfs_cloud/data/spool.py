"""The local spool: sealed objects an unmount could not upload, sent by the next mount."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from encfs_cloud.errors import PreconditionFailedError
from encfs_cloud.keys.privfiles import make_private_dir
from encfs_cloud.store.base import ObjectStore

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"


def save(device_folder: Path, objects: list[tuple[str, bytes | bytearray]]) -> None:
    """Write sealed objects (ciphertext only) in upload order, each durable before the next.

    File names carry the order and the object name, so upload() replays them exactly.
    """
    folder = device_folder / SPOOL_DIR
    make_private_dir(folder)
    start = len(list(folder.iterdir()))
    for n, (name, data) in enumerate(objects, start):
        path = folder / f"{n:08d}-{name.replace('/', '@')}"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:  # write() loops over short writes; ENOSPC raises
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    log.warning("%d sealed objects kept in the local spool for the next mount", len(objects))


def commits(device_folder: Path) -> list[tuple[str, bytes]]:
    """The metadata commits waiting in the spool (name, sealed bytes), oldest first."""
    folder = device_folder / SPOOL_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(p for p in folder.iterdir() if not p.name.endswith(".tmp")):
        name = path.name.split("-", 1)[1].replace("@", "/")
        if name.startswith("meta/"):
            found.append((name, path.read_bytes()))
    return found


def upload(device_folder: Path, store: ObjectStore) -> list[tuple[str, bytes]]:
    """Send what an earlier unmount spooled, in order, then forget it.

    A commit that already exists with the same bytes counts as sent (an upload that landed
    before its reply was lost). One that exists with other bytes means another writer went
    on meanwhile: that commit and the ones after it are returned, in order, still spooled,
    for the mount to merge (see `forget`); everything before them was sent.
    """
    folder = device_folder / SPOOL_DIR
    if not folder.is_dir():
        return []
    entries = sorted(p for p in folder.iterdir() if not p.name.endswith(".tmp"))
    for n, path in enumerate(entries):
        name = path.name.split("-", 1)[1].replace("@", "/")
        data = path.read_bytes()
        if name.startswith("meta/"):
            try:
                store.put(name, data, if_none_match=True)
            except PreconditionFailedError:
                if store.get(name) != data:
                    later = [p for p in entries[n:] if p.name.split("-", 1)[1].startswith("meta@")]
                    log.warning(
                        "%d spooled commits follow another writer's: they are merged", len(later)
                    )
                    return [
                        (p.name.split("-", 1)[1].replace("@", "/"), p.read_bytes()) for p in later
                    ]
        else:
            store.put(name, data)
        path.unlink()
    forget(device_folder)
    if entries:
        log.info("uploaded %d spooled objects", len(entries))
    return []


def forget(device_folder: Path) -> None:
    """Remove the spool (once what it held is in the bucket, or merged and committed)."""
    folder = device_folder / SPOOL_DIR
    if not folder.is_dir():
        return
    for leftover in folder.iterdir():
        leftover.unlink()
    folder.rmdir()
