"""systemd: the notify protocol over a real mount and stop, and a unit the host can see."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_mount import MOUNT, Device, force_unmount, is_mounted, needs_fuse

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "encfs-cloud@.service"


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """systemd's side of NOTIFY_SOCKET: a datagram socket (short path for AF_UNIX)."""
    folder = tempfile.mkdtemp(prefix="encfs-notify-", dir="/tmp")
    path = os.path.join(folder, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(120)  # a generous "does not hang" bound
        try:
            yield path, sock
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@needs_fuse
def test_notify_protocol_through_a_mount_and_a_stop(
    device: Device, local_source: str, tmp_path: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    address, sock = notify_socket
    device.init(local_source)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**device.env, "NOTIFY_SOCKET": address}
    with open(tmp_path / "foreground.log", "wb") as out:
        proc = subprocess.Popen(
            [MOUNT, "-f", local_source, str(mnt), "-o", "commit_interval=3600"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        assert sock.recv(4096).decode().splitlines() == ["READY=1"]
        assert is_mounted(mnt)
        (mnt / "late.bin").write_bytes(os.urandom(2 << 20))  # the final flush uploads it
        proc.send_signal(signal.SIGTERM)  # what `systemctl stop` does
        messages: list[str] = []
        while not any(m.startswith("STATUS=unmounted") for m in messages):
            messages += sock.recv(4096).decode().splitlines()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            force_unmount(mnt)
            proc.kill()
            proc.wait()
    assert messages[0] == "STOPPING=1", messages
    assert messages[1].startswith("STATUS=unmounting: uploading "), messages
    extend = [m for m in messages if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extend and int(extend[0].split("=")[1]) > 0, messages
    assert messages.index(extend[0]) < len(messages) - 1
    assert messages[-1] == "STATUS=unmounted: every change is in the bucket", messages
    assert not is_mounted(mnt)


def test_unit_mounts_in_the_hosts_namespace() -> None:
    """PrivateTmp= and its kin give the service a mount namespace: the host sees no mount."""
    settings = [line.split("=", 1)[0] for line in UNIT.read_text().splitlines() if "=" in line]
    namespaced = [
        s
        for s in settings
        if not s.startswith("#") and s.startswith(("Private", "Protect", "ReadOnlyPaths"))
    ]
    assert not namespaced, namespaced
