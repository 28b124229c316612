"""Every command turns core dumps and same-user ptrace off before it can unlock a key."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs_cloud.store.local import LOCK_NAME
from tests.fixtures_mount import ENCFS

NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder another user can work in (pytest's own temp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="encfs-harden-", dir="/tmp"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _read_until(fd: int, marker: bytes, timeout: float = 60) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} in {seen!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_a_command_at_its_passphrase_prompt_is_not_dumpable(shared_dir: Path) -> None:
    """`init` waits at the passphrase prompt; its /proc entry shows the process hardened.

    It runs as another user: the files in /proc/PID of a non-dumpable process belong to root
    instead of the process's user, which is how the kernel shows PR_SET_DUMPABLE 0 to others.
    """
    bucket = shared_dir / "bucket"
    bucket.mkdir(mode=0o777)
    bucket.chmod(0o777)
    env = dict(os.environ, XDG_DATA_HOME=str(shared_dir / "home"), HOME=str(shared_dir))
    master, slave = pty.openpty()
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    proc = subprocess.Popen(
        [*cmd, ENCFS, "init", f"file://{bucket}"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,  # no controlling terminal: getpass uses the pty on stdin
    )
    os.close(slave)
    try:
        _read_until(master, b"passphrase")
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file"))
        assert core.split()[4:6] == ["0", "0"], core
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert f"Uid:\t{NOBODY}" in status  # it really runs as the other user
        assert os.stat(f"/proc/{proc.pid}/status").st_uid == 0, (
            "dumpable: its /proc files are the user's"
        )
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    # The store probe ran first (a bad store wastes no typing) and removed its scratch objects;
    # only the local store's lock file and an empty probe folder may remain.
    written = [p for p in bucket.rglob("*") if p.is_file() and p.name != LOCK_NAME]
    assert written == [], "init wrote an object before it had a passphrase"
