"""Probe a store on scratch objects under its prefix: what it enforces, and how it answers."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime

from encfs_cloud.errors import (
    CredentialsError,
    NoFilesystemError,
    PreconditionFailedError,
    StoreError,
    UnreachableError,
)
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.profile import ENFORCED, HONOURED, IGNORED, NOT_APPLICABLE, StoreProfile

log = logging.getLogger(__name__)

# Scratch objects live here for the seconds a probe takes. A probe killed midway leaves up to
# two 4 KiB objects of random bytes that nothing reads; no probe deletes another's, since two
# devices may probe at once.
PROBE_PREFIX = "probe/"
_WRONG_ETAG = '"' + "0" * 32 + '"'
# Setup problems end the probe: nothing it found would be true.
_FATAL = (CredentialsError, UnreachableError, NoFilesystemError)


def _refused(write: Callable[[], object]) -> str:
    """ENFORCED if the conditional write lost, IGNORED if it went through, else the error."""
    try:
        write()
    except PreconditionFailedError:
        return ENFORCED
    except _FATAL:
        raise
    except StoreError as exc:
        return f"error: {exc}"
    return IGNORED


def _accepted(write: Callable[[], object], found: str, what: str) -> str:
    """`found`, unless a conditional write that must succeed was refused too."""
    try:
        write()
    except _FATAL:
        raise
    except StoreError as exc:
        return f"error: {what} refused ({exc})"
    return found


def probe_store(store: ObjectStore) -> StoreProfile:
    """Write, overwrite and read scratch objects, then delete them; never touches others."""
    base = f"{PROBE_PREFIX}{os.urandom(8).hex()}"
    first, fresh = f"{base}-a", f"{base}-b"
    # The refused create sends other bytes: a store takes a create-if-absent that finds its
    # own bytes for a lost reply of ours (store/s3.py), which would hide an ignored condition.
    # Then the same bytes again, so a write the store wrongly let through changes nothing
    # that a later step reads.
    data, other = os.urandom(4096), os.urandom(4096)
    written: list[str] = []
    try:
        store.put(first, data)
        written.append(first)
        if_none_match = _refused(lambda: store.put(first, other, if_none_match=True))
        if if_none_match == IGNORED:
            store.put(first, data)
        if_match = _refused(lambda: store.put(first, data, if_match=_WRONG_ETAG))
        written.append(fresh)
        if_none_match = _accepted(
            lambda: store.put(fresh, data, if_none_match=True), if_none_match, "a new object"
        )
        info = store.head(first)
        current = info.etag if info is not None else _WRONG_ETAG
        if_match = _accepted(
            lambda: store.put(first, data, if_match=current), if_match, "the current etag"
        )
        endpoint: str | None = None
        if store.url.startswith("s3://"):
            from encfs_cloud.store.probe_s3 import probe_s3
            from encfs_cloud.store.s3 import S3Store

            raw = store
            while not isinstance(raw, S3Store):  # wrappers (watching, fencing) keep `inner`
                raw = raw.inner  # type: ignore[attr-defined]
            endpoint = raw.endpoint
            ranged, checksums, versioning, skew = probe_s3(raw, first, data)
        else:
            ranged = _ranged_generic(store, first, data)
            checksums, versioning, skew = NOT_APPLICABLE, NOT_APPLICABLE, None
    finally:
        for name in written:
            with contextlib.suppress(StoreError):
                store.delete(name)
    profile = StoreProfile(
        store=store.url,
        endpoint=endpoint,
        probed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        if_none_match=if_none_match,
        if_match=if_match,
        ranged_get=ranged,
        checksums=checksums,
        versioning=versioning,
        clock_skew=skew,
    )
    log.info("store profile of %s: %s", store.url, profile.summary())
    return profile


def _ranged_generic(store: ObjectStore, name: str, data: bytes) -> str:
    try:
        got = store.get(name, 1000, 100)
    except _FATAL:
        raise
    except StoreError as exc:
        return f"error: {exc}"
    return HONOURED if got == data[1000:1100] else "wrong bytes"
