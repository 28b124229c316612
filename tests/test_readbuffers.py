"""Buffers of the cold read path: what is shared instead of copied, and that nothing aliases."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from encfs_cloud import layout
from encfs_cloud.daemon.volume import Volume
from encfs_cloud.data import diskcache
from encfs_cloud.data.diskcache import DiskCache
from encfs_cloud.keys import vault
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.store.memory import MemoryStore
from encfs_cloud.tree.metadata import ROOT_INODE
from tests.fixtures_unit import file_writer, with_volume

MiB = 1 << 20
PACK, OTHER = "ef" * 16, "a1" * 16

# The fast KDF and `devices` come from tests/fixtures_unit.py.
pytestmark = pytest.mark.usefixtures("fast_kdf")


def held_writer(cache: DiskCache, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make the cache's writer thread wait before each entry until the returned gate opens,
    so the test sees the queued entries as they were queued (no race with the writer)."""
    gate = threading.Event()
    write = cache._write

    def wait_then_write(name: str, data: bytes | bytearray | memoryview) -> bool:
        assert gate.wait(600), "the test never opened the gate"
        return write(name, data)

    monkeypatch.setattr(cache, "_write", wait_then_write)
    return gate


def test_a_run_is_queued_as_views_of_an_immutable_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks filling most of a GET's answer (`bytes`) go to the disk queue as views of it: no
    copy, no fresh pages. A lone chunk of a bigger answer is copied (a view would keep all of
    it alive), and so are chunks that do not all fit in the queue: all views or none, so the
    queue never keeps more than twice what it counts alive."""
    monkeypatch.setattr(diskcache, "PENDING_MAX", 40 << 10)
    cache = DiskCache(tmp_path / "c", 64 * MiB)
    gate = held_writer(cache, monkeypatch)
    answer = os.urandom(24 << 10)
    view = memoryview(answer)
    cache.put_chunks(PACK, [(0, view[:8192]), (8192, view[8192:16384])])
    cache.put_chunks(PACK, [(16384, view[16384:])])
    later = os.urandom(24 << 10)
    cache.put_chunks(OTHER, [(n, memoryview(later)[n : n + 8192]) for n in (0, 8192, 16384)])
    queued = dict(cache._pending)
    shared = [queued[f"{PACK}-0"], queued[f"{PACK}-2000"]]
    assert all(isinstance(e, memoryview) and e.obj is answer for e in shared)
    assert type(queued[f"{PACK}-4000"]) is bytes, "a lone chunk of the answer: a copy"
    assert type(queued[f"{OTHER}-0"]) is bytes, "the run does not fit whole: copies"
    assert f"{OTHER}-4000" not in queued, "beyond the queue's budget: not kept"
    assert cache.get(PACK, 8192, 8192) == answer[8192:16384], "served from the queue"
    gate.set()
    cache.flush()
    for off in (0, 8192, 16384):
        assert (cache.folder / f"{PACK}-{off:x}").read_bytes() == answer[off : off + 8192]
    assert (cache.folder / f"{OTHER}-2000").read_bytes() == later[8192:16384]


def test_a_changeable_buffer_is_never_queued_by_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Views of a buffer that can be reused (a bytearray) are copied, though they fill it:
    once the buffer holds the next answer, the queued entry and the file written from it
    still hold the first (an alias would put another chunk's bytes under this name)."""
    cache = DiskCache(tmp_path / "c", 64 * MiB)
    gate = held_writer(cache, monkeypatch)
    buf = bytearray(os.urandom(16384))
    first = bytes(buf)
    cache.put_chunks(PACK, [(0, memoryview(buf)[:8192]), (8192, memoryview(buf)[8192:])])
    buf[:] = os.urandom(len(buf))  # the buffer is reused for the next GET
    assert cache.get(PACK, 0, 8192) == first[:8192], "served from the queue"
    gate.set()
    cache.flush()
    assert cache.get(PACK, 8192, 8192) == first[8192:], "served from the file"
    assert (cache.folder / f"{PACK}-0").read_bytes() == first[:8192]


def test_reads_through_the_same_threads_leave_earlier_results_intact(
    devices: DeviceStore,
) -> None:
    """Two cold sequential reads, one after the other through the same fetch threads: what
    the first one returned, left in the chunk cache and queued or written for the disk cache
    is unchanged by the second (a buffer reused while still referenced would change it)."""
    store = MemoryStore()
    vault.init_filesystem(store, devices, None, "laptop")
    files = {b"a": os.urandom(9 * MiB + 333), b"b": os.urandom(9 * MiB + 4444)}
    with_volume(store, devices, file_writer(files), disk_cache_size=0)
    checked: list[str] = []

    async def read_twice(vol: Volume) -> None:
        assert vol.disk is not None
        inos = {name: vol.md.lookup(ROOT_INODE, name) for name in files}
        got: dict[bytes, list[bytes]] = {}
        for name, ino in inos.items():
            assert ino is not None
            size = len(files[name])
            got[name] = [await vol.data.read(ino, size, off, MiB) for off in range(0, size, MiB)]
        ino_a = inos[b"a"]
        assert ino_a is not None
        assert b"".join(got[b"a"]) == files[b"a"] and b"".join(got[b"b"]) == files[b"b"]
        for idx in range(layout.chunk_count(len(files[b"a"]))):
            ref = vol.md.get_chunk(ino_a, idx)
            assert ref is not None
            plain = files[b"a"][idx * MiB : (idx + 1) * MiB]
            cached = vol.cache.get((ino_a, idx), ref.version, count=False)
            if cached is not None:
                assert bytes(cached) == plain, f"chunk {idx} changed in the chunk cache"
                checked.append("cache")
            sealed = vol.disk.get(ref.pack, ref.off, ref.len)
            bucket = store.get(layout.pack_name(ref.pack), ref.off, ref.len)
            if sealed is not None:
                assert sealed == bucket, f"chunk {idx} changed in the disk cache"
                checked.append("disk")

    vol = with_volume(store, devices, read_twice)
    assert "cache" in checked and "disk" in checked, "the checks above looked at something"
    assert vol.data.bytes_fetched >= sum(len(f) for f in files.values())
    assert vol.data.integrity_errors == 0
