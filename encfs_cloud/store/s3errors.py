"""How S3 failures map onto our errors: which codes are final, which are worth repeating."""

from __future__ import annotations

import http.client

import botocore.exceptions as bce
import urllib3.exceptions

from encfs_cloud.errors import (
    CredentialsError,
    EncfsCloudError,
    NoFilesystemError,
    ObjectMissingError,
    PreconditionFailedError,
    StoreError,
    UnreachableError,
)

PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412"}
MISSING_CODES = {"NoSuchKey", "NotFound", "404"}
_RETRY_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
}
_CREDENTIAL_HINTS = {
    "InvalidAccessKeyId": "the endpoint does not know this access key: check AWS_ACCESS_KEY_ID"
    " or the AWS profile (AWS_PROFILE)",
    "SignatureDoesNotMatch": "the secret key does not match the access key: check"
    " AWS_SECRET_ACCESS_KEY or the AWS profile (AWS_PROFILE)",
    "ExpiredToken": "the session token has expired: refresh AWS_SESSION_TOKEN or log in again",
    "InvalidToken": "the session token is invalid: check AWS_SESSION_TOKEN or the AWS profile",
}
NO_CREDENTIALS = (
    "no usable AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,"
    " or pick a profile with AWS_PROFILE"
)

# Credentials that exist but cannot be used: half set, or an SSO / process provider failing.
CREDENTIAL_EXC = (
    bce.PartialCredentialsError,
    bce.CredentialRetrievalError,
    bce.TokenRetrievalError,
    bce.SSOError,
)


class ShortBody(Exception):
    """The body we read does not match what the response headers promised."""


# Failures after which the same request may well succeed: lost or reset connections,
# timeouts, bodies cut short or garbled in transit (botocore cannot retry those itself,
# because they happen after it has handed us the response).
RETRYABLE_EXC: tuple[type[Exception], ...] = (
    ShortBody,
    bce.HTTPClientError,  # ReadTimeout, ConnectionClosed, ResponseStreaming
    bce.ConnectionError,  # EndpointConnection, ConnectTimeout
    bce.IncompleteReadError,
    bce.FlexibleChecksumError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


def error_code(exc: bce.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def status(exc: bce.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def is_precondition(exc: bce.ClientError) -> bool:
    return error_code(exc) in PRECONDITION_CODES or status(exc) == 412


def retry_after(exc: BaseException) -> float | None:
    if not isinstance(exc, bce.ClientError):
        return None
    headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    try:
        return max(0.0, float(headers.get("retry-after", "")))
    except ValueError:
        return None  # absent, or an HTTP date we do not bother parsing


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def untrusted_certificate(exc: BaseException, endpoint: str) -> UnreachableError | None:
    """The error for a TLS certificate we cannot verify: final, since no retry makes it trusted."""
    if not isinstance(exc, bce.SSLError) or "CERTIFICATE_VERIFY_FAILED" not in str(exc):
        return None  # a handshake cut by the network is worth repeating
    return UnreachableError(
        f"the TLS certificate of the S3 endpoint {endpoint} is not trusted ({one_line(exc)}):"
        " if a private CA signed it, set AWS_CA_BUNDLE (or ca_bundle in the AWS profile) to"
        " that CA's PEM file; otherwise check the endpoint URL"
    )


def client_error(
    exc: bce.ClientError, what: str, bucket: str, endpoint: str, url: str
) -> EncfsCloudError | None:
    """The error to raise for `exc` (`what` is "op name"), or None when worth repeating."""
    code, http_status = error_code(exc), status(exc)
    name = what.partition(" ")[2]
    if code == "NoSuchBucket":
        return NoFilesystemError(f"bucket {bucket} does not exist at {endpoint}")
    if code in PRECONDITION_CODES or http_status == 412:
        return PreconditionFailedError(f"{what}: another writer changed it first")
    if code in MISSING_CODES or http_status == 404:
        return ObjectMissingError(f"object {name} is missing from {url}")
    if code in _CREDENTIAL_HINTS:
        return CredentialsError(f"{endpoint}: {_CREDENTIAL_HINTS[code]}")
    if code == "AccessDenied" or http_status == 403:
        return CredentialsError(
            f"access to bucket {bucket} denied by {endpoint}: check"
            " AWS_ACCESS_KEY_ID / the AWS profile and the bucket's permissions"
        )
    if code in _RETRY_CODES or http_status >= 500 or http_status in (408, 429):
        return None
    message = exc.response.get("Error", {}).get("Message", "")
    return StoreError(f"{what} on {url} failed: {code} {message}".strip())
