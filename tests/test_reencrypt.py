"""Re-encryption after a revocation: complete, idempotent, resumable, and refused when unsafe."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from encfs_cloud import layout
from encfs_cloud.daemon.lease import Lease
from encfs_cloud.daemon.options import VolumeOptions
from encfs_cloud.daemon.volume import Volume
from encfs_cloud.errors import IntegrityError, LeaseHeldError, RollbackError
from encfs_cloud.keys import enrollment, vault
from encfs_cloud.keys import master as K
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.sealed import OBJECT_MAGIC, Sealer
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.memory import MemoryStore
from encfs_cloud.tools import reencrypt
from encfs_cloud.tree.journal import replay
from encfs_cloud.tree.metadata import ROOT_INODE
from encfs_cloud.tree.namespace import Namespace
from tests.fixtures_unit import with_volume

pytestmark = pytest.mark.usefixtures("fast_kdf")

Machine = Callable[[str], DeviceStore]
FILES = {
    b"big.bin": os.urandom(layout.CHUNK_SIZE * 2 + 12345),  # three chunks
    b"small.txt": b"hello " * 100,
    b"empty": b"",
}


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return lambda name: DeviceStore(tmp_path / f"xdg-{name}" / "encfs-cloud")


# --- helpers: a filesystem written and read through the real Volume, without FUSE ----------


def write_files(store: ObjectStore, devices: DeviceStore, files: dict[bytes, bytes]) -> None:
    async def body(vol: Volume) -> None:
        ns = Namespace(vol.md)
        for name, data in files.items():
            ino = vol.md.lookup(ROOT_INODE, name)
            if ino is None:
                ino = ns.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0).id
            node = ns.inode(ino)
            await vol.data.truncate(ino, node.size, 0)
            node.size = await vol.data.write(ino, 0, 0, data) if data else 0
            vol.md.put_inode(node)

    with_volume(store, devices, body)


def read_files(store: ObjectStore, devices: DeviceStore) -> dict[bytes, bytes]:
    vol = Volume(store, vault.unlock(store, devices, None), devices, VolumeOptions(read_only=True))
    found: dict[bytes, bytes] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(vol.run)
            for _, name, node in vol.md.list_entries(ROOT_INODE, 0):
                found[name] = await vol.data.read(node.id, node.size, 0, node.size)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        vol.wipe()
    return found


def object_generation(store: ObjectStore, name: str) -> int:
    magic, gen = struct.unpack(">4sI", store.get(name, 0, 8))
    assert magic == OBJECT_MAGIC
    return int(gen)


def chunk_generations(store: ObjectStore, keys: K.MasterKeys, fs_id: bytes) -> set[int]:
    md, _, _ = replay(store, Sealer(fs_id, keys))
    try:
        return {int(r[0]) for r in md.db.execute("SELECT gen FROM chunks")}
    finally:
        md.db.close()


def three_devices(store: ObjectStore, machine: Machine) -> tuple[vault.Unlocked, vault.Unlocked]:
    """a (the approver), b (to be revoked), c; returns a and b unlocked."""
    a, b, c = machine("a"), machine("b"), machine("c")
    ua, _ = vault.init_filesystem(store, a, None, "laptop")
    for devices, name in ((b, "phone"), (c, "tablet")):
        code = enrollment.request_enrollment(store, devices, None, name)
        enrollment.approve(store, ua, a, code)
    return ua, vault.unlock(store, b, None)


def run(store: ObjectStore, ua: vault.Unlocked, a: DeviceStore) -> reencrypt.Report:
    with reencrypt.exclusive(store, ua, "memory://not-mounted") as fenced:
        return reencrypt.reencrypt(fenced, ua, a)


# --- tests ------------------------------------------------------------------------------------


def test_reencrypt_leaves_nothing_under_the_old_generation(
    store: ObjectStore, machine: Machine
) -> None:
    a = machine("a")
    ua, ub = three_devices(store, machine)
    write_files(store, a, FILES)
    old_packs = {o.name for o in store.list(layout.DATA_PREFIX)}
    stolen = ub.keys.copy()
    enrollment.revoke_device(store, ua, a, ub.device.device_id)
    write_files(store, a, {b"after.txt": b"written after the revocation"})
    assert chunk_generations(store, ua.keys, ua.fs_id) == {1, 2}
    seen: list[tuple[int, int]] = []
    with reencrypt.exclusive(store, ua, "memory://not-mounted") as fenced:
        report = reencrypt.reencrypt(fenced, ua, a, lambda d, t: seen.append((d, t)))
    assert report.committed and report.generation == 2 and report.chunks == 4
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] == len(old_packs)
    assert chunk_generations(store, ua.keys, ua.fs_id) == {2}
    commits = [o.name for o in store.list(layout.META_PREFIX)]
    assert len(commits) == 1 and object_generation(store, commits[0]) == 2
    assert object_generation(store, layout.LEASE_NAME) == 2
    assert not old_packs & {o.name for o in store.list(layout.DATA_PREFIX)}
    # Nothing in the bucket opens with what the revoked device kept.
    thief = Sealer(ua.fs_id, stolen)
    with pytest.raises(IntegrityError):
        thief.open_object(commits[0], "commit", store.get(commits[0]))
    md, _, _ = replay(store, Sealer(ua.fs_id, ua.keys))
    for ino, idx, pack, off, length, plain_len, version, digest in md.db.execute(
        "SELECT inode, idx, pack, off, len, plain_len, version, digest FROM chunks"
    ):
        blob = store.get(layout.pack_name(pack), off, length)
        with pytest.raises(IntegrityError):
            thief.open_chunk(ino, idx, version, 1, plain_len, blob, digest, pack)
    md.db.close()
    # Every device still enrolled reads it all; a second run has nothing to do.
    assert read_files(store, machine("c")) == {
        **FILES,
        b"after.txt": b"written after the revocation",
    }
    again = run(store, ua, a)
    assert (again.chunks, again.committed, again.objects_deleted) == (0, False, 0)


class CrashingStore(MemoryStore):
    """Fails the n-th PUT of a pack: an interrupted run, as a crash or a lost network does."""

    def __init__(self) -> None:
        super().__init__()
        self.crash_at: int | None = None
        self.pack_puts = 0

    def put(
        self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        if name.startswith(layout.DATA_PREFIX) and self.crash_at is not None:
            self.pack_puts += 1
            if self.pack_puts == self.crash_at:
                raise OSError("crash")
        return super().put(name, data, if_none_match=if_none_match, if_match=if_match)


def test_interrupted_run_resumes_and_cleans_up(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reencrypt, "COMMIT_EVERY_BYTES", 1)  # a delta after every pack
    store = CrashingStore()
    a = machine("a")
    ua, ub = three_devices(store, machine)
    files = {f"f{i}".encode(): os.urandom(300_000 + i) for i in range(6)}
    for name, data in files.items():  # one commit, so one pack, each
        write_files(store, a, {name: data})
    enrollment.revoke_device(store, ua, a, ub.device.device_id)
    store.crash_at = 3
    with pytest.raises(OSError):
        run(store, ua, a)
    partly = chunk_generations(store, ua.keys, ua.fs_id)
    assert partly == {1, 2}  # the deltas before the crash kept their progress
    store.crash_at = None
    report = run(store, ua, a)
    assert 0 < report.chunks < len(files)  # only what was left
    assert chunk_generations(store, ua.keys, ua.fs_id) == {2}
    live = {o.name for o in store.list(layout.DATA_PREFIX)}
    md, _, _ = replay(store, Sealer(ua.fs_id, ua.keys))
    assert live == {layout.pack_name(p) for p, _, _ in md.all_packs()}  # no orphan left
    md.db.close()
    assert len(list(store.list(layout.META_PREFIX))) == 1
    assert read_files(store, a) == files


def test_refused_while_another_writer_holds_the_lease(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    ua, ub = three_devices(store, machine)
    write_files(store, a, FILES)
    enrollment.revoke_device(store, ua, a, ub.device.device_id)
    uc = vault.unlock(store, machine("c"), None)
    mount = Lease(store, Sealer(uc.fs_id, uc.keys), uc.device.device_id, "tablet")
    mount.acquire()
    before = sorted(o.name for o in store.list())
    with pytest.raises(LeaseHeldError, match="tablet"):
        run(store, ua, a)
    assert sorted(o.name for o in store.list()) == before
    mount.release()
    assert run(store, ua, a).committed


def test_refuses_a_rolled_back_bucket(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    ua, ub = three_devices(store, machine)
    write_files(store, a, {b"x": b"1"})
    old = {o.name: store.get(o.name) for o in store.list(layout.META_PREFIX)}
    write_files(store, a, {b"x": b"2"})
    for o in list(store.list(layout.META_PREFIX)):
        store.delete(o.name)
    for name, data in old.items():
        store.put(name, data)
    enrollment.revoke_device(store, ua, a, ub.device.device_id)
    with pytest.raises(RollbackError):
        run(store, ua, a)


def test_orphans_and_never_committed_filesystems(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    ua, ub = three_devices(store, machine)
    store.put(layout.pack_name("ab" * 16), os.urandom(1000))  # a crashed mount's upload
    enrollment.revoke_device(store, ua, a, ub.device.device_id)
    assert run(store, ua, a).objects_deleted == 1
    write_files(store, a, FILES)
    store.put(layout.pack_name("cd" * 16), os.urandom(1000))
    report = run(store, ua, a)
    assert report.objects_deleted == 1 and report.chunks == 0
    assert read_files(store, a) == FILES


def test_mounted_here_matches_normalised_sources() -> None:
    key = reencrypt._source_key
    assert key("file:///a//b/") == key("file:///a/b")
    assert key("s3://bucket/prefix/") == key("s3://bucket/prefix")
    assert key("s3://bucket/p") != key("s3://bucket/q")
    assert reencrypt._unescape_mounts(r"file:///a\040b") == "file:///a b"
    assert reencrypt.mounted_here("file:///surely/not/mounted", os.urandom(16)) is None


def test_chunks_sealed_under_the_generation_their_metadata_names(
    store: ObjectStore, machine: Machine
) -> None:
    """A revocation adopted by a running mount must not strand chunks already in its open pack.

    uploader.add_chunk records `keys.current` in the chunk's metadata when the chunk enters the
    open pack, but _build_pack seals it later with whatever `keys.current` is then; the commit
    adopts the new generation (Volume._refresh_keys) in between, so the chunk is sealed under
    generation 2 while its metadata says 1 and it can never be read again.
    """
    a = machine("a")
    ua, ub = three_devices(store, machine)
    write_files(store, a, {b"seed": b"x"})
    mount = Volume(store, vault.unlock(store, a, None), a, VolumeOptions())
    data = os.urandom(layout.CHUNK_SIZE)  # a full chunk goes into the open pack at once

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(mount.run)
            ino = Namespace(mount.md).create(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0).id
            size = await mount.data.write(ino, 0, 0, data)
            node = Namespace(mount.md).inode(ino)
            node.size = size
            mount.md.put_inode(node)
            # Meanwhile another device revokes b; this mount adopts it at its next commit.
            await trio.to_thread.run_sync(
                enrollment.revoke_device, store, ua, a, ub.device.device_id
            )
            await mount.flush()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        mount.wipe()
    assert read_files(store, a)[b"f"] == data
