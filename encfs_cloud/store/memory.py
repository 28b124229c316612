"""A thread-safe in-memory `ObjectStore`, with process-wide named instances for memory:// URLs."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

from encfs_cloud.errors import ObjectMissingError, PreconditionFailedError
from encfs_cloud.store.base import ObjectInfo, check_name

_named: dict[str, MemoryStore] = {}
_named_lock = threading.Lock()


def etag_of(data: bytes) -> str:
    """The etag the memory and local backends use: what S3 would be if it used BLAKE2b."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def named_memory_store(name: str) -> MemoryStore:
    """The store behind memory://name; every open of one name in a process shares its data."""
    with _named_lock:
        store = _named.get(name)
        if store is None:
            store = _named[name] = MemoryStore(f"memory://{name}")
        return store


def check_range(start: int, length: int | None) -> None:
    if start < 0 or (length is not None and length < 0):
        raise ValueError(f"bad range start={start} length={length}")


class MemoryStore:
    """Objects in a dict under one lock; the reference implementation of the contract."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._objects: dict[str, tuple[bytes, str]] = {}

    def _entry(self, name: str) -> tuple[bytes, str]:
        check_name(name)
        with self._lock:
            entry = self._objects.get(name)
        if entry is None:
            raise ObjectMissingError(f"{self.url}: object {name} is missing")
        return entry

    def get(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        check_range(start, length)
        data = self._entry(name)[0]
        if start == 0 and length is None:
            return data
        return data[start : None if length is None else start + length]

    def get_with_etag(self, name: str, limit: int | None = None) -> tuple[bytes, str]:
        data, etag = self._entry(name)
        return (data if limit is None else data[:limit]), etag

    def put(
        self,
        name: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        check_name(name)
        if if_none_match and if_match is not None:
            raise ValueError("if_none_match and if_match are mutually exclusive")
        data = bytes(data)  # a caller's bytearray must not change what we stored
        etag = etag_of(data)
        with self._lock:
            current = self._objects.get(name)
            if if_none_match and current is not None:
                raise PreconditionFailedError(f"{self.url}: {name} already exists")
            if if_match is not None and (current is None or current[1] != if_match):
                raise PreconditionFailedError(f"{self.url}: {name} changed since it was read")
            self._objects[name] = (data, etag)
        return etag

    def delete(self, name: str) -> None:
        check_name(name)
        with self._lock:
            self._objects.pop(name, None)

    def head(self, name: str) -> ObjectInfo | None:
        check_name(name)
        with self._lock:
            entry = self._objects.get(name)
        return None if entry is None else ObjectInfo(name, len(entry[0]), entry[1])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # A snapshot, so callers may put or delete while they iterate.
        with self._lock:
            found = [(n, len(d), e) for n, (d, e) in self._objects.items() if n.startswith(prefix)]
        for name, size, etag in sorted(found):
            yield ObjectInfo(name, size, etag)

    def close(self) -> None:
        # Named stores outlive a close on purpose: a remount opens the same name again.
        pass
