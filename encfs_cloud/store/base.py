"""The ObjectStore protocol every backend implements; blocking calls, run in worker threads."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    etag: str


class ObjectStore(Protocol):
    """A flat namespace of immutable-ish objects.

    Every call blocks; callers on the trio thread go through `trio.to_thread`. Implementations
    must be safe to call from many threads at once. Errors are the `StoreError` family from
    `encfs_cloud.errors`: `ObjectMissingError` for a missing object, `PreconditionFailedError`
    when a conditional write loses, `TransientStoreError` once retries are exhausted,
    `CredentialsError` / `UnreachableError` for setup problems.
    """

    url: str

    def get(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or `length` bytes from `start` (a ranged GET)."""
        ...

    def get_with_etag(self, name: str) -> tuple[bytes, str]: ...

    def put(
        self,
        name: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Store `data` under `name`, returning the new etag.

        `if_none_match` makes the write fail if the object exists; `if_match` makes it fail
        unless the current etag is that value. Both raise `PreconditionFailedError`.
        """
        ...

    def delete(self, name: str) -> None:
        """Remove `name`; removing a missing object is not an error."""
        ...

    def head(self, name: str) -> ObjectInfo | None: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose name starts with `prefix`, in name order."""
        ...

    def close(self) -> None: ...
