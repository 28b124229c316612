"""A real S3-protocol server (moto, in a subprocess) on 127.0.0.1, and fixtures around it."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import os
import select
import subprocess
import sys
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
_START_TIMEOUT = 60.0  # importing moto on a cold, busy CI machine can take a while


class MotoServer:
    """moto's S3 in its own process, so its global state never meets a test's boto3.

    The child binds port 0 and prints the port it got (no free-port race), and exits when
    its stdin closes, so it dies with the test run even after a `kill -9`. Writes are
    serialised in the child: moto checks IfNoneMatch/IfMatch and then writes in two steps,
    so concurrent conditional PUTs could otherwise both win, which real S3 never allows.
    """

    def __init__(self) -> None:
        self.endpoint_url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._client: S3Client | None = None

    def start(self) -> MotoServer:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        env = dict(os.environ)
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)  # auth is switched on per test instead
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], _START_TIMEOUT)
        line = self._proc.stdout.readline().decode() if ready else ""
        if not line.startswith("PORT "):
            tail = self._stderr_tail()
            self.stop()
            raise RuntimeError(f"moto server did not start: {line!r} {tail}")
        self.endpoint_url = f"http://127.0.0.1:{int(line.split()[1])}"
        self._check_conditional_writes()
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()  # the child exits on EOF
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _stderr_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def client(self, **kwargs: Any) -> S3Client:
        """A boto3 client for the server; without arguments, one shared (thread-safe) client."""
        if not kwargs and self._client is not None:
            return self._client
        import boto3
        from botocore.config import Config

        params: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region_name": REGION,
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
            "config": Config(s3={"addressing_style": "path"}),
        }
        params.update(kwargs)
        client = boto3.session.Session().client("s3", **params)
        if not kwargs:
            self._client = client
        return client

    def _check_conditional_writes(self) -> None:
        """Fail loudly if this moto would let conditional-write tests pass for the wrong reason."""
        from botocore.exceptions import ClientError

        version = importlib.metadata.version("moto")
        c = self.client()
        bucket = f"selfcheck-{uuid.uuid4().hex[:12]}"
        c.create_bucket(Bucket=bucket)
        c.put_object(Bucket=bucket, Key="k", Body=b"1")
        checks: list[tuple[str, dict[str, Any]]] = [
            ("IfNoneMatch", {"IfNoneMatch": "*"}),
            ("IfMatch", {"IfMatch": '"0"'}),
        ]
        for label, kwargs in checks:
            try:
                c.put_object(Bucket=bucket, Key="k", Body=b"2", **kwargs)
            except ClientError as exc:
                if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 412:
                    continue
                raise
            self.stop()
            raise RuntimeError(
                f"moto {version} ignores {label} on put_object, so conditional writes would not"
                " be tested: install moto[server]>=5.1.5"
            )
        c.delete_object(Bucket=bucket, Key="k")
        c.delete_bucket(Bucket=bucket)

    @contextlib.contextmanager
    def enforce_auth(self) -> Iterator[None]:
        """Make moto check access keys (none are registered, so every key is unknown)."""
        self._reset_auth("0")
        try:
            yield
        finally:
            self._reset_auth("inf")

    def _reset_auth(self, count: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=count.encode(),
            headers={"Content-Type": "text/plain"},  # a form body would hide it from moto
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


def empty_bucket(client: S3Client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


def point_aws_chain_at(
    mp: pytest.MonkeyPatch,
    folder: Path,
    endpoint_url: str,
    credentials: tuple[str, str, str] = (ACCESS_KEY, SECRET_KEY, REGION),
) -> None:
    """Make the standard AWS chain (and any subprocess, like the real CLI) use the test server."""
    for var in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_REGION",
        "AWS_ENDPOINT_URL_S3",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    ):
        mp.delenv(var, raising=False)
    # A developer's ~/.aws must not leak in; the files need not exist.
    mp.setenv("AWS_CONFIG_FILE", str(folder / "no-aws-config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "no-aws-credentials"))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    access_key, secret_key, region = credentials
    mp.setenv("AWS_ACCESS_KEY_ID", access_key)
    mp.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    mp.setenv("AWS_DEFAULT_REGION", region)
    mp.setenv("AWS_ENDPOINT_URL", endpoint_url)


@pytest.fixture
def s3_env(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """Point the standard AWS chain (and any subprocess, like the real CLI) at the server."""
    point_aws_chain_at(monkeypatch, tmp_path, s3_server.endpoint_url)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: MotoServer) -> Iterator[str]:
    """A fresh, uniquely named, empty bucket, as its s3:// URL; removed afterwards."""
    client = s3_env.client()
    bucket = f"encfs-test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        with contextlib.suppress(Exception):
            empty_bucket(client, bucket)
            client.delete_bucket(Bucket=bucket)


# --- the child process -----------------------------------------------------------------

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _SerialWrites:
    """WSGI middleware: one mutating request at a time, with its body read before the lock."""

    def __init__(self, app: WsgiApp) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in ("PUT", "POST", "DELETE"):
            return self._app(environ, start_response)
        length = environ.get("CONTENT_LENGTH")
        if length:
            body = environ["wsgi.input"].read(int(length))
        else:
            body = environ["wsgi.input"].read() if environ.get("wsgi.input_terminated") else b""
        environ["wsgi.input"] = io.BytesIO(body)
        with self._lock:
            result = self._app(environ, start_response)
            try:
                return [b"".join(result)]
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()


def _serve() -> None:
    import logging

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = _SerialWrites(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)

    def exit_with_parent() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    print(f"PORT {server.server_port}", flush=True)
    # Nobody reads our stdout after the port line: a chatty library must not fill the pipe.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    server.serve_forever()


if __name__ == "__main__":
    _serve()
