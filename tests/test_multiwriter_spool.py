"""Mounts meeting the bucket late: a spool merged over another writer's commits, and commits
that wait while an exclusive operation holds the filesystem."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from encfs_cloud import layout
from encfs_cloud.daemon.lease import Lease
from encfs_cloud.daemon.options import VolumeOptions
from encfs_cloud.daemon.volume import Volume
from encfs_cloud.errors import StoreError, UnreachableError
from encfs_cloud.keys import vault
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.memory import MemoryStore
from encfs_cloud.tree.metadata import ROOT_INODE
from encfs_cloud.tree.namespace import Namespace


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCFS_CLOUD_TEST_FAST_KDF", "1")
    monkeypatch.setenv("ENCFS_CLOUD_MACHINE_ID", "test-machine")


class CommitsFail(MemoryStore):
    """The bucket as a mount sees it while offline for commits (uploads still land)."""

    def __init__(self, shared: MemoryStore) -> None:
        super().__init__()
        self._objects, self._lock = shared._objects, shared._lock

    def put(
        self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        if name.startswith(layout.META_PREFIX):
            raise UnreachableError("offline")
        return super().put(name, data, if_none_match=if_none_match, if_match=if_match)


async def _write(vol: Volume, files: dict[bytes, bytes]) -> None:
    ns = Namespace(vol.md)
    for name, data in files.items():
        ino = vol.md.lookup(ROOT_INODE, name)
        if ino is None:
            ino = ns.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0).id
        node = ns.inode(ino)
        await vol.data.truncate(ino, node.size, 0)
        node.size = await vol.data.write(ino, 0, 0, data)
        vol.md.put_inode(node)


def _session(
    vol: Volume, files: dict[bytes, bytes], *, offline: bool = False
) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(vol.run)
            await _write(vol, files)
            try:
                await vol.flush()
            except StoreError:
                assert offline
                assert vol.spool() > 0
            for _, name, node in vol.md.list_entries(ROOT_INODE, 0, 1000):
                found[name] = await vol.data.read(node.id, node.size, 0, node.size)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        vol.wipe()
    return found


def test_spooled_commits_are_merged_over_another_writers(tmp_path: Path) -> None:
    shared = MemoryStore()
    devices = DeviceStore(tmp_path / "xdg" / "encfs-cloud")
    unlocked, _ = vault.init_filesystem(shared, devices, None, "laptop")
    unlocked.wipe()
    options = VolumeOptions(sync_timeout=0.3)
    _session(
        Volume(shared, vault.unlock(shared, devices, None), devices, options),
        {b"shared.txt": b"base"},
    )
    # Two mounts of this device; the first cannot commit and spools at its unmount.
    offline = Volume(CommitsFail(shared), vault.unlock(shared, devices, None), devices, options)
    online = Volume(shared, vault.unlock(shared, devices, None), devices, options)
    _session(
        offline, {b"offline.txt": b"written offline", b"shared.txt": b"offline edit"}, offline=True
    )
    _session(online, {b"online.txt": b"written online", b"shared.txt": b"online edit"})
    spool_dir = devices.folder(unlocked.fs_id) / "spool"
    assert spool_dir.is_dir()
    found = _session(Volume(shared, vault.unlock(shared, devices, None), devices, options), {})
    assert found[b"online.txt"] == b"written online"
    assert found[b"offline.txt"] == b"written offline"
    assert found[b"shared.txt"] == b"online edit"  # committed first, keeps the name
    (copy,) = [n for n in found if n.startswith(b"shared (conflict from laptop ")]
    assert found[copy] == b"offline edit"
    assert not spool_dir.exists()
    # A fresh mount sees the same: the merge was committed.
    again = _session(Volume(shared, vault.unlock(shared, devices, None), devices, options), {})
    assert again == found
    assert os.environ["ENCFS_CLOUD_TEST_FAST_KDF"] == "1"


def test_an_exclusive_operation_pauses_a_mounts_commits(tmp_path: Path) -> None:
    """A mount that missed an exclusive operation's start (it was silent) meets its lease at
    the next commit: the commit stays queued, and goes once the lease is given back."""
    store = MemoryStore()
    devices = DeviceStore(tmp_path / "xdg" / "encfs-cloud")
    unlocked, _ = vault.init_filesystem(store, devices, None, "laptop")
    repair = Lease(store, Sealer(unlocked.fs_id, unlocked.keys), "other-id", "fsck-elsewhere")
    vol = Volume(
        store, vault.unlock(store, devices, None), devices, VolumeOptions(sync_timeout=0.5)
    )
    outcome: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(vol.run)
            await _write(vol, {b"during.txt": b"while fsck --repair runs"})
            repair.acquire()
            try:
                await vol.flush()
            except StoreError as exc:
                outcome.append(str(exc))
            assert vol.committer.queue, "the commit stays queued"
            repair.release()
            vol._exclusive_checked = -1e9  # the next check is due at once (normally 30 s)
            await vol.flush()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        vol.wipe()
        unlocked.wipe()
    assert outcome and "exclusive operation" in outcome[0]
    found = _session(Volume(store, vault.unlock(store, devices, None), devices), {})
    assert found == {b"during.txt": b"while fsck --repair runs"}
