"""Two devices mount one filesystem read-write at once and see each other's changes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures_mount import Device, daemon_pids, force_unmount, needs_fuse, unmount
from tests.test_devices_e2e import enroll

pytestmark = [needs_fuse, pytest.mark.fuse]

POLL = "poll_interval=1"
NO_TIMER = "commit_interval=3600"  # commits only on fsync: the test decides when


def _eventually(check: Callable[[], bool], what: str, deadline: float = 90) -> None:
    """Poll until `check` holds; the load on a shared machine decides how long it takes."""
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.2)


def _write(path: Path, data: bytes, *, sync: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _two_mounts(
    laptop: Device, desktop: Device, source: str, tmp_path: Path, *options: str
) -> Iterator[tuple[Path, Path]]:
    laptop.run("init", source, "--no-passphrase", "--device-name", "laptop", check=True)
    enroll(laptop, desktop, source, "desktop")
    a, b = tmp_path / "a", tmp_path / "b"
    with laptop.mounted(source, a, POLL, *options), desktop.mounted(source, b, POLL, *options):
        yield a, b


@pytest.fixture
def laptop(tmp_path: Path) -> Device:
    return Device(tmp_path / "laptop")


@pytest.fixture
def desktop(tmp_path: Path) -> Device:
    return Device(tmp_path / "desktop")


def test_a_file_closed_on_one_device_appears_on_the_other(
    laptop: Device, desktop: Device, any_source: str, tmp_path: Path
) -> None:
    with _two_mounts(laptop, desktop, any_source, tmp_path) as (a, b):
        (a / "docs").mkdir()
        _write(a / "docs" / "hello.txt", b"written on the laptop")
        _eventually(lambda: _read(b / "docs" / "hello.txt") == b"written on the laptop", "B sees A")
        # B has the file in its kernel caches; A rewrites it with another size.
        _write(a / "docs" / "hello.txt", b"rewritten on the laptop, and longer")
        _eventually(
            lambda: _read(b / "docs" / "hello.txt") == b"rewritten on the laptop, and longer",
            "B sees the rewrite",
        )
        _write(b / "docs" / "reply.txt", b"written on the desktop")
        _eventually(
            lambda: _read(a / "docs" / "reply.txt") == b"written on the desktop", "A sees B"
        )
        (b / "docs" / "hello.txt").unlink()
        _eventually(lambda: not (a / "docs" / "hello.txt").exists(), "A sees the delete")
        assert sorted(p.name for p in (a / "docs").iterdir()) == ["reply.txt"]
    assert laptop.run("fsck", any_source).returncode == 0


def _edit_on_both_and_check_conflict_copy(a: Path, b: Path, desktop: Device) -> None:
    """Both devices edit one file before either has seen the other's edit; the laptop (A)
    commits first, so it keeps the name and the desktop's edit becomes a conflict copy."""
    _write(a / "report.txt", b"first version")
    _eventually(lambda: _read(b / "report.txt") == b"first version", "B sees the file")
    _write(a / "report.txt", b"edited on the laptop", sync=False)
    _write(b / "report.txt", b"edited on the desktop", sync=False)
    with open(a / "report.txt", "rb+") as f:
        os.fsync(f.fileno())
    with open(b / "report.txt", "rb+") as f:
        os.fsync(f.fileno())

    def both_versions(root: Path) -> bool:
        names = sorted(p.name for p in root.iterdir() if p.name.startswith("report"))
        copies = [n for n in names if n.startswith("report (conflict from desktop ")]
        return (
            len(names) == 2
            and len(copies) == 1
            and copies[0].endswith(").txt")
            and _read(root / "report.txt") == b"edited on the laptop"
            and _read(root / copies[0]) == b"edited on the desktop"
        )

    _eventually(lambda: both_versions(b), "the desktop holds both versions")
    status = desktop.run("status", str(b), "--json", check=True)
    assert json.loads(status.stdout)["other_devices"]["conflicts"] == 1
    _eventually(lambda: both_versions(a), "the laptop holds both versions")


def test_concurrent_edits_keep_the_original_and_a_conflict_copy(
    laptop: Device, desktop: Device, local_source: str, tmp_path: Path
) -> None:
    with _two_mounts(laptop, desktop, local_source, tmp_path, NO_TIMER) as (a, b):
        _edit_on_both_and_check_conflict_copy(a, b, desktop)
        unmount(desktop, b)
        unmount(laptop, a)
    assert laptop.run("fsck", local_source).returncode == 0


def test_two_writers_on_seaweedfs(
    laptop: Device, desktop: Device, seaweedfs_bucket: str, tmp_path: Path
) -> None:
    """The second real S3 server: changes propagate both ways and a conflict keeps both edits."""
    source = f"{seaweedfs_bucket}/fs"
    with _two_mounts(laptop, desktop, source, tmp_path, NO_TIMER) as (a, b):
        _write(b / "from-desktop.bin", os.urandom(3 << 20))  # several chunks, ranged GETs on A
        expected = _read(b / "from-desktop.bin")
        _eventually(lambda: _read(a / "from-desktop.bin") == expected, "A sees B's file")
        _edit_on_both_and_check_conflict_copy(a, b, desktop)
        (a / "from-desktop.bin").unlink()
        fd = os.open(a, os.O_RDONLY)  # fsync of the folder commits the delete
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _eventually(lambda: not (b / "from-desktop.bin").exists(), "B sees A's delete")
    assert laptop.run("fsck", source).returncode == 0


def test_a_read_only_mount_follows_a_writer(
    laptop: Device, desktop: Device, local_source: str, tmp_path: Path
) -> None:
    laptop.run("init", local_source, "--no-passphrase", "--device-name", "laptop", check=True)
    enroll(laptop, desktop, local_source, "desktop")
    with (
        laptop.mounted(local_source, tmp_path / "a", POLL) as a,
        desktop.mounted(local_source, tmp_path / "b", POLL, "ro") as b,
    ):
        _write(a / "keep.txt", b"one")
        _write(a / "gone.txt", b"two")
        _eventually(lambda: _read(b / "gone.txt") == b"two", "the reader sees new files")
        assert _read(b / "keep.txt") == b"one"
        (a / "gone.txt").unlink()
        _write(a / "keep.txt", b"rewritten " * 100_000)  # a new pack; the old one is freed
        os.sync()
        _eventually(lambda: not (b / "gone.txt").exists(), "the reader sees the delete")
        _eventually(lambda: _read(b / "keep.txt") == b"rewritten " * 100_000, "and the rewrite")


def test_untar_on_one_device_while_the_other_lists_and_reads(
    laptop: Device, desktop: Device, any_source: str, tmp_path: Path
) -> None:
    source_tree = tmp_path / "tree"
    for d in range(20):
        (source_tree / f"d{d}").mkdir(parents=True)
        for f in range(50):
            (source_tree / f"d{d}" / f"f{f}").write_bytes(f"{d}/{f}\n".encode() * (f + 1))
    archive = tmp_path / "tree.tar"
    subprocess.run(["tar", "-C", str(source_tree), "-cf", str(archive), "."], check=True)
    with _two_mounts(laptop, desktop, any_source, tmp_path) as (a, b):
        untar = subprocess.Popen(["tar", "-C", str(a), "-xf", str(archive)])
        errors: list[str] = []
        while untar.poll() is None:
            # The reader walks whatever it sees; every file it can name must read whole.
            for path in b.rglob("*"):
                try:
                    if path.is_file():
                        data = path.read_bytes()
                        d, f = path.parent.name[1:], path.name[1:]
                        if data and data != f"{d}/{f}\n".encode() * (int(f) + 1):
                            errors.append(f"{path}: wrong contents")
                except FileNotFoundError:
                    continue  # renamed or not yet complete on the writer: tar's own moves
                except OSError as exc:
                    errors.append(f"{path}: {exc}")
        assert untar.returncode == 0
        assert errors == []
        os.sync()
        _eventually(
            lambda: sum(1 for p in b.rglob("*") if p.is_file()) == 1000, "the reader converges"
        )
        assert (b / "d7" / "f9").read_bytes() == b"7/9\n" * 10
    assert laptop.run("fsck", any_source).returncode == 0


def test_kill_9_of_one_writer_while_the_other_goes_on(
    laptop: Device, desktop: Device, local_source: str, tmp_path: Path
) -> None:
    laptop.run("init", local_source, "--no-passphrase", "--device-name", "laptop", check=True)
    enroll(laptop, desktop, local_source, "desktop")
    a, b = tmp_path / "a", tmp_path / "b"
    with laptop.mounted(local_source, a, POLL), desktop.mounted(local_source, b, POLL):
        _write(a / "from-laptop", b"acknowledged before the crash")
        _write(a / "unsynced", b"maybe", sync=False)
        for pid in daemon_pids(a):
            os.kill(pid, signal.SIGKILL)
        force_unmount(a)
        for n in range(20):
            _write(b / f"after-{n}", f"desktop {n}".encode())
        _eventually(lambda: _read(b / "from-laptop") == b"acknowledged before the crash", "B")
        with laptop.mounted(local_source, tmp_path / "again", POLL) as again:
            _eventually(lambda: _read(again / "after-19") == b"desktop 19", "the laptop again")
            assert _read(again / "from-laptop") == b"acknowledged before the crash"
    assert laptop.run("fsck", local_source).returncode == 0
