"""TLS in front of the test S3 servers: a throwaway CA, the TLS proxy, the AWS chain aimed at it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.fixtures_s3 import MotoServer
from tests.tlsproxy import TlsFiles, TlsProxy, make_tls_files


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA and a 127.0.0.1 certificate, made for this test run in its temp folder."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@contextlib.contextmanager
def tls_in_front(upstream: str, files: TlsFiles) -> Iterator[TlsProxy]:
    """A TLS-terminating proxy in front of `upstream` (http://), recording every request head."""
    proxy = TlsProxy(upstream, files)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def aim_aws_chain_at_tls(mp: pytest.MonkeyPatch, proxy: TlsProxy, files: TlsFiles) -> None:
    """The AWS chain (and the CLI) reach the store through `proxy`, trusting our CA."""
    mp.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
    mp.setenv("AWS_CA_BUNDLE", str(files.ca))


@pytest.fixture
def tls_proxy(s3_server: MotoServer, tls_files: TlsFiles) -> Iterator[TlsProxy]:
    """The TLS proxy in front of the moto server."""
    with tls_in_front(s3_server.endpoint_url, tls_files) as proxy:
        yield proxy


@pytest.fixture
def tls_bucket(
    s3_bucket: str, tls_proxy: TlsProxy, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A fresh moto bucket (s3:// URL); the AWS chain and the CLI reach it over TLS only.

    The bucket is made and removed over plain HTTP, so the proxy records only the test's
    own traffic.
    """
    aim_aws_chain_at_tls(monkeypatch, tls_proxy, tls_files)
    return s3_bucket
