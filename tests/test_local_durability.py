"""file:// packs are fsync'ed together, before any commit (or other non-pack object) shows."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from encfs_cloud import layout
from encfs_cloud.daemon.volume import Volume
from encfs_cloud.errors import StoreError
from encfs_cloud.keys import vault
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.store.local import LocalStore
from encfs_cloud.tree.metadata import ROOT_INODE
from encfs_cloud.tree.namespace import Namespace
from tests.fixtures_unit import file_writer, with_volume

Event = tuple[str, str]  # ("fsync", path of the file or folder) or ("publish", object path)


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Event]]:
    """Every fsync and every rename into place, in order, with the real calls made too."""
    seen: list[Event] = []
    real_fsync: Callable[[int], None] = os.fsync
    real_replace = os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_replace(src, dst)
        seen.append(("publish", os.fspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    yield seen


def _durable_before(events: list[Event], path: str, publish: str) -> bool:
    """`path` and its folder were fsync'ed before `publish` was renamed into place."""
    cut = events.index(("publish", publish))
    synced = {p for kind, p in events[:cut] if kind == "fsync"}
    return path in synced and os.path.dirname(path) in synced


def test_commit_is_published_only_after_its_packs_are_durable(
    tmp_path: Path, events: list[Event]
) -> None:
    store = LocalStore(str(tmp_path / "bucket"))
    store.put("encfs-cloud", b"header", if_none_match=True)
    packs = [layout.pack_name(f"{i:032x}") for i in range(3)]
    for name in packs:
        store.put(name, os.urandom(4096))
    paths = [str(tmp_path / "bucket" / name) for name in packs]
    # Written and renamed into place, but not one fsync yet: they are flushed together.
    assert not [p for kind, p in events if kind == "fsync" and p in paths]
    commit = layout.commit_name(1)
    store.put(commit, b"names the packs", if_none_match=True)
    commit_path = str(tmp_path / "bucket" / commit)
    for path in paths:
        assert _durable_before(events, path, commit_path)
    # ... and the commit itself is durable when its put returns: its data before the rename,
    # its folder after it.
    cut = events.index(("publish", commit_path))
    meta = os.path.dirname(commit_path)
    assert any(k == "fsync" and os.path.dirname(p) == meta for k, p in events[:cut])
    assert ("fsync", meta) in events[cut:]
    assert [store.get(name) for name in packs] == [
        (tmp_path / "bucket" / n).read_bytes() for n in packs
    ]


def test_each_pack_is_flushed_once(tmp_path: Path, events: list[Event]) -> None:
    store = LocalStore(str(tmp_path))
    store.put(layout.pack_name("a" * 32), b"1")
    store.put(layout.commit_name(1), b"c1", if_none_match=True)
    first = len(events)
    store.put(layout.commit_name(2), b"c2", if_none_match=True)
    later = [p for kind, p in events[first:] if kind == "fsync"]
    assert str(tmp_path / "data" / ("a" * 32)) not in later


def test_other_writes_deletes_and_close_are_barriers_too(
    tmp_path: Path, events: list[Event]
) -> None:
    store = LocalStore(str(tmp_path))
    for i, step in enumerate(
        [
            lambda: store.put("lease", b"x"),
            lambda: store.delete(layout.commit_name(7)),
            store.close,
        ]
    ):
        pack = str(tmp_path / "data" / f"{i:032x}")
        store.put(layout.pack_name(f"{i:032x}"), b"p")
        assert ("fsync", pack) not in events
        step()
        assert ("fsync", pack) in events and ("fsync", str(tmp_path / "data")) in events


def test_a_pack_that_cannot_be_made_durable_fails_the_commit(
    tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(str(tmp_path))
    bad = layout.pack_name("b" * 32)
    good = layout.pack_name("c" * 32)
    store.put(bad, b"lost")
    store.put(good, b"kept")
    synced = os.fsync

    def failing(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("b" * 32):
            raise OSError(5, "Input/output error")
        synced(fd)

    monkeypatch.setattr(os, "fsync", failing)
    commit = layout.commit_name(1)
    with pytest.raises(StoreError, match="durable"):
        store.put(commit, b"names both", if_none_match=True)
    # The commit was never published, and the pack whose bytes may be gone is not left
    # looking whole; the other one is durable and stays.
    assert store.head(commit) is None
    assert store.head(bad) is None
    assert store.get(good) == b"kept"
    # The committer retries that commit, which names the lost pack: it must not land, or
    # the fsync(2) waiting for it would return success for data that is gone.
    monkeypatch.setattr(os, "fsync", synced)
    with pytest.raises(StoreError, match="fsync failed"):
        store.put(commit, b"names both, again", if_none_match=True)
    with pytest.raises(StoreError, match="fsync failed"):
        store.delete(layout.commit_name(0))
    assert store.head(commit) is None
    assert store.get(good) == b"kept"  # reads go on


def test_a_pack_deleted_before_the_barrier_is_skipped(tmp_path: Path, events: list[Event]) -> None:
    store = LocalStore(str(tmp_path))
    name = layout.pack_name("d" * 32)
    store.put(name, b"short-lived")
    store.delete(name)
    store.put(layout.commit_name(1), b"c", if_none_match=True)
    assert store.head(name) is None
    assert ("fsync", str(tmp_path / "data" / ("d" * 32))) not in events


@pytest.mark.usefixtures("fast_kdf")
def test_a_volume_publishes_each_commit_after_the_packs_before_it(
    tmp_path: Path, devices: DeviceStore, events: list[Event]
) -> None:
    """Through the real uploader and committer: every pack renamed into place before a commit
    was fsync'ed (file and folder) before that commit was renamed into place, so a crash at
    any point leaves no commit naming a pack that is not durable."""
    root = tmp_path / "bucket"
    store = LocalStore(str(root))
    vault.init_filesystem(store, devices, None, "laptop")
    files = {f"f{n}".encode(): os.urandom(3 << 20) for n in range(4)}  # > one 8 MiB pack

    with_volume(store, devices, file_writer(files, commit_each=True))
    data_dir = str(root / "data")
    packs = [p for kind, p in events if kind == "publish" and os.path.dirname(p) == data_dir]
    commits = [i for i, (kind, p) in enumerate(events) if kind == "publish" and "/meta/" in p]
    assert len(packs) >= 2 and len(commits) >= 4
    for cut in commits:
        before = [p for kind, p in events[:cut] if kind == "publish" and p in packs]
        for pack in before:
            assert _durable_before(events, pack, events[cut][1]), (pack, events[cut][1])
    found: dict[bytes, bytes] = {}

    async def read(vol: Volume) -> None:
        ns = Namespace(vol.md)
        for name in files:
            ino = vol.md.lookup(ROOT_INODE, name)
            assert ino is not None
            node = ns.inode(ino)
            found[name] = await vol.data.read(ino, node.size, 0, node.size)

    with_volume(store, devices, read)
    assert found == files
