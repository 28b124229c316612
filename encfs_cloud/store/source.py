"""Open a SOURCE URL (s3://, file://, memory://) as the `ObjectStore` it names."""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

from encfs_cloud.errors import BadSourceError
from encfs_cloud.store.base import ObjectStore, StoreOptions, check_name

_EXAMPLES = "use s3://bucket[/prefix], file:///absolute/folder or memory://name"
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_MEMORY_RE = re.compile(r"[A-Za-z0-9._-]+")


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
