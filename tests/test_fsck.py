"""fsck over filesystems written through real mounts, then damaged in the bucket directly."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from encfs_cloud import layout
from encfs_cloud.daemon.lease import Lease
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.keys.vault import Unlocked, unlock
from encfs_cloud.store import open_store
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree.journal import KIND_SNAPSHOT, CommitInfo, export_snapshot, replay, seal_commit
from encfs_cloud.tree.metadata import ChunkRef, Metadata
from tests.fixtures_mount import Device, needs_fuse
from tests.fixtures_s3 import MotoServer

pytestmark = needs_fuse

BIG = os.urandom((5 << 20) // 2)  # 2.5 MiB: three chunks


def make_tree(root: Path) -> None:
    """The reference tree: sizes, modes, times, links and a fifo."""
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "small.txt").write_text("hello")
    (root / "empty").write_bytes(b"")
    (root / "docs" / "report.bin").write_bytes(BIG)
    (root / "docs" / "deep" / "nested.txt").write_text("deep inside\n" * 100)
    os.link(root / "small.txt", root / "docs" / "deep" / "hardlink")
    (root / "link").symlink_to("docs/report.bin")
    (root / "private.key").write_bytes(b"k" * 5000)
    (root / "private.key").chmod(0o600)
    (root / "old.txt").write_text("from long ago")
    os.utime(root / "old.txt", ns=(978_307_200_123_456_789, 978_307_200_123_456_789))
    os.mkfifo(root / "fifo")
    (root / "docs" / "deep").chmod(0o750)


@dataclass
class Base:
    home: Path
    bucket: Path
    reference: Path
    first_session_head: int  # the newest commit when the first session ended


@dataclass
class Fs:
    """A private copy of the base filesystem and of the device that wrote it."""

    device: Device
    bucket: Path
    reference: Path
    base: Base

    @property
    def source(self) -> str:
        return f"file://{self.bucket}"

    def fsck(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.device.run("fsck", self.source, *args)


_built: list[Base] = []  # one base per session, shared by test_fsck and test_salvage


def build_base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """Two sessions through real mounts: the reference tree, then late.txt (a delta).

    Tests work on copies (`copy_fs`), so the base is built once per test session.
    """
    if _built:
        return _built[0]
    root = tmp_path_factory.mktemp("base")
    device = Device(root / "home")
    bucket = root / "bucket"
    bucket.mkdir()
    source = f"file://{bucket}"
    device.init(source)
    reference = root / "reference"
    reference.mkdir()
    make_tree(reference)
    with device.mounted(source, root / "mnt") as mnt:
        subprocess.run(["cp", "-a", f"{reference}/.", str(mnt)], check=True)
    first_session_head = max(int(p.name, 16) for p in (bucket / "meta").iterdir())
    (reference / "late.txt").write_text("written in the second session")
    with device.mounted(source, root / "mnt") as mnt:  # a second commit: a delta
        subprocess.run(["cp", "-a", str(reference / "late.txt"), str(mnt)], check=True)
    _built.append(Base(root / "home", bucket, reference, first_session_head))
    return _built[0]


def copy_fs(base: Base, tmp_path: Path) -> Fs:
    shutil.copytree(base.home, tmp_path / "home", symlinks=True)
    shutil.copytree(base.bucket, tmp_path / "bucket")
    return Fs(Device(tmp_path / "home"), tmp_path / "bucket", base.reference, base)


@pytest.fixture(scope="module")
def base_fs(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return build_base(tmp_path_factory)


@pytest.fixture
def fs(base_fs: Base, tmp_path: Path) -> Fs:
    return copy_fs(base_fs, tmp_path)


@dataclass
class Opened:
    store: ObjectStore
    unlocked: Unlocked
    sealer: Sealer
    md: Metadata

    def inode(self, path: str) -> int:
        ino = 1
        for part in path.strip("/").split("/"):
            found = self.md.lookup(ino, part.encode())
            assert found is not None, path
            ino = found
        return ino

    def chunk(self, path: str, idx: int = 0) -> ChunkRef:
        ref = self.md.get_chunk(self.inode(path), idx)
        assert ref is not None
        return ref


@contextlib.contextmanager
def open_fs(fs: Fs) -> Iterator[Opened]:
    """The filesystem opened in this process, as the device that wrote it."""
    store = open_store(fs.source)
    unlocked = unlock(store, DeviceStore(fs.device.home / "encfs-cloud"), None)
    sealer = Sealer(unlocked.fs_id, unlocked.keys)
    md, _, _ = replay(store, sealer)
    try:
        yield Opened(store, unlocked, sealer, md)
    finally:
        unlocked.wipe()


@pytest.fixture
def opened(fs: Fs) -> Iterator[Opened]:
    with open_fs(fs) as it:
        yield it


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def corrupt_chunk(fs: Fs, ref: ChunkRef) -> None:
    flip_byte(fs.bucket / layout.pack_name(ref.pack), ref.off + 40)


def names_in(opened: Opened) -> set[str]:
    md, _, _ = replay(opened.store, opened.sealer)
    rows = md.db.execute("SELECT name FROM dentries").fetchall()
    return {bytes(r[0]).decode() for r in rows}


def test_clean_filesystem(fs: Fs) -> None:
    done = fs.fsck()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("clean:") and " 0 chunks" not in done.stdout


def test_missing_pack_reported_and_repaired(fs: Fs, opened: Opened) -> None:
    ref = opened.chunk("docs/report.bin", 1)
    (fs.bucket / layout.pack_name(ref.pack)).unlink()
    doomed = {
        bytes(r[0]).decode()
        for r in opened.md.db.execute(
            "SELECT d.name FROM dentries d JOIN chunks c ON c.inode=d.inode WHERE c.pack=?",
            (ref.pack,),
        )
    }
    done = fs.fsck()
    assert done.returncode == 31, done.stdout + done.stderr
    assert "chunk 1 is in a data object that is missing" in done.stdout
    assert "damaged: /docs/report.bin: " in done.stdout
    refused = fs.fsck("--repair")  # no terminal to ask on, no --yes: changes nothing
    assert refused.returncode == 31 and "--yes" in refused.stdout
    repaired = fs.fsck("--repair", "--yes")
    assert repaired.returncode == 30, repaired.stdout + repaired.stderr
    assert "wrote metadata snapshot" in repaired.stdout
    assert fs.fsck().returncode == 0
    left = names_in(opened)
    assert "report.bin" not in left and not (doomed & left)
    assert {"nested.txt", "old.txt", "late.txt"} - doomed <= left


def test_orphan_object_found_and_removed(fs: Fs) -> None:
    orphan = fs.bucket / layout.pack_name(layout.random_id())
    orphan.write_bytes(os.urandom(64 << 10))
    done = fs.fsck()
    assert done.returncode == 31
    assert f"orphan: {layout.pack_name(orphan.name)} is referenced by nothing" in done.stdout
    repaired = fs.fsck("--repair", "--yes")
    assert repaired.returncode == 30, repaired.stdout + repaired.stderr
    assert not orphan.exists()
    assert "wrote metadata snapshot" not in repaired.stdout  # nothing in the tree changed
    assert fs.fsck().returncode == 0


def test_corrupt_chunk_reported_and_repaired(fs: Fs, opened: Opened) -> None:
    corrupt_chunk(fs, opened.chunk("docs/deep/nested.txt"))
    done = fs.fsck()
    assert done.returncode == 31
    assert "damaged: /docs/deep/nested.txt: chunk 0 fails authentication" in done.stdout
    assert fs.fsck("--repair", "--yes").returncode == 30
    assert fs.fsck().returncode == 0
    left = names_in(opened)
    assert "nested.txt" not in left and {"small.txt", "report.bin", "late.txt"} <= left


def test_damaged_newest_commit_replaced_by_a_snapshot(fs: Fs) -> None:
    newest = max((fs.bucket / "meta").iterdir())
    flip_byte(newest, 100)
    done = fs.fsck()
    assert (
        done.returncode == 31 and f"commit: metadata commit {int(newest.name, 16)}" in done.stdout
    )
    assert fs.fsck("--repair", "--yes").returncode == 30
    # The repaired filesystem mounts (this device's rollback check accepts the new snapshot).
    with fs.device.mounted(fs.source, fs.bucket.parent / "mnt") as mnt:
        assert (mnt / "docs" / "report.bin").read_bytes() == BIG


def test_repair_refused_while_a_writer_holds_the_lease(fs: Fs, opened: Opened) -> None:
    writer = Lease(opened.store, opened.sealer, "other-id", "other-laptop")
    writer.acquire()
    orphan = fs.bucket / layout.pack_name(layout.random_id())
    orphan.write_bytes(b"in flight?")
    done = fs.fsck()  # a live writer's unreferenced packs may be uploads in flight
    assert done.returncode == 0 and "not counted" in done.stdout
    refused = fs.fsck("--repair", "--yes")
    assert refused.returncode == 12 and "'other-laptop'" in refused.stderr
    assert orphan.exists()
    writer.release()
    assert fs.fsck("--repair", "--yes").returncode == 30 and not orphan.exists()


def test_over_s3_corrupt_chunk_and_orphan(
    device: Device, s3_bucket: str, s3_env: MotoServer, tmp_path: Path
) -> None:
    device.init(s3_bucket)
    with device.mounted(s3_bucket, tmp_path / "mnt") as mnt:
        (mnt / "keep.txt").write_text("keep me")
        (mnt / "victim.bin").write_bytes(os.urandom(100_000))
    store = open_store(s3_bucket)
    unlocked = unlock(store, DeviceStore(device.home / "encfs-cloud"), None)
    try:
        md, _, _ = replay(store, Sealer(unlocked.fs_id, unlocked.keys))
    finally:
        unlocked.wipe()
    victim = md.lookup(1, b"victim.bin")
    assert victim is not None
    ref = md.get_chunk(victim, 0)
    assert ref is not None
    client, bucket = s3_env.client(), s3_bucket.removeprefix("s3://")
    key = layout.pack_name(ref.pack)
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[ref.off + 40] ^= 0x40
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    orphan = layout.pack_name(layout.random_id())
    client.put_object(Bucket=bucket, Key=orphan, Body=os.urandom(1000))
    done = device.run("fsck", s3_bucket)
    assert done.returncode == 31, done.stdout + done.stderr
    assert "damaged: /victim.bin: chunk 0 fails authentication" in done.stdout
    assert f"orphan: {orphan} is referenced by nothing" in done.stdout
    assert device.run("fsck", s3_bucket, "--repair", "--yes").returncode == 30
    unlocked = unlock(store, DeviceStore(device.home / "encfs-cloud"), None)
    try:
        md, _, _ = replay(store, Sealer(unlocked.fs_id, unlocked.keys))
    finally:
        unlocked.wipe()
    assert [bytes(r[0]) for r in md.db.execute("SELECT name FROM dentries")] == [b"keep.txt"]


def test_tree_damage_found_and_repaired(fs: Fs, opened: Opened) -> None:
    md, head, _ = replay(opened.store, opened.sealer)
    small = md.get_inode(opened.inode("small.txt"))
    assert small is not None
    small.nlink = 5
    md.put_inode(small)
    md.add_entry(1, b"ghost", 99_999)  # an entry without an inode
    md.create_inode(0o100644, 0, 0, 1)  # an inode without a name
    md.add_entry(opened.inode("docs/deep"), b"loop", opened.inode("docs"))  # a directory cycle
    seq = head.seq + 1
    info = CommitInfo(seq, KIND_SNAPSHOT, head.hash, seq, time.time_ns())
    opened.store.put(layout.commit_name(seq), seal_commit(opened.sealer, info, export_snapshot(md)))
    done = fs.fsck()
    assert done.returncode == 31, done.stdout + done.stderr
    for line in (
        "nlink: /small.txt: link count 5, should be 2",
        "entry: /ghost: points to inode 99999, which does not exist",
        "entry: /docs/deep/loop: a second name for a directory",
        "has no name (unreachable from the root)",
    ):
        assert line in done.stdout
    assert fs.fsck("--repair", "--yes").returncode == 30
    assert fs.fsck().returncode == 0
    left = names_in(opened)
    assert not {"ghost", "loop"} & left and {"small.txt", "hardlink", "deep"} <= left
