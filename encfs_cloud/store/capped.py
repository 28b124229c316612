"""Whole-object reads with a size cap: an oversize object is refused before it is in memory."""

from __future__ import annotations

from encfs_cloud.errors import IntegrityError
from encfs_cloud.store.base import ObjectStore


def _check(name: str, data: bytes, cap: int) -> bytes:
    if len(data) > cap:
        raise IntegrityError(
            f"object {name} is larger than the {cap} bytes its format allows: the bucket was"
            " tampered with (or is not an encfs-cloud filesystem)"
        )
    return data


def read_capped(store: ObjectStore, name: str, cap: int) -> bytes:
    """The whole object, reading at most `cap` + 1 bytes; IntegrityError if it is larger."""
    return _check(name, store.get(name, 0, cap + 1), cap)


def read_capped_with_etag(store: ObjectStore, name: str, cap: int) -> tuple[bytes, str]:
    data, etag = store.get_with_etag(name, cap + 1)
    return _check(name, data, cap), etag
