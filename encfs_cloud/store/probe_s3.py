"""The S3-only part of a store probe: Range, flexible checksums, versioning, the Date header."""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar

import botocore.exceptions as bce

from encfs_cloud.store.profile import HONOURED

if TYPE_CHECKING:
    from encfs_cloud.store.s3 import S3Store

T = TypeVar("T")
_TRIES = 3  # a probe's raw calls bypass the store's retry loop; a blip must not fail it


def _attempt(fn: Callable[[], T]) -> T:
    for attempt in range(1, _TRIES + 1):
        try:
            return fn()
        except bce.ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if status < 500 or attempt == _TRIES:
                raise
        except (bce.ConnectionError, bce.HTTPClientError):
            if attempt == _TRIES:
                raise
        time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def _code(exc: bce.ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def probe_s3(store: S3Store, name: str, data: bytes) -> tuple[str, str, str, float | None]:
    """(ranged GET, checksums, versioning, clock skew) of the object `name` holding `data`."""
    client, bucket, key = store.client, store.bucket, store.prefix + name
    return (
        _ranged(client, bucket, key, data),
        _checksums(client, bucket, key, data),
        _versioning(client, bucket),
        _skew(client, bucket, key),
    )


def _read(client: Any, **kwargs: Any) -> tuple[dict[str, Any], bytes]:
    def once() -> tuple[dict[str, Any], bytes]:
        resp = client.get_object(**kwargs)
        body = resp["Body"]
        try:
            return resp, body.read()
        finally:
            body.close()

    return _attempt(once)


def _ranged(client: Any, bucket: str, key: str, data: bytes) -> str:
    try:
        resp, body = _read(client, Bucket=bucket, Key=key, Range="bytes=1000-1099")
    except bce.FlexibleChecksumError:
        return "error: fails checksum validation (the store sends the whole object's checksum)"
    except (bce.BotoCoreError, bce.ClientError) as exc:
        return f"error: {exc}"
    if body == data[1000:1100] and resp.get("ContentRange"):
        return HONOURED
    if body == data:
        return "whole object returned"
    return "wrong bytes"


def _checksums(client: Any, bucket: str, key: str, data: bytes) -> str:
    """How the store treats CRC32 checksums sent on upload and asked for on download."""
    try:
        _attempt(
            lambda: client.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="CRC32")
        )
    except bce.ClientError as exc:
        return f"rejected on upload ({_code(exc)})"
    except bce.BotoCoreError as exc:
        return f"error: {exc}"
    try:
        resp, _ = _read(client, Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except bce.FlexibleChecksumError:
        return "wrong checksum returned"
    except (bce.BotoCoreError, bce.ClientError) as exc:
        return f"error: {exc}"
    if not any(k.startswith("Checksum") and k != "ChecksumType" for k in resp):
        return "not returned"
    try:
        _read(client, Bucket=bucket, Key=key, Range="bytes=1000-1099", ChecksumMode="ENABLED")
    except bce.FlexibleChecksumError:
        return "whole-object checksum sent with ranged GET"
    except (bce.BotoCoreError, bce.ClientError) as exc:
        return f"error: {exc}"
    return "validated"


def _versioning(client: Any, bucket: str) -> str:
    try:
        status = _attempt(lambda: client.get_bucket_versioning(Bucket=bucket)).get("Status")
    except bce.ClientError as exc:
        return f"unknown ({_code(exc)})"
    except bce.BotoCoreError as exc:
        return f"unknown ({type(exc).__name__})"
    return {"Enabled": "enabled", "Suspended": "suspended"}.get(str(status), "off")


def _skew(client: Any, bucket: str, key: str) -> float | None:
    """The store's clock minus ours, from the Date header of a HEAD (1 s resolution)."""
    try:
        before = time.time()
        resp = _attempt(lambda: client.head_object(Bucket=bucket, Key=key))
        after = time.time()
    except (bce.BotoCoreError, bce.ClientError):
        return None
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        return None
    try:
        server = parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None
    # The header is truncated to the second: compare with the half-second-corrected midpoint.
    return round(server + 0.5 - (before + after) / 2, 1)
