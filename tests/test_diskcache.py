"""The sealed disk cache: re-reads after remount, tampering, eviction, spill, read-around."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from encfs_cloud import layout
from encfs_cloud.daemon.options import parse_mount_options
from encfs_cloud.daemon.volume import Volume
from encfs_cloud.data.cachefolders import default_folder, remove_all
from encfs_cloud.data.diskcache import DiskCache
from encfs_cloud.data.filedata import READ_AROUND_BYTES
from encfs_cloud.errors import UsageError
from encfs_cloud.keys import vault
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.store.memory import MemoryStore
from encfs_cloud.tree.metadata import ROOT_INODE
from encfs_cloud.tree.namespace import Namespace
from tests.fixtures_unit import file_writer, with_volume

MiB = 1 << 20


class CountingStore(MemoryStore):
    """Counts GETs of packs, and can hold pack PUTs until released (a slow bucket)."""

    def __init__(self) -> None:
        super().__init__()
        self.pack_gets = 0
        self.ranges: list[tuple[str, int, int | None]] = []
        self.gate = threading.Event()
        self.gate.set()

    def get(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        if name.startswith(layout.DATA_PREFIX):
            self.pack_gets += 1
            self.ranges.append((name, start, length))
        return super().get(name, start, length)

    def put(
        self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        if name.startswith(layout.DATA_PREFIX):
            assert self.gate.wait(600), "the test never released the gate"
        return super().put(name, bytes(data), if_none_match=if_none_match, if_match=if_match)


# The fast KDF and `devices` come from tests/fixtures_unit.py.
pytestmark = pytest.mark.usefixtures("fast_kdf")


@pytest.fixture
def store(devices: DeviceStore) -> CountingStore:
    s = CountingStore()
    vault.init_filesystem(s, devices, None, "laptop")
    return s


def reader(found: dict[bytes, bytes]) -> Callable[[Volume], object]:
    async def body(vol: Volume) -> None:
        for _, name, node in vol.md.list_entries(ROOT_INODE, 0):
            found[name] = await vol.data.read(node.id, node.size, 0, node.size)

    return body


FILES = {
    b"big": os.urandom(3 * MiB + 777),
    b"small": b"a small file " * 50,
    b"other": os.urandom(5000),
}


def test_reread_after_remount_is_served_from_disk(
    store: CountingStore, devices: DeviceStore
) -> None:
    with_volume(store, devices, file_writer(FILES))
    found: dict[bytes, bytes] = {}
    again = with_volume(store, devices, reader(found))
    assert found == FILES
    assert store.pack_gets == 0, "uploaded packs stay sealed on disk: no GET after a remount"
    assert again.data.bytes_fetched == 0 and again.disk is not None and again.disk.hits > 0
    # Without the disk cache the same reads go to the bucket.
    found.clear()
    without = with_volume(store, devices, reader(found), disk_cache_size=0)
    assert found == FILES and store.pack_gets > 0 and without.data.bytes_fetched > 0


def test_cache_holds_only_private_ciphertext(
    store: CountingStore, devices: DeviceStore, tmp_path: Path
) -> None:
    vol = with_volume(store, devices, file_writer(FILES))
    assert vol.disk is not None
    folder = vol.disk.folder
    assert folder == default_folder(vol.unlocked.fs_id)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    entries = [p for p in folder.rglob("*") if p.is_file()]
    assert entries
    bucket = {o.name: store.get(o.name) for o in store.list(layout.DATA_PREFIX)}
    for path in entries:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        blob = path.read_bytes()
        assert FILES[b"small"][:40] not in blob
        assert blob == bucket["data/" + path.name], "a cache file is the bucket's object"


def test_tampered_cache_file_is_dropped_and_refetched(
    store: CountingStore, devices: DeviceStore
) -> None:
    vol = with_volume(store, devices, file_writer(FILES))
    assert vol.disk is not None
    for path in vol.disk.folder.iterdir():
        if path.is_file():
            blob = bytearray(path.read_bytes())
            for off in range(0, len(blob), 4096):
                blob[off] ^= 0x5A  # every chunk of every cached pack is damaged
            path.write_bytes(bytes(blob))
    found: dict[bytes, bytes] = {}
    again = with_volume(store, devices, reader(found))
    assert found == FILES, "a bad cache file never gives wrong plaintext"
    assert store.pack_gets > 0 and again.data.integrity_errors == 0
    assert again.disk is not None and again.disk.dropped > 0
    # What the re-fetch cached is good: the next remount reads locally again.
    before = store.pack_gets
    found.clear()
    with_volume(store, devices, reader(found))
    assert found == FILES and store.pack_gets == before


def test_truncated_cache_file_is_a_miss(store: CountingStore, devices: DeviceStore) -> None:
    vol = with_volume(store, devices, file_writer(FILES))
    assert vol.disk is not None
    for path in vol.disk.folder.iterdir():
        if path.is_file():
            os.truncate(path, 100)
    found: dict[bytes, bytes] = {}
    with_volume(store, devices, reader(found))
    assert found == FILES and store.pack_gets > 0


def test_eviction_keeps_the_budget_and_the_recently_used(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", 64 << 10)  # entries up to 16 KiB
    for n in range(40):
        cache.put_chunk("ab" * 16, n * 4096, os.urandom(4096))
        cache.flush()  # written by the cache's own thread: now on disk and in the LRU
        cache.get("ab" * 16, 0, 4096)  # chunk 0 is used all the time
        assert cache.bytes <= cache.capacity
    assert cache.get("ab" * 16, 0, 4096) is not None, "the most recently used survives"
    assert cache.get("ab" * 16, 4096, 4096) is None, "the least recently used went first"
    on_disk = sum(p.stat().st_size for p in (tmp_path / "c").iterdir() if p.is_file())
    assert on_disk == cache.bytes <= cache.capacity
    # The order and the contents survive a reopen (a remount), within a smaller budget too.
    again = DiskCache(tmp_path / "c", 16 << 10)
    assert again.bytes <= 16 << 10
    assert again.get("ab" * 16, 0, 4096) is not None


def test_a_memory_hit_counts_as_a_use(tmp_path: Path) -> None:
    """A chunk read from the memory cache is used too: its disk entry becomes the newest,
    in memory at once and, once saved, in the order a reopen (a remount) finds."""
    pack = "cd" * 16
    cache = DiskCache(tmp_path / "c", 64 << 10)  # sixteen 4 KiB entries
    for n in range(16):
        cache.put_chunk(pack, n * 4096, os.urandom(4096))
    cache.flush()
    cache.used(pack, 0)  # the oldest, used again (no disk read: served from memory)
    cache.put_chunk(pack, 16 * 4096, os.urandom(4096))
    cache.flush()
    assert cache.holds(pack, 0) and not cache.holds(pack, 4096), "the unused oldest went"
    cache.used(pack, 2 * 4096)
    cache.save_order()
    again = DiskCache(tmp_path / "c", 8 << 10)  # a smaller budget keeps the two newest
    assert [again.holds(pack, n * 4096) for n in (2, 16)] == [True, True]
    assert again.bytes == 8 << 10


def test_wipe_removes_default_and_named_cache_folders(
    store: CountingStore, devices: DeviceStore, tmp_path: Path
) -> None:
    named = tmp_path / "elsewhere" / "cache"
    vol = with_volume(store, devices, file_writer(FILES), cache_dir=named)
    with_volume(store, devices, reader({}))
    fs_id = vol.unlocked.fs_id
    assert named.is_dir() and default_folder(fs_id).is_dir()
    removed = remove_all(devices.folder(fs_id), fs_id)
    assert set(removed) == {named / fs_id.hex(), default_folder(fs_id)}
    assert not (named / fs_id.hex()).exists() and not default_folder(fs_id).exists()
    assert named.is_dir(), "the folder the user named stays; only ours inside it goes"


def test_dirty_data_spills_to_disk_instead_of_stalling(
    store: CountingStore, devices: DeviceStore
) -> None:
    """With the bucket refusing to finish any upload, 96 MiB (six times the dirty limit) are
    still written: the packs that do not fit in memory wait sealed on disk."""
    data = os.urandom(96 * MiB)
    spilled: list[int] = []

    async def body(vol: Volume) -> None:
        store.gate.clear()
        ns = Namespace(vol.md)
        node = ns.create(ROOT_INODE, b"burst", stat.S_IFREG | 0o644, 0, 0)
        with trio.move_on_after(200) as guard:  # a deadlock guard, not a timing assertion
            for off in range(0, len(data), MiB):
                node.size = await vol.data.write(node.id, node.size, off, data[off : off + MiB])
        assert not guard.cancelled_caught, "the writer stalled while the bucket was blocked"
        vol.md.put_inode(node)
        assert vol.cache.dirty_bytes + vol.cache.inflight_bytes <= 48 * MiB
        spilled.append(vol.uploader.bytes_spilled)
        # Spilled chunks read back (from the sealed spill files) before any upload landed.
        assert await vol.data.read(node.id, node.size, 80 * MiB, MiB) == data[80 * MiB : 81 * MiB]
        store.gate.set()  # the flush after the body must now reach the bucket

    with_volume(store, devices, body, cache_size=64 * MiB)
    assert spilled[0] >= 32 * MiB
    found: dict[bytes, bytes] = {}
    with_volume(store, devices, reader(found), disk_cache_size=0)
    assert found == {b"burst": data}


def test_a_pack_that_would_wait_for_an_upload_slot_spills_at_once(
    store: CountingStore, devices: DeviceStore
) -> None:
    """Below the dirty limit too: with every upload slot taken (the bucket holds them), the
    next full pack is sealed to disk and its plaintext released while the writer goes on,
    instead of waiting in memory until the writer hits the limit and must wait for a spill."""
    data = os.urandom(40 * MiB)  # five packs of eight 1 MiB chunks; the dirty limit is 48 MiB
    seen: list[tuple[int, int]] = []

    async def body(vol: Volume) -> None:
        store.gate.clear()
        ns = Namespace(vol.md)
        node = ns.create(ROOT_INODE, b"five-packs", stat.S_IFREG | 0o644, 0, 0)
        for off in range(0, len(data), MiB):
            node.size = await vol.data.write(node.id, node.size, off, data[off : off + MiB])
        vol.md.put_inode(node)
        assert not vol.cache.pressure, "the writer never reached the dirty limit"
        with trio.move_on_after(60):  # a deadlock guard, not a timing assertion
            while not vol.uploader.bytes_spilled:
                await trio.sleep(0.01)
        seen.append((vol.uploader.bytes_spilled, vol.cache.dirty_bytes + vol.cache.inflight_bytes))
        store.gate.set()

    with_volume(store, devices, body, cache_size=256 * MiB)
    spilled, in_memory = seen[0]
    assert spilled >= 8 * MiB, "the fifth pack waited in memory for a slot"
    assert in_memory <= 32 * MiB + 4096, "only the four packs being uploaded stay in memory"
    found: dict[bytes, bytes] = {}
    with_volume(store, devices, reader(found), disk_cache_size=0)
    assert found == {b"five-packs": data}


def test_read_around_get_shows_only_offset_and_pack_size(
    store: CountingStore, devices: DeviceStore
) -> None:
    """Issue #10: a cold small file's GET must not show how many small chunks follow it or
    where the live ones end. It asks for the fixed, aligned window of the pack that holds the
    chunk (the store cuts it at the pack's end), whatever lies inside, and one GET still serves
    the neighbours, read in directory order (random ids: not the order they were written)."""
    files = {f"s{n:02d}".encode(): os.urandom(1000 + 37 * n) for n in range(40)}
    with_volume(store, devices, file_writer(files))

    async def delete_some(vol: Volume) -> None:  # dead chunks between the live ones
        for n in range(1, 40, 3):
            ino = vol.md.lookup(ROOT_INODE, f"s{n:02d}".encode())
            assert ino is not None
            vol.data.forget(ino)
            vol.md.drop_chunks(ino, 0)
            vol.md.remove_entry(ROOT_INODE, f"s{n:02d}".encode())
            vol.md.delete_inode(ino)

    with_volume(store, devices, delete_some, disk_cache_size=0)
    store.ranges.clear()
    found: dict[bytes, bytes] = {}
    with_volume(store, devices, reader(found), disk_cache_size=0)
    assert found == {k: v for k, v in files.items() if int(k[1:]) % 3 != 1}
    assert len(store.ranges) == 1, "one GET serves every small file of the pack"
    assert [(start, length) for _, start, length in store.ranges] == [(0, READ_AROUND_BYTES)]


def test_read_around_serves_chunks_stored_before_the_one_read(
    store: CountingStore, devices: DeviceStore
) -> None:
    """Read newest first (the reverse of the pack's order), the small files still come with
    one GET: the window is the pack's aligned slot, not a range from the chunk onwards."""
    files = {f"r{n:02d}".encode(): os.urandom(3000 + 11 * n) for n in range(30)}
    with_volume(store, devices, file_writer(files), disk_cache_size=0)
    store.ranges.clear()
    found: dict[bytes, bytes] = {}

    async def newest_first(vol: Volume) -> None:
        for name in sorted(files, reverse=True):
            ino = vol.md.lookup(ROOT_INODE, name)
            assert ino is not None
            node = vol.md.get_inode(ino)
            assert node is not None
            found[name] = await vol.data.read(ino, node.size, 0, node.size)

    with_volume(store, devices, newest_first, disk_cache_size=0)
    assert found == files
    assert [(start, length) for _, start, length in store.ranges] == [(0, READ_AROUND_BYTES)]


def test_mount_options_for_the_disk_cache(tmp_path: Path) -> None:
    request = parse_mount_options("file:///b", tmp_path, ["disk_cache_size=2G,cache_dir=rel/cache"])
    assert request.volume_options.disk_cache_size == 2 << 30
    assert request.volume_options.cache_dir == Path(os.path.abspath("rel/cache"))
    off = parse_mount_options("file:///b", tmp_path, ["disk_cache_size=0"])
    assert off.volume_options.disk_cache_size == 0
    assert parse_mount_options("file:///b", tmp_path, []).volume_options.disk_cache_size is None
    with pytest.raises(UsageError):
        parse_mount_options("file:///b", tmp_path, ["disk_cache_size=1M"])


def test_eviction_under_pressure_through_a_volume(
    store: CountingStore, devices: DeviceStore
) -> None:
    """Reading 24 MiB of files through a 16 MiB disk cache: it stays within its budget, the
    files read back whole, and a remount finds the most recently read ones on disk."""
    files = {f"f{n:03d}".encode(): os.urandom(200_000) for n in range(120)}
    with_volume(store, devices, file_writer(files), disk_cache_size=0)
    found: dict[bytes, bytes] = {}
    vol = with_volume(store, devices, reader(found), disk_cache_size=16 * MiB)
    assert found == files
    assert vol.disk is not None and 0 < vol.disk.bytes <= 16 * MiB
    on_disk = sum(p.stat().st_size for p in vol.disk.folder.iterdir() if p.is_file())
    assert on_disk == vol.disk.bytes
    store.ranges.clear()
    last: dict[bytes, bytes] = {}

    newest = list(found)[-20:]  # read last (in directory order: random ids), so still cached

    async def read_newest(v: Volume) -> None:
        for name in newest:
            ino = v.md.lookup(ROOT_INODE, name)
            assert ino is not None
            node = v.md.get_inode(ino)
            assert node is not None
            last[name] = await v.data.read(ino, node.size, 0, node.size)

    with_volume(store, devices, read_newest, disk_cache_size=16 * MiB)
    assert last == {k: files[k] for k in newest}
    assert store.ranges == [], "the most recently used entries survived the eviction"


def test_names_that_are_not_pack_ids_never_become_paths(tmp_path: Path) -> None:
    """A forged commit could name a pack "../x": the cache neither writes nor reads it."""
    cache = DiskCache(tmp_path / "c", 1 << 20)
    (tmp_path / "c" / "a-folder").mkdir()  # something not ours in the folder is left alone
    for bad in ("../escape", "a/b", "", "AB" * 16, "x" * 65):
        cache.put_chunk(bad, 0, b"sealed")
        cache.put_pack(bad, b"sealed")
        assert cache.get(bad, 0, 6) is None
        with pytest.raises(OSError):
            cache.spill(bad, b"sealed")
    assert not (tmp_path / "escape").exists()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a-folder", "spill"]
    assert DiskCache(tmp_path / "c", 1 << 20).bytes == 0
