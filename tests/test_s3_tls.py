"""S3 over TLS for real: the store and the commands through a TLS proxy, and aws-chunked.

Over HTTPS, botocore's default (`when_supported`) flexible checksums frame a PutObject body as
`Content-Encoding: aws-chunked` with a trailing `x-amz-checksum-crc32`; over plain HTTP it
does not, which is why these tests need TLS. Some providers and proxies refuse or mangle such
bodies; our client sets `when_required`, so none of our objects is ever sent that way. Only
`doctor`'s checksum probe sends one on purpose: it checks what a default client meets.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore
import pytest
from botocore import exceptions as bce
from botocore.config import Config
from botocore.exceptions import ClientError

from encfs_cloud.errors import PreconditionFailedError, UnreachableError
from encfs_cloud.store import open_store
from encfs_cloud.store.s3 import S3Store
from encfs_cloud.store.s3errors import untrusted_certificate
from tests.faultproxy import FaultProxy
from tests.fixtures_mount import Device, needs_fuse
from tests.fixtures_s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoServer
from tests.fixtures_servers import Server
from tests.fixtures_tls import aim_aws_chain_at_tls, tls_in_front
from tests.tlsproxy import TlsFiles, TlsProxy, is_aws_chunked

pytestmark = pytest.mark.s3

Seen = tuple[str, str, dict[str, str]]


def puts(proxy: FaultProxy, *, under: str = "") -> list[Seen]:
    return [s for s in proxy.seen if s[0] == "PUT" and under in s[1]]


def assert_plainly_framed(seen: Seen) -> None:
    """A PUT whose body is sent as it is, with its length: what every store understands."""
    _, target, headers = seen
    assert "content-length" in headers, target
    assert not is_aws_chunked(headers), (target, headers)
    assert "transfer-encoding" not in headers, target
    assert "x-amz-trailer" not in headers, target
    assert "x-amz-sdk-checksum-algorithm" not in headers, target


def default_client(endpoint: str, ca: Path) -> Any:
    """A boto3 client as a user would make one: botocore's default checksum settings."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        verify=str(ca),
        config=Config(s3={"addressing_style": "path"}),
    )


def test_store_contract_over_tls(tls_bucket: str, tls_proxy: TlsProxy) -> None:
    store = open_store(f"{tls_bucket}/p")
    try:
        assert isinstance(store, S3Store) and store.endpoint.startswith("https://127.0.0.1:")
        blob = os.urandom(300_000)
        etag = store.put("data/blob", blob)
        assert store.get("data/blob") == blob
        assert store.get("data/blob", 1000, 5000) == blob[1000:6000]
        with pytest.raises(PreconditionFailedError):
            store.put("data/blob", b"other", if_none_match=True)
        with pytest.raises(PreconditionFailedError):
            store.put("data/blob", b"other", if_match='"0123"')
        store.put("data/blob", b"second", if_match=etag)
        assert store.get("data/blob") == b"second"
        store.put("meta/1", b"first commit", if_none_match=True)
        assert [o.name for o in store.list()] == ["data/blob", "meta/1"]
        store.delete("data/blob")
        assert store.head("data/blob") is None
    finally:
        store.close()
    writes = puts(tls_proxy, under="/p/")
    assert len(writes) == 5  # three accepted, two refused by the server
    for seen in writes:
        assert_plainly_framed(seen)
    assert {s[2].get("if-none-match") for s in writes} >= {"*"}
    assert any(s[2].get("range") == "bytes=1000-5999" for s in tls_proxy.seen)


def test_store_refuses_an_untrusted_certificate(
    tls_bucket: str, tls_proxy: TlsProxy, device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_CA_BUNDLE")
    done = device.run("device", "list", tls_bucket)
    assert done.returncode == 10, done.stderr
    assert "certificate" in done.stderr and "AWS_CA_BUNDLE" in done.stderr
    assert tls_proxy.requests == 0  # no request was sent to a server we could not verify
    deadline = time.monotonic() + 30  # the proxy's thread may note the failure a bit later
    while tls_proxy.failed_handshakes == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tls_proxy.failed_handshakes == 1  # and the failure was final: no retry


def test_only_a_failed_verification_is_final() -> None:
    endpoint = "https://127.0.0.1:9"
    cut = bce.SSLError(endpoint_url=endpoint, error=ConnectionResetError("reset in handshake"))
    assert untrusted_certificate(cut, endpoint) is None  # the network: worth another try
    failed = bce.SSLError(
        endpoint_url=endpoint,
        error=ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] unknown CA"),
    )
    final = untrusted_certificate(failed, endpoint)
    assert isinstance(final, UnreachableError) and final.exit_code == 10
    assert endpoint in str(final) and "AWS_CA_BUNDLE" in str(final)


def test_default_botocore_sends_aws_chunked_only_over_tls(
    s3_server: MotoServer,
    tls_bucket: str,
    tls_proxy: TlsProxy,
    tls_files: TlsFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        monkeypatch.delenv(var, raising=False)  # botocore's defaults, not a developer's
    if not hasattr(Config(), "request_checksum_calculation"):
        pytest.skip(f"botocore {botocore.__version__} has no default request checksums")
    bucket = tls_bucket.removeprefix("s3://")
    body = os.urandom(70_000)
    tls_client = default_client(tls_proxy.endpoint_url, tls_files.ca)
    tls_client.put_object(Bucket=bucket, Key="default-tls", Body=body)
    (_, _, headers), *_ = puts(tls_proxy, under="/default-tls")
    if not is_aws_chunked(headers):
        pytest.skip(f"botocore {botocore.__version__} sends no aws-chunked body over TLS")
    assert headers["x-amz-trailer"] == "x-amz-checksum-crc32"
    assert headers["transfer-encoding"] == "chunked"
    assert headers["x-amz-decoded-content-length"] == str(len(body))
    assert headers["x-amz-content-sha256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    # The proxy relays the chunks as they came: the server decoded them to the same bytes.
    plain = s3_server.client()
    assert plain.get_object(Bucket=bucket, Key="default-tls")["Body"].read() == body

    # Over plain HTTP the same client sends the checksum as a header, the body as it is.
    with FaultProxy(s3_server.endpoint_url) as http_proxy:
        http_client = default_client(http_proxy.endpoint_url, tls_files.ca)
        http_client.put_object(Bucket=bucket, Key="default-http", Body=body)
        (seen,) = puts(http_proxy, under="/default-http")
    http_headers = seen[2]
    assert "x-amz-checksum-crc32" in http_headers and "content-length" in http_headers
    assert not is_aws_chunked(http_headers) and "x-amz-trailer" not in http_headers

    # A provider that refuses aws-chunked bodies refuses the default client, over TLS.
    tls_proxy.refuse_aws_chunked = True
    with pytest.raises(ClientError) as refused:
        tls_client.put_object(Bucket=bucket, Key="default-refused", Body=body)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    listed = plain.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert "default-refused" not in [o["Key"] for o in listed]


@pytest.fixture(params=["moto", "seaweedfs"])
def tls_store(
    request: pytest.FixtureRequest, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, TlsProxy]]:
    """A fresh bucket (s3:// URL) on each real server, reached through its own TLS proxy."""
    if request.param == "moto":
        yield request.getfixturevalue("tls_bucket"), request.getfixturevalue("tls_proxy")
        return
    server: Server = request.getfixturevalue("seaweedfs_server")
    bucket: str = request.getfixturevalue("seaweedfs_bucket")
    with tls_in_front(server.endpoint, tls_files) as proxy:
        aim_aws_chain_at_tls(monkeypatch, proxy, tls_files)
        yield bucket, proxy


def test_commands_over_tls(tls_store: tuple[str, TlsProxy], device: Device) -> None:
    tls_bucket, tls_proxy = tls_store
    source = f"{tls_bucket}/fs"
    device.init(source)
    doctor = device.run("doctor", source)
    assert doctor.returncode == 0, doctor.stderr
    assert "verdict: fit for encfs-cloud" in doctor.stdout
    assert "ok    checksums: validated" in doctor.stdout  # the probe's trailer was decoded
    listed = device.run("device", "list", source)
    assert listed.returncode == 0 and "(this device)" in listed.stdout, listed.stderr
    fsck = device.run("fsck", source)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    ours = [s for s in puts(tls_proxy, under="/fs/") if "/fs/probe/" not in s[1]]
    assert ours, "the commands wrote nothing through the proxy"
    for seen in ours:
        assert_plainly_framed(seen)
    # The only aws-chunked bodies are the probe's checksum check (init's and doctor's).
    chunked = tls_proxy.aws_chunked_requests()
    assert len(chunked) == 2 and all("/fs/probe/" in target for _, target, _ in chunked)


@needs_fuse
@pytest.mark.fuse
def test_mount_through_a_tls_proxy_that_refuses_aws_chunked(
    tls_store: tuple[str, TlsProxy],
    device: Device,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls_bucket, tls_proxy = tls_store
    tls_proxy.refuse_aws_chunked = True
    # Only init names the endpoint: the later commands and mounts remember it.
    endpoint = tls_proxy.endpoint_url
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    source = f"{tls_bucket}/fs"
    device.run("init", source, "--no-passphrase", "--endpoint-url", endpoint, check=True)
    doctor = device.run("doctor", source)
    assert doctor.returncode == 0, doctor.stderr
    assert "verdict: fit for encfs-cloud" in doctor.stdout
    assert "warn  checksums: rejected on upload (InvalidRequest)" in doctor.stdout

    big = os.urandom(3 << 20)  # several chunks: the cold reads below are ranged GETs
    mnt = tmp_path / "mnt"
    with device.mounted(source, mnt):
        (mnt / "dir").mkdir()
        (mnt / "dir" / "big.bin").write_bytes(big)
        (mnt / "small.txt").write_text("hello over TLS")
    fsck = device.run("fsck", source)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cold = tmp_path / "cold-cache"  # an empty disk cache: every chunk comes over TLS
    gets_before = sum(1 for s in tls_proxy.seen if s[0] == "GET" and "/fs/data/" in s[1])
    with device.mounted(source, mnt, "ro", f"cache_dir={cold}"):
        assert (mnt / "dir" / "big.bin").read_bytes() == big
        assert (mnt / "small.txt").read_text() == "hello over TLS"
    gets_after = sum(1 for s in tls_proxy.seen if s[0] == "GET" and "/fs/data/" in s[1])
    assert gets_after > gets_before

    data = puts(tls_proxy, under="/fs/data/")
    meta = puts(tls_proxy, under="/fs/meta/")
    assert data and meta
    for seen in data + meta:
        assert_plainly_framed(seen)
    chunked = tls_proxy.aws_chunked_requests()
    assert chunked and all("/fs/probe/" in target for _, target, _ in chunked)
