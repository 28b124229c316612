"""Log lines never vanish: syslog when it listens, else a rotated private file; -v stays ours."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_mount import MOUNT, Device, needs_fuse

FLUSHED = "every change is in the bucket"


@pytest.fixture
def syslog() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for /dev/log (short path: AF_UNIX limits its length)."""
    folder = tempfile.mkdtemp(prefix="encfs-log-", dir="/tmp")
    path = os.path.join(folder, "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0)
    try:
        yield path, sock
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def _drain(sock: socket.socket) -> str:
    lines = []
    while True:
        try:
            lines.append(sock.recv(65536).decode(errors="replace"))
        except BlockingIOError:
            return "\n".join(lines)


def _state_folder(device: Device) -> Path:
    (folder,) = [p for p in (device.home / "encfs-cloud").iterdir() if p.is_dir()]
    return folder


@needs_fuse
def test_without_syslog_the_daemon_logs_to_a_private_file(
    tmp_path: Path, local_source: str
) -> None:
    device = Device(tmp_path / "dev", {"ENCFS_CLOUD_SYSLOG_SOCKET": str(tmp_path / "no-log")})
    device.init(local_source)
    with device.mounted(local_source, tmp_path / "mnt") as mnt:
        (mnt / "a").write_bytes(b"x" * 1000)
    log = _state_folder(device) / "daemon.log"
    assert FLUSHED in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


@needs_fuse
def test_the_daemon_logs_to_syslog_when_it_listens(
    tmp_path: Path, local_source: str, syslog: tuple[str, socket.socket]
) -> None:
    path, sock = syslog
    device = Device(tmp_path / "dev", {"ENCFS_CLOUD_SYSLOG_SOCKET": path})
    device.init(local_source)
    with device.mounted(local_source, tmp_path / "mnt") as mnt:
        (mnt / "a").write_bytes(b"x" * 1000)
    received = _drain(sock)
    assert "encfs-cloud: " in received and FLUSHED in received, received
    assert not (_state_folder(device) / "daemon.log").exists()


@needs_fuse
def test_log_option_creates_a_private_file(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    device.init(local_source)
    log = tmp_path / "mount.log"
    with device.mounted(local_source, tmp_path / "mnt", f"log={log}"):
        pass
    assert FLUSHED in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_log_option_refuses_a_planted_symlink(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    device.init(local_source)
    victim = tmp_path / "victim"
    planted = tmp_path / "mount.log"
    planted.symlink_to(victim)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = device.run(MOUNT, local_source, str(mnt), "-o", f"log={planted}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "symbolic link" in done.stderr
    assert not victim.exists()
    assert not os.path.ismount(mnt)


def test_verbose_shows_our_debug_lines_not_botocore(device: Device, s3_bucket: str) -> None:
    device.init(s3_bucket)
    done = device.run("device", "list", "-v", s3_bucket, check=True)
    lines = done.stderr.splitlines()
    assert any(line.startswith("DEBUG encfs_cloud.store.s3: get ") for line in lines), lines
    noisy = ("botocore", "boto3", "urllib3", "s3transfer")
    assert not [line for line in lines if line.split(" ")[1:2][0].split(".")[0] in noisy], lines
