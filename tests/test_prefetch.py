"""Sequential read-ahead: whole packs per GET, a window that widens, nothing for random reads;
the kernel reads a whole chunk per FUSE request."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from encfs_cloud import layout
from encfs_cloud.daemon.mount import READ_AHEAD_KB, bdi_of
from encfs_cloud.daemon.options import VolumeOptions
from encfs_cloud.daemon.volume import Volume
from encfs_cloud.data.filedata import PREFETCH_MAX, PREFETCH_STEP
from encfs_cloud.keys import vault
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.sealed import sealed_chunk_len
from encfs_cloud.store.memory import MemoryStore
from encfs_cloud.tree.metadata import ROOT_INODE, ChunkRef
from encfs_cloud.tree.namespace import Namespace
from tests.fixtures_mount import Device, needs_fuse
from tests.fixtures_unit import with_volume

CHUNKS = 48
READ_SIZE = 128 << 10  # what the kernel sends for a buffered sequential read


class CountingStore(MemoryStore):
    """A memory store whose ranged GETs are counted and take a little while, as over a
    network, so prefetches really overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.gets: list[tuple[str, int, int | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def get(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        if not name.startswith(layout.DATA_PREFIX):
            return super().get(name, start, length)
        with self.lock:
            self.gets.append((name, start, length))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(0.02)
            return super().get(name, start, length)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCFS_CLOUD_TEST_FAST_KDF", "1")
    monkeypatch.setenv("ENCFS_CLOUD_MACHINE_ID", "test-machine")


@pytest.fixture
def written(tmp_path: Path) -> Iterator[tuple[CountingStore, DeviceStore, bytes]]:
    """A filesystem holding one CHUNKS-chunk file, written through a real Volume."""
    store = CountingStore()
    devices = DeviceStore(tmp_path / "xdg" / "encfs-cloud")
    vault.init_filesystem(store, devices, None, "test")
    data = os.urandom(CHUNKS * layout.CHUNK_SIZE)

    async def body(vol: Volume) -> None:
        node = Namespace(vol.md).create(ROOT_INODE, b"big", stat.S_IFREG | 0o644, 0, 0)
        for off in range(0, len(data), layout.CHUNK_SIZE):
            node.size = await vol.data.write(
                node.id, node.size, off, data[off : off + layout.CHUNK_SIZE]
            )
        vol.md.put_inode(node)

    with_volume(store, devices, body, disk_cache_size=0)
    store.gets.clear()
    yield store, devices, data
    store.close()


def read_back(store: CountingStore, devices: DeviceStore, ranges: list[tuple[int, int]]) -> bytes:
    """Read the ranges in order through a cold read-only Volume; return them concatenated."""
    # No disk cache: these tests count what the bucket is asked for.
    vol = Volume(
        store,
        vault.unlock(store, devices, None),
        devices,
        VolumeOptions(read_only=True, disk_cache_size=0),
    )
    out: list[bytes] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(vol.run)
            ino = vol.md.lookup(ROOT_INODE, b"big")
            assert ino is not None
            size = vol.md.get_inode(ino).size
            for off, length in ranges:
                out.append(await vol.data.read(ino, size, off, length))
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        vol.wipe()
    return b"".join(out)


def test_sequential_read_fetches_whole_packs_several_at_once(
    written: tuple[CountingStore, DeviceStore, bytes],
) -> None:
    store, devices, data = written
    ranges = [(off, READ_SIZE) for off in range(0, len(data), READ_SIZE)]
    assert read_back(store, devices, ranges) == data
    packs = {name for name, _, _ in store.gets}
    # One GET per pack (a pack holds several chunks), plus at most one split run per pack
    # where the reader caught up with the read-ahead before it was scheduled.
    assert len(store.gets) <= 2 * len(packs), store.gets
    assert len(store.gets) < CHUNKS // 2
    fetched = sum(length or 0 for _, _, length in store.gets)
    assert fetched < len(data) * 1.02  # nothing fetched twice
    assert store.max_in_flight >= 3  # the window widened past two runs in flight


def test_random_reads_fetch_only_what_they_touch(
    written: tuple[CountingStore, DeviceStore, bytes],
) -> None:
    store, devices, data = written
    picks = [30, 5, 41, 12]
    ranges = [(i * layout.CHUNK_SIZE + 4096, 4096) for i in picks]
    expected = b"".join(data[off : off + n] for off, n in ranges)
    assert read_back(store, devices, ranges) == expected
    assert len(store.gets) == len(picks)
    assert all(length is not None and length < 2 * layout.CHUNK_SIZE for _, _, length in store.gets)


def one_chunk_gets(store: CountingStore) -> list[int]:
    """Offsets of the GETs that fetched exactly one whole chunk (a reader's own miss)."""
    whole = sealed_chunk_len(layout.CHUNK_SIZE)
    return [start for _, start, length in store.gets if length == whole]


def test_whole_chunk_read_from_the_start_prefetches_at_once(
    written: tuple[CountingStore, DeviceStore, bytes],
) -> None:
    store, devices, data = written
    ranges = [(off, layout.CHUNK_SIZE) for off in range(0, len(data), layout.CHUNK_SIZE)]
    assert read_back(store, devices, ranges) == data
    # Only chunk 0 is fetched on its own: the read-ahead starts with the first request
    # instead of waiting for a second one (which cost a second lone GET, a round trip each).
    assert one_chunk_gets(store) == [0], store.gets


def test_small_read_from_the_start_prefetches_nothing(
    written: tuple[CountingStore, DeviceStore, bytes],
) -> None:
    store, devices, data = written
    assert read_back(store, devices, [(0, 4096)]) == data[:4096]  # a header, as `file` reads
    assert len(store.gets) == 1, store.gets


class RecordingNursery:
    """Stands in for the nursery the read-ahead starts its fetches in: records each run's
    chunk indices instead of fetching, so what is scheduled when can be checked exactly."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []

    def start_soon(self, fn: object, run: list[tuple[int, int, object]], event: object) -> None:
        self.runs.append([idx for _, idx, _ in run])


BIG_CHUNKS = 160  # wide enough for the window to reach PREFETCH_MAX well before the end


def test_window_is_topped_up_a_pack_at_a_time(tmp_path: Path) -> None:
    """A sequential reader keeps (almost) a whole window scheduled ahead of it, one pack per
    top-up; the old rule waited for half the window to drain, then sent the GETs in a
    burst that all finished together while the reader waited for the first of them."""
    store = MemoryStore()
    devices = DeviceStore(tmp_path / "xdg" / "encfs-cloud")
    vault.init_filesystem(store, devices, None, "test")
    vol = Volume(
        store,
        vault.unlock(store, devices, None),
        devices,
        VolumeOptions(disk_cache_size=0, cache_size=1 << 30),
    )
    sealed = sealed_chunk_len(layout.CHUNK_SIZE)
    calls: list[list[list[int]]] = []  # per read: the runs it scheduled
    leads: list[int] = []  # per read: chunks scheduled past the one read

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(vol.run)
            # Only the chunk map matters to the planning: packs of 8 chunks back to back.
            node = Namespace(vol.md).create(ROOT_INODE, b"big", stat.S_IFREG | 0o644, 0, 0)
            for idx in range(BIG_CHUNKS):
                pack = f"{idx // 8:032x}"
                if idx % 8 == 0:
                    vol.md.add_pack(pack, 8 * sealed)
                ref = ChunkRef(pack, idx % 8 * sealed, sealed, layout.CHUNK_SIZE, idx + 1, 1, b"")
                vol.md.set_chunk(node.id, idx, ref)
            size = BIG_CHUNKS * layout.CHUNK_SIZE
            rec = RecordingNursery()
            vol.data.nursery = rec  # type: ignore[assignment]
            scheduled = 0
            for idx in range(BIG_CHUNKS):
                off = idx * layout.CHUNK_SIZE
                vol.data._maybe_prefetch(node.id, range(idx, idx + 1), size, off, layout.CHUNK_SIZE)
                for run in rec.runs:
                    assert run[0] == max(scheduled, 1), (idx, rec.runs)  # no gap, no repeat
                    assert run == list(range(run[0], run[-1] + 1))
                    scheduled = run[-1] + 1
                    assert scheduled % 8 == 0  # runs end where packs end: one GET each
                calls.append(rec.runs[:])
                rec.runs.clear()
                leads.append(scheduled - idx)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        vol.wipe()
    assert vol.data._max_window() == PREFETCH_MAX
    assert leads[0] > 1  # the first whole-chunk read from offset 0 started the read-ahead
    steady = range(41, BIG_CHUNKS - PREFETCH_MAX - 8)  # the window is at its widest
    assert all(leads[i] >= PREFETCH_MAX - PREFETCH_STEP for i in steady), leads
    # A pack or two at a time (the window's end falls just past a pack, whose slack brings
    # the next one along), not half a window's worth at once.
    assert all(len(calls[i]) <= 2 for i in steady), [(i, calls[i]) for i in steady if calls[i]]
    assert all(len(run) == 8 for i in steady for run in calls[i]), calls


def test_bdi_of_reads_escaped_and_stacked_mounts() -> None:
    mountinfo = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 0:41 / /tmp/a\\040b rw,nosuid - fuse.encfs-cloud file:///x rw\n"
        "41 22 0:42 / /mnt rw - fuse.encfs-cloud s3://b rw\n"
        "42 41 0:43 / /mnt rw - fuse.encfs-cloud s3://c rw\n"
    )
    assert bdi_of(Path("/tmp/a b"), mountinfo) == "0:41"
    assert bdi_of(Path("/mnt"), mountinfo) == "0:43"
    assert bdi_of(Path("/elsewhere"), mountinfo) is None


@needs_fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="the bdi's read_ahead_kb is writable by root only")
def test_mount_reads_a_chunk_per_request(device: Device, local_source: str, tmp_path: Path) -> None:
    device.init(local_source)
    with device.mounted(local_source, tmp_path / "mnt") as mnt:
        real = Path(os.path.realpath(mnt))
        bdi = bdi_of(real, Path("/proc/self/mountinfo").read_text())
        assert bdi is not None
        ra = Path(f"/sys/class/bdi/{bdi}/read_ahead_kb").read_text().strip()
        assert int(ra) == READ_AHEAD_KB == 1024
        payload = os.urandom(3 * layout.CHUNK_SIZE + 5)
        (mnt / "f").write_bytes(payload)
        assert (mnt / "f").read_bytes() == payload
