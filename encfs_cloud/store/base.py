"""The ObjectStore protocol (blocking calls, run in worker threads), its options, the name rule."""

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

    def get_with_etag(self, name: str, limit: int | None = None) -> tuple[bytes, str]:
        """The object's bytes and etag; with `limit`, at most its first `limit` bytes."""
        ...

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


@dataclass(frozen=True)
class StoreOptions:
    """Connection settings; `None` means "whatever the standard AWS chain says"."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    path_style: bool | None = None  # None: path style for any endpoint that is not AWS
    access_key: str | None = None
    secret_key: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 6
    max_pool: int = 32
    # No new attempt starts once this many seconds have passed since the first one.
    deadline: float = 120.0
    # First backoff step in seconds; it doubles per attempt (full jitter), capped at 10 s.
    backoff_base: float = 0.2


def check_name(name: str) -> None:
    """Refuse object names that would not map safely onto a folder tree.

    Every backend applies the same rule, so a bucket can be copied to a folder and back:
    '/'-separated, no empty, '.' or '..' parts, no part starting with '.' (hidden files are
    the local backend's temp and lock files), no NUL.
    """
    if not name or "\0" in name:
        raise ValueError(f"invalid object name {name!r}")
    for part in name.split("/"):
        if not part or part.startswith("."):
            raise ValueError(f"invalid object name {name!r}")
