"""Several mounts of one filesystem on one device share its disk cache folder (issue 11)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

from encfs_cloud.daemon.options import VolumeOptions
from encfs_cloud.daemon.volume import Volume
from encfs_cloud.data.cachefolders import default_folder
from encfs_cloud.data.diskcache import DiskCache
from encfs_cloud.keys import vault
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.tree.metadata import ROOT_INODE
from encfs_cloud.tree.namespace import Namespace
from tests.fixtures_unit import with_volume
from tests.test_diskcache import CountingStore, reader

MiB = 1 << 20


def packs_in(folder: Path) -> set[str]:
    """The spilled packs in a mount's spill folder (not the temporaries being written)."""
    return {p.name for p in folder.iterdir() if "." not in p.name}


# The fast KDF and `devices` come from tests/fixtures_unit.py.
pytestmark = pytest.mark.usefixtures("fast_kdf")


@pytest.fixture
def store(devices: DeviceStore) -> CountingStore:
    s = CountingStore()
    vault.init_filesystem(s, devices, None, "laptop")
    return s


def test_a_crashed_mounts_spill_goes_and_a_live_ones_stays(tmp_path: Path) -> None:
    """Mounts of one filesystem on one device share the cache folder: a starting one removes
    the spill folder of a mount that died (its lock went with the process), never that of a
    running one (issue 11: two mount points; before, every start deleted all of `spill/`)."""
    folder = tmp_path / "c"
    live = DiskCache(folder, 1 << 20)
    live_pack = os.urandom(8192)
    live.spill("ab" * 16, live_pack)
    crash = (
        "import os, sys; from pathlib import Path;"
        "from encfs_cloud.data.diskcache import DiskCache;"
        "c = DiskCache(Path(sys.argv[1]), 1 << 20); c.spill('cd' * 16, os.urandom(8192));"
        "c.put_chunk('cd' * 16, 0, b'x' * 100); os._exit(0)"  # dies without closing
    )
    subprocess.run([sys.executable, "-c", crash, str(folder)], check=True, timeout=120)
    crashed = [p for p in (folder / "spill").iterdir() if p != live.spill_folder]
    assert len(crashed) == 1 and (crashed[0] / ("cd" * 16)).is_file()
    (folder / "spill" / ("ef" * 16)).write_bytes(b"an older version's spilled pack")
    (folder / "x.1234.tmp").write_bytes(b"an older version's interrupted write")
    starting = DiskCache(folder, 1 << 20)
    assert sorted((folder / "spill").iterdir()) == sorted(
        [live.spill_folder, starting.spill_folder]
    )
    assert not (folder / "x.1234.tmp").exists()
    assert bytes(live.read_spilled("ab" * 16)) == live_pack
    assert live.get("ab" * 16, 100, 50) == live_pack[100:150]
    live.spill_landed("ab" * 16)  # uploaded: an ordinary entry the other mount finds too
    assert DiskCache(folder, 1 << 20).get("ab" * 16, 0, 8192) == live_pack
    live.close()
    assert not live.spill_folder.exists(), "a clean unmount leaves no spill folder"
    starting.close()


def test_two_caches_share_a_folder_within_one_budget(tmp_path: Path) -> None:
    """Two mounts writing, reading and evicting in one folder at once: every read is whole
    and right or a miss, nothing half-written becomes an entry, and the budget holds for the
    folder (each takes in what the other wrote), not once per mount."""
    folder, capacity = tmp_path / "c", 256 << 10
    caches = [DiskCache(folder, capacity), DiskCache(folder, capacity)]

    def blob(pack: str, n: int) -> bytes:
        return (pack.encode() + n.to_bytes(4, "big")) * 128  # 4.5 KiB, known from its name

    packs = ["a1" * 16, "b2" * 16]
    wrong: list[str] = []

    def work(me: int) -> None:
        cache = caches[me]
        for n in range(300):
            cache.put_chunk(packs[me], n * 8192, blob(packs[me], n))
            for pack in packs:  # the other's entries too: written, evicted or not yet
                for k in (n, n // 2, max(n - 40, 0)):
                    got = cache.get(pack, k * 8192, len(blob(pack, k)))
                    if got is not None and got != blob(pack, k):
                        wrong.append(f"{pack} {k}")
            if n % 50 == 0:
                cache.flush()

    threads = [threading.Thread(target=work, args=(me,)) for me in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    for cache in caches:
        cache.close()
    assert not wrong
    entries = [p for p in folder.iterdir() if p.is_file()]
    assert entries, "nothing was kept"
    for path in entries:
        pack, off = path.name.split("-")
        assert path.read_bytes() == blob(pack, int(off, 16) // 8192), path.name
    on_disk = sum(p.stat().st_size for p in entries)
    # Each writes up to an eighth of the budget before it scans the folder again.
    assert on_disk <= capacity + capacity // 4, on_disk
    assert list((folder / "spill").iterdir()) == []


def test_a_second_mount_starting_keeps_the_first_ones_spilled_packs(
    store: CountingStore, devices: DeviceStore
) -> None:
    """Two read-write mounts of one device, both with the default cache folder: the first
    spills packs the bucket does not take yet; the second starts (before, it deleted them:
    the first's uploads then failed for good) and writes too; a cold third reads both."""
    data = os.urandom(64 * MiB)
    other = b"written by the second mount " * 1000

    async def body(vol: Volume) -> None:
        assert vol.disk is not None
        store.gate.clear()  # the bucket takes no pack: what is over the memory limit spills
        ns = Namespace(vol.md)
        node = ns.create(ROOT_INODE, b"burst", stat.S_IFREG | 0o644, 0, 0)
        with trio.move_on_after(300) as guard:  # a deadlock guard, not a timing assertion
            for off in range(0, len(data), MiB):
                node.size = await vol.data.write(node.id, node.size, off, data[off : off + MiB])
        assert not guard.cancelled_caught, "the writer stalled while the bucket was blocked"
        vol.md.put_inode(node)
        spilled = packs_in(vol.disk.spill_folder)  # more may be being written meanwhile
        assert vol.uploader.bytes_spilled > 0 and spilled
        unlocked = vault.unlock(store, devices, None)
        second = Volume(store, unlocked, devices, VolumeOptions(cache_size=64 * MiB))
        try:
            assert second.disk is not None and second.disk.folder == vol.disk.folder
            async with trio.open_nursery() as nursery:
                await nursery.start(second.run)
                assert spilled <= packs_in(vol.disk.spill_folder), "spilled packs were lost"
                ns2 = Namespace(second.md)
                node2 = ns2.create(ROOT_INODE, b"second", stat.S_IFREG | 0o644, 0, 0)
                node2.size = await second.data.write(node2.id, 0, 0, other)
                second.md.put_inode(node2)
                got = await vol.data.read(node.id, node.size, 40 * MiB, MiB)
                assert got == data[40 * MiB : 41 * MiB], "a spilled chunk reads back"
                store.gate.set()
                await second.flush()
                nursery.cancel_scope.cancel()
        finally:
            second.wipe()

    vol = with_volume(store, devices, body, cache_size=64 * MiB)
    assert vol.uploader.errors == 0, "an upload of a spilled pack failed"
    found: dict[bytes, bytes] = {}
    with_volume(store, devices, reader(found), disk_cache_size=0)
    assert found == {b"burst": data, b"second": other}
    spill = default_folder(vol.unlocked.fs_id) / "spill"
    assert list(spill.iterdir()) == [], "a clean unmount leaves no spill folder"
