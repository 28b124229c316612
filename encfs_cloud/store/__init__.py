"""Object-store backends: open a SOURCE URL (s3://, file://, memory://) as an `ObjectStore`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from encfs_cloud.errors import BadSourceError
from encfs_cloud.store.base import ObjectInfo, ObjectStore

__all__ = ["ObjectInfo", "ObjectStore", "StoreOptions", "check_name", "open_store"]

_EXAMPLES = "use s3://bucket[/prefix], file:///absolute/folder or memory://name"
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_MEMORY_RE = re.compile(r"[A-Za-z0-9._-]+")


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


def open_store(source: str, options: StoreOptions | None = None) -> ObjectStore:
    """The store a SOURCE URL names; raises `BadSourceError` for anything unparseable."""
    options = options or StoreOptions()
    scheme, sep, _ = source.partition("://")
    if not sep:
        raise BadSourceError(f"SOURCE {source!r} is not a URL: {_EXAMPLES}")
    scheme = scheme.lower()
    if scheme == "file":
        return _open_file(source)
    if scheme == "s3":
        return _open_s3(source, options)
    if scheme == "memory":
        name = source[len("memory://") :]
        if not _MEMORY_RE.fullmatch(name):
            raise BadSourceError(
                f"memory:// needs a name of letters, digits, '.', '_', '-': {source!r}"
            )
        from encfs_cloud.store.memory import named_memory_store

        return named_memory_store(name)
    raise BadSourceError(f"unknown SOURCE scheme {scheme!r}: {_EXAMPLES}")


def _open_file(source: str) -> ObjectStore:
    parts = urlsplit(source)
    if parts.netloc not in ("", "localhost"):
        raise BadSourceError(
            f"file:// needs an absolute path (three slashes, like file:///srv/vault): {source!r}"
        )
    if parts.query or parts.fragment:
        raise BadSourceError(f"file:// URLs take no '?' or '#' parts: {source!r}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise BadSourceError(f"file:// needs an absolute path, like file:///srv/vault: {source!r}")
    from encfs_cloud.store.local import LocalStore

    return LocalStore(os.path.normpath(path))


def _open_s3(source: str, options: StoreOptions) -> ObjectStore:
    parts = urlsplit(source)
    bucket = parts.netloc
    if not _BUCKET_RE.fullmatch(bucket):
        raise BadSourceError(f"s3:// needs a bucket name, like s3://my-bucket/prefix: {source!r}")
    if parts.query or parts.fragment:
        raise BadSourceError(f"s3:// URLs take no '?' or '#' parts: {source!r}")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_name(prefix)
        except ValueError:
            raise BadSourceError(
                f"the prefix in {source!r} has an empty, '.'- or '..'-starting part"
            ) from None
        prefix += "/"
    from encfs_cloud.store.s3 import S3Store

    return S3Store(bucket, prefix, options)
