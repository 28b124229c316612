"""The S3 backend over boto3: one retry budget, verified ranged reads, errors users can act on."""

from __future__ import annotations

import functools
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit

import botocore.exceptions as bce
import botocore.loaders
import botocore.session
from botocore.config import Config

from encfs_cloud.errors import (
    CredentialsError,
    EncfsCloudError,
    NoFilesystemError,
    ObjectMissingError,
    PreconditionFailedError,
    TransientStoreError,
    UnreachableError,
)
from encfs_cloud.store import watchdog
from encfs_cloud.store.base import ObjectInfo, StoreOptions, check_name
from encfs_cloud.store.budget import budget_deadline, read_deadline
from encfs_cloud.store.memory import check_range
from encfs_cloud.store.s3errors import (
    CREDENTIAL_EXC,
    MISSING_CODES,
    NO_CREDENTIALS,
    RETRYABLE_EXC,
    ShortBody,
    client_error,
    error_code,
    is_precondition,
    one_line,
    retry_after,
    status,
    untrusted_certificate,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
T = TypeVar("T")
_sleep: Callable[[float], None] = time.sleep  # a seam, so tests can see the backoff chosen
# One model loader for every store: parsing the S3 service model costs ~0.1 s per session.
_LOADER = botocore.loaders.create_loader()

_BACKOFF_CAP = 10.0
_RETRY_AFTER_CAP = 30.0  # a server asking for minutes is treated as down, not obeyed
_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _is_aws(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


class S3Store:
    """Objects under `prefix` in one bucket, through one thread-safe boto3 client.

    botocore's own retries are switched off (standard mode, one attempt): nested retry
    layers multiply (6 x 6 attempts), and botocore neither honours Retry-After nor keeps a
    total deadline. `_call` is the single budget: `max_attempts` tries, exponential backoff
    with full jitter, each attempt and the whole call bounded by a deadline that the
    watchdog enforces by aborting the socket, and never past the caller's
    `operation_budget`.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        options: StoreOptions | None = None,
        *,
        page_size: int = 1000,
    ) -> None:
        self._opt = options or StoreOptions()
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}"
        self._page_size = page_size
        self._client = self._make_client()
        self.endpoint: str = self._client.meta.endpoint_url
        self._bucket_seen = False  # a 404 on HEAD cannot tell a missing key from a bucket

    def _make_client(self) -> S3Client:
        o = self._opt
        if (o.access_key is None) != (o.secret_key is None):
            raise CredentialsError("give both an access key and a secret key, or neither")
        # A botocore session rather than a boto3 one: boto3 would append its data path to
        # the shared loader on every open. The client is the same object either way.
        session = botocore.session.Session(profile=o.profile)
        session.register_component("data_loader", _LOADER)
        if o.access_key is not None and o.secret_key is not None:
            session.set_credentials(o.access_key, o.secret_key)

        def build(style: str | None) -> S3Client:
            s3_config: Any = {"addressing_style": style} if style else None
            config = Config(
                connect_timeout=o.connect_timeout,
                read_timeout=o.read_timeout,
                max_pool_connections=o.max_pool,
                retries={"mode": "standard", "total_max_attempts": 1},
                # Our AEAD authenticates every byte; botocore's CRC trailers and whole-object
                # checks of ranged GETs only break stores that mangle or lack them.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3=s3_config,
                user_agent_extra="encfs-cloud",
            )
            client = session.create_client(
                "s3",
                endpoint_url=o.endpoint_url,
                region_name=o.region or session.get_config_variable("region") or "us-east-1",
                config=config,
            )
            watchdog.install(client)
            return cast("S3Client", client)

        try:
            if o.path_style is not None:
                return build("path" if o.path_style else "virtual")
            # The endpoint may come from options, AWS_ENDPOINT_URL or ~/.aws/config; only
            # the client knows which won, so build once, look, and rebuild for a non-AWS
            # host, whose DNS rarely resolves bucket.host names.
            client = build(None)
            return client if _is_aws(client.meta.endpoint_url) else build("path")
        except bce.ProfileNotFound:
            raise CredentialsError(
                f"AWS profile {o.profile!r} is not in ~/.aws/config: check the profile name"
            ) from None

    @property
    def client(self) -> S3Client:
        """The boto3 client, for probes of what the ObjectStore protocol does not cover."""
        return self._client

    def _key(self, name: str) -> str:
        check_name(name)
        return self.prefix + name

    # --- the retry loop and error mapping ------------------------------------------------

    def _call(self, op: str, name: str, fn: Callable[[], T], nbytes: int = 0) -> T:
        o = self._opt
        allowance = nbytes / watchdog.MIN_RATE
        cap = read_deadline() if op == "get" else budget_deadline()
        with watchdog.Operation(self.url, o.max_attempts, o.deadline + allowance, cap) as ticket:
            if ticket.left() <= 0:
                # The caller's budget is spent: fail now rather than send what must be cut.
                raise TransientStoreError(f"{op} {name} on {self.url}: no time left to try")
            attempt = 0
            while True:
                attempt += 1
                ticket.begin(attempt, o.connect_timeout + o.read_timeout + allowance)
                try:
                    result = fn()
                    if not ticket.overdue:
                        return result
                    # Headers cut by the watchdog can parse as a short, valid-looking answer.
                    last: BaseException = ShortBody("the answer was cut at the deadline")
                except bce.NoCredentialsError:
                    raise CredentialsError(NO_CREDENTIALS) from None
                except CREDENTIAL_EXC as exc:
                    raise CredentialsError(
                        f"cannot load AWS credentials ({one_line(exc)}): check AWS_ACCESS_KEY_ID"
                        " / AWS_SECRET_ACCESS_KEY or the AWS profile (AWS_PROFILE)"
                    ) from None
                except bce.ClientError as exc:
                    ticket.heard()
                    final = client_error(exc, f"{op} {name}", self.bucket, self.endpoint, self.url)
                    if final is not None:
                        raise final from exc
                    last = exc
                except RETRYABLE_EXC as exc:
                    if (untrusted := untrusted_certificate(exc, self.endpoint)) is not None:
                        raise untrusted from None
                    last = exc
                finally:
                    ticket.finish()
                delay = random.uniform(0, min(_BACKOFF_CAP, o.backoff_base * 2 ** (attempt - 1)))
                hint = retry_after(last)
                if hint is not None:
                    delay = max(delay, min(hint, _RETRY_AFTER_CAP))
                if attempt >= o.max_attempts or delay >= ticket.left():
                    raise self._exhausted(op, name, last, ticket) from last
                log.debug("%s %s: %s; retry %d in %.2fs", op, name, one_line(last), attempt, delay)
                _sleep(delay)

    def _exhausted(
        self, op: str, name: str, last: BaseException, ticket: watchdog.Operation
    ) -> EncfsCloudError:
        took = time.monotonic() - ticket.began
        cause = "no complete answer in time" if ticket.overdue else one_line(last)
        if isinstance(last, bce.ConnectionError) and not ticket.answered:
            return UnreachableError(
                f"cannot reach the S3 endpoint {self.endpoint} ({cause}): check the"
                " endpoint URL (AWS_ENDPOINT_URL) and the network"
            )
        if not ticket.answered:
            # Connections were accepted but nothing came back: as unusable as a dead host.
            return UnreachableError(
                f"the S3 endpoint {self.endpoint} did not answer {op} {name} ({ticket.attempt}"
                f" attempts in {took:.0f} s, {cause}): check the endpoint URL and the network"
            )
        return TransientStoreError(
            f"{op} {name} on {self.url} still failing after {ticket.attempt} attempts in"
            f" {took:.0f} s: {cause}"
        )

    # --- the ObjectStore protocol --------------------------------------------------------

    def get(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        check_range(start, length)
        key = self._key(name)
        if length == 0:
            # "bytes=s-(s-1)" is not a valid range, and S3 answers an invalid range with the
            # whole object; so ask whether it exists instead.
            if self.head(name) is None:
                raise ObjectMissingError(f"object {name} is missing from {self.url}")
            return b""
        if start == 0 and length is None:
            return self._call("get", name, lambda: self._get_once(key, None))[0]
        return self._call("get", name, lambda: self._get_once(key, (start, length)))[0]

    def get_with_etag(self, name: str, limit: int | None = None) -> tuple[bytes, str]:
        key = self._key(name)
        # A ranged GET still carries the whole object's ETag.
        want = None if limit is None else (0, limit)
        return self._call("get", name, lambda: self._get_once(key, want))

    def _get_once(self, key: str, want: tuple[int, int | None] | None) -> tuple[bytes, str]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if want is not None:
            start, length = want
            end = "" if length is None else str(start + length - 1)
            kwargs["Range"] = f"bytes={start}-{end}"
        try:
            resp = self._client.get_object(**kwargs)
        except bce.ClientError as exc:
            if want is not None and error_code(exc) == "InvalidRange":
                return b"", ""  # the range starts at or past the end: nothing there
            raise
        ticket = watchdog.current()
        declared = resp.get("ContentLength")
        if ticket is not None:
            if ticket.overdue:
                raise ShortBody("the answer was cut at the deadline")
            ticket.heard()
            ticket.allow(declared or 0)
        body = resp["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        if declared is not None and len(data) != declared:
            raise ShortBody(f"read {len(data)} of {declared} bytes")
        if want is not None:
            data = self._check_range(data, resp.get("ContentRange"), *want)
        self._bucket_seen = True
        log.debug("get %s (%d bytes)", key, len(data))
        return data, resp.get("ETag", "")

    @staticmethod
    def _check_range(
        data: bytes, content_range: str | None, start: int, length: int | None
    ) -> bytes:
        """Exactly the bytes asked for, or `ShortBody` if the response cannot be them."""
        if content_range is None:
            # A 200 with the whole object: the server ignored Range, which HTTP allows.
            return data[start : None if length is None else start + length]
        m = _RANGE_RE.fullmatch(content_range.strip())
        if m is None:
            raise ShortBody(f"unparseable Content-Range {content_range!r}")
        first, last, total = int(m[1]), int(m[2]), m[3]
        reaches_end = total != "*" and last == int(total) - 1
        if first != start or len(data) != last - first + 1:
            raise ShortBody(f"Content-Range {content_range} for {len(data)} bytes from {start}")
        if length is not None and len(data) != length and not reaches_end:
            raise ShortBody(f"{len(data)} of {length} bytes and not at the end")
        if length is None and not reaches_end and total != "*":
            raise ShortBody(f"Content-Range {content_range} stops before the end")
        return data

    def put(
        self,
        name: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        key = self._key(name)
        if if_none_match and if_match is not None:
            raise ValueError("if_none_match and if_match are mutually exclusive")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": bytes(data)}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        tries = 0

        def attempt() -> str:
            nonlocal tries
            tries += 1
            try:
                return str(self._client.put_object(**kwargs)["ETag"])
            except bce.ClientError as exc:
                # A lost reply: an earlier attempt whose answer never came may have landed;
                # then we lose to our own write. A create-if-absent checks this even on its
                # first try, since the caller may be repeating a call whose reply was lost
                # (sealed objects carry random nonces: the same bytes can only be ours). An
                # if-match write does not: equal bytes from a rival (ABA) would hide a lost
                # update.
                if (if_none_match or (if_match is not None and tries > 1)) and is_precondition(exc):
                    ours = self._etag_if_ours(key, data)
                    if ours is not None:
                        return ours
                if if_match is not None and error_code(exc) in MISSING_CODES:
                    raise PreconditionFailedError(f"put {name}: it no longer exists") from None
                raise

        etag = self._call("put", name, attempt, len(data))
        self._bucket_seen = True
        log.debug("put %s (%d bytes)", name, len(data))
        return etag

    def _etag_if_ours(self, key: str, data: bytes) -> str | None:
        """The object's etag if it holds exactly `data`.

        Compared by content, not by taking the etag for an MD5: with SSE-KMS, SSE-C or a
        multipart copy it is not one. At most len(data) + 1 bytes are read.
        """
        try:
            got, etag = self._get_once(key, (0, len(data) + 1))
        except (bce.BotoCoreError, bce.ClientError, ShortBody):
            return None
        return etag if got == bytes(data) else None

    def delete(self, name: str) -> None:
        key = self._key(name)
        self._call("delete", name, lambda: self._client.delete_object(Bucket=self.bucket, Key=key))
        log.debug("delete %s", name)

    def head(self, name: str) -> ObjectInfo | None:
        key = self._key(name)

        def attempt() -> ObjectInfo | None:
            try:
                resp = self._client.head_object(Bucket=self.bucket, Key=key)
            except bce.ClientError as exc:
                if status(exc) == 404:
                    return None
                raise
            return ObjectInfo(name, int(resp["ContentLength"]), str(resp["ETag"]))

        info = self._call("head", name, attempt)
        if info is not None:
            self._bucket_seen = True
        elif not self._bucket_seen:
            self._check_bucket()
        return info

    def _check_bucket(self) -> None:
        def attempt() -> None:
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except bce.ClientError as exc:
                if status(exc) == 404:
                    raise NoFilesystemError(
                        f"bucket {self.bucket} does not exist at {self.endpoint}"
                    ) from None
                raise

        self._call("head", self.bucket, attempt)
        self._bucket_seen = True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Pages are fetched by hand rather than with a boto3 paginator so that each page
        # goes through the retry loop; a paginator's iterator is dead after one error.
        cut = len(self.prefix)
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": self.prefix + prefix,
                "MaxKeys": self._page_size,
            }
            if token is not None:
                kwargs["ContinuationToken"] = token
            page = self._call(
                "list", prefix or "/", functools.partial(self._client.list_objects_v2, **kwargs)
            )
            self._bucket_seen = True
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][cut:], int(obj["Size"]), str(obj["ETag"]))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or token is None:
                return

    def close(self) -> None:
        self._client.close()
