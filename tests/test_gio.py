"""GNOME's file layer (gio) on a mount over the local S3 server: copy, move, trash, previews."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_s3 import MotoServer
from tests.test_programs import SharedMount, require, shared_mount

pytestmark = [pytest.mark.fuse, pytest.mark.s3]

CHUNK = 1 << 20


@pytest.fixture(scope="module")
def gio_mount(
    s3_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedMount]:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    with shared_mount(s3_server, tmp_path_factory.mktemp("gio")) as mounted:
        yield mounted


def gio(*args: str | Path, session: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `gio ARGS`; with `session`, inside a private D-Bus session so gvfs serves trash://.

    dbus-run-session stops its bus when gio exits, and gvfsd with it: nothing stays behind
    holding the mount busy.
    """
    cmd = [require("gio", "libglib2.0-bin"), *map(str, args)]
    if session:
        cmd = [require("dbus-run-session", "dbus-bin"), "--", *cmd]
    env = {k: v for k, v in os.environ.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr}")
    return done


def test_gio_copy_move_rename_info_list(gio_mount: SharedMount, tmp_path: Path) -> None:
    mnt = gio_mount.mnt
    local = tmp_path / "report.txt"
    local.write_bytes(b"quarterly numbers\n" * 5000)
    gio("mkdir", "-p", mnt / "docs" / "drafts")
    gio("copy", local, mnt / "docs" / "report.txt")
    assert (mnt / "docs" / "report.txt").read_bytes() == local.read_bytes()
    info = gio("info", "-a", "standard::size,standard::type", mnt / "docs" / "report.txt").stdout
    assert f"standard::size: {local.stat().st_size}" in info
    assert "standard::type: 1" in info  # G_FILE_TYPE_REGULAR
    listing = gio("list", "-l", mnt / "docs").stdout.splitlines()
    assert sorted(line.split("\t")[0] for line in listing) == ["drafts", "report.txt"]
    gio("rename", mnt / "docs" / "report.txt", "report-final.txt")
    assert sorted(os.listdir(mnt / "docs")) == ["drafts", "report-final.txt"]
    gio("move", mnt / "docs" / "report-final.txt", mnt / "docs" / "drafts")  # same filesystem
    gio("move", local, mnt / "docs" / "from-home.txt")  # across filesystems: copy, delete
    assert not local.exists()
    assert (mnt / "docs" / "from-home.txt").read_bytes() == b"quarterly numbers\n" * 5000
    gio_mount.remount()
    assert (mnt / "docs" / "drafts" / "report-final.txt").read_bytes().startswith(b"quarterly")
    assert sorted(os.listdir(mnt / "docs")) == ["drafts", "from-home.txt"]


def test_gio_trash_list_restore_and_empty(gio_mount: SharedMount) -> None:
    """GIO trashes into `.Trash-$UID` at the mount's root (freedesktop trash spec)."""
    if shutil.which("dbus-run-session") is None or not Path("/usr/libexec/gvfsd-trash").exists():
        pytest.skip("gio trash --list/--restore/--empty need gvfs and dbus (make test installs)")
    mnt = gio_mount.mnt
    (mnt / "photos").mkdir()
    victim = mnt / "photos" / "holiday.jpg"
    victim.write_bytes(b"\xff\xd8 not really a jpeg")
    gio("trash", victim)
    trash = mnt / f".Trash-{os.getuid()}"
    assert not victim.exists()
    assert (trash / "files" / "holiday.jpg").read_bytes() == b"\xff\xd8 not really a jpeg"
    info = (trash / "info" / "holiday.jpg.trashinfo").read_text()
    assert "Path=photos/holiday.jpg" in info  # relative to the mount's root, as the spec says

    listed = gio("trash", "--list", session=True).stdout.splitlines()
    ours = [line.split("\t") for line in listed if line.endswith(f"\t{victim}")]
    assert len(ours) == 1, listed
    gio("trash", "--restore", ours[0][0], session=True)
    assert victim.read_bytes() == b"\xff\xd8 not really a jpeg"
    assert list((trash / "files").iterdir()) == []

    gio("trash", victim)
    gio("trash", "--empty", session=True)
    assert not victim.exists()
    assert list((trash / "files").iterdir()) == []
    assert list((trash / "info").iterdir()) == []


def test_preview_of_a_large_file_fetches_only_its_chunk(gio_mount: SharedMount) -> None:
    """A thumbnailer reads a few KiB deep inside a big file: only that chunk is downloaded."""
    mnt = gio_mount.mnt
    size, offset = 64 << 20, 40 << 20
    expected = b""
    with open(mnt / "video.bin", "wb") as f:
        for i in range(size // CHUNK):
            block = os.urandom(CHUNK)
            if i == offset // CHUNK:
                expected = block[:4096]
            f.write(block)
    gio_mount.remount("disk_cache_size=0")  # cold: nothing of the file in any cache
    before = gio_mount.status()["transfers"]["bytes_fetched"]
    fd = os.open(mnt / "video.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, offset) == expected
    finally:
        os.close(fd)
    fetched = gio_mount.status()["transfers"]["bytes_fetched"] - before
    # The chunk holding the range, and at most one neighbour (kernel readahead can cross a
    # chunk boundary); prefetch only follows sequential reads, so nothing more.
    assert 0 < fetched <= 2 * (CHUNK + (64 << 10)), fetched
