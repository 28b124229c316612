"""Compaction: the planner, a rewritten file compacted, the mount's loop; freed packs go."""

from __future__ import annotations

import os
import random
import stat

import pytest
import trio

from encfs_cloud import layout
from encfs_cloud.daemon.volume import Volume
from encfs_cloud.data import compactor
from encfs_cloud.data.presence import Reaper
from encfs_cloud.keys import vault
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.tree.metadata import ROOT_INODE, Inode
from encfs_cloud.tree.namespace import Namespace
from tests.fixtures_unit import with_volume
from tests.test_diskcache import CountingStore, MiB, reader

# The fast KDF and `devices` come from tests/fixtures_unit.py.
pytestmark = pytest.mark.usefixtures("fast_kdf")


@pytest.fixture
def store(devices: DeviceStore) -> CountingStore:
    s = CountingStore()
    vault.init_filesystem(s, devices, None, "laptop")
    return s


def bucket_ratio(store: CountingStore, vol: Volume) -> float:
    """Bytes of packs in the bucket per live byte the chunk map uses."""
    stored = sum(o.size for o in store.list(layout.DATA_PREFIX))
    live = sum(used for _, _, used in vol.md.all_packs())
    return stored / live


def test_compaction_after_random_rewrites(store: CountingStore, devices: DeviceStore) -> None:
    """Random rewrites leave dead chunks in old packs; compaction copies the live ones (no
    decryption), the next commit drops the old packs, and every byte reads back."""
    size = 24 * MiB
    content = bytearray(os.urandom(size))
    rng = random.Random(13)
    ratios: list[float] = []

    async def body(vol: Volume) -> None:
        # The grace after which freed packs may go (60 s) is for other mounts' readers; this
        # test is about compaction, not that wait. Every other rule of deletion still holds.
        vol.committer.reaper = Reaper(vol.presence, grace=0)
        ns = Namespace(vol.md)
        node = ns.create(ROOT_INODE, b"db", stat.S_IFREG | 0o644, 0, 0)
        node.size = await vol.data.write(node.id, 0, 0, bytes(content))
        vol.md.put_inode(node)
        await vol.flush()
        for _ in range(6):  # each round a commit: rewritten chunks leave dead ones behind
            for _ in range(6):
                off = rng.randrange(size // 4096) * 4096
                piece = os.urandom(4096)
                content[off : off + 4096] = piece
                await vol.data.write(node.id, node.size, off, piece)
            await vol.flush()
        ratios.append(bucket_ratio(store, vol))
        assert vol.compactor.worth_it(1.05)
        assert await vol.compactor.compact() > 0
        await vol.flush()  # commits the moved rows: the emptied packs are dead
        # A dead pack goes only once every live mount has applied the commit that freed it
        # (here this mount's own advertisement, by its follow loop); the idle mount's commit
        # loop then deletes it in the background, with no further change. Poll, no timing.
        with trio.move_on_after(120):
            while bucket_ratio(store, vol) > 1.05:
                await trio.sleep(0.05)
        ratios.append(bucket_ratio(store, vol))

    with_volume(store, devices, body, poll_interval=0.05)
    assert ratios[0] > 1.3, f"the rewrites should have inflated storage: {ratios}"
    assert ratios[1] <= 1.05, f"compaction left stored/live at {ratios[1]:.3f}"
    found: dict[bytes, bytes] = {}
    with_volume(store, devices, reader(found), disk_cache_size=0)
    assert found == {b"db": bytes(content)}


def test_an_idle_mount_deletes_what_its_last_commit_freed(
    store: CountingStore, devices: DeviceStore
) -> None:
    """Freed packs wait until every live mount applied the commit that freed them; a mount
    with nothing more to commit (say, right after compacting) still deletes them then."""
    gone: list[bool] = []

    async def body(vol: Volume) -> None:
        # A short grace: the freeing commit's own reap finds it not yet over (this mount is
        # the only live one, so nothing else holds them), and only the idle loop can delete.
        vol.committer.reaper = Reaper(vol.presence, grace=1.0)
        ns = Namespace(vol.md)
        node = ns.create(ROOT_INODE, b"tmp", stat.S_IFREG | 0o644, 0, 0)
        node.size = await vol.data.write(node.id, 0, 0, os.urandom(3 * MiB))
        vol.md.put_inode(node)
        await vol.flush()
        packs = {o.name for o in store.list(layout.DATA_PREFIX)}
        vol.data.forget(node.id)
        vol.md.drop_chunks(node.id, 0)
        vol.md.remove_entry(ROOT_INODE, b"tmp")
        vol.md.delete_inode(node.id)
        await vol.flush()  # frees the packs; their grace has not run out yet
        assert packs & {o.name for o in store.list(layout.DATA_PREFIX)}
        assert not vol.committer.has_changes(), "idle from here: no commit would reap"
        with trio.move_on_after(120):  # poll, no timing
            while packs & {o.name for o in store.list(layout.DATA_PREFIX)}:
                await trio.sleep(0.05)
        gone.append(not packs & {o.name for o in store.list(layout.DATA_PREFIX)})

    with_volume(store, devices, body, poll_interval=0.05, commit_interval=0.05)
    assert gone == [True], "the freed packs stayed in the bucket"


def test_compaction_plan_frees_space_or_does_nothing() -> None:
    step, target = layout.PACK_STEP, layout.PACK_TARGET
    # One nearly empty small pack alone: its copy would be as large; nothing to gain.
    assert compactor.plan([("a", 64 << 10, 4096), ("b", 3 * step, 3 * MiB)]) == []
    # Many nearly empty small packs merge into one: worth it, emptiest first.
    tiny = [(f"t{n:02d}", 256 << 10, 8192 + n) for n in range(64)]
    chosen = compactor.plan([*tiny, ("full", target, target - 100)])
    assert chosen == [p for p, _, _ in tiny] and "full" not in chosen
    # Half-dead full packs are rewritten until stored/live reaches the goal; busy ones never.
    half = [(f"h{n}", target, target // 2) for n in range(10)]
    chosen = compactor.plan(half, busy=frozenset({"h0"}))
    assert "h0" not in chosen and len(chosen) == 9


def test_background_compaction_of_a_mount(store: CountingStore, devices: DeviceStore) -> None:
    """The mount's own loop notices the inflated ratio and compacts, with no one asking."""
    content = bytearray(os.urandom(16 * MiB))
    rng = random.Random(7)

    async def body(vol: Volume) -> None:
        ns = Namespace(vol.md)
        node = ns.create(ROOT_INODE, b"img", stat.S_IFREG | 0o644, 0, 0)
        node.size = await vol.data.write(node.id, 0, 0, bytes(content))
        vol.md.put_inode(node)
        await vol.flush()
        for _ in range(5):
            for _ in range(6):
                off = rng.randrange(len(content) // 4096) * 4096
                piece = os.urandom(4096)
                content[off : off + 4096] = piece
                await vol.data.write(node.id, node.size, off, piece)
            await vol.flush()
        assert vol.compactor.worth_it()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vol.compactor.run, 0.01)
            with trio.move_on_after(120):  # poll: no timing assertion
                while not vol.compactor.packs_compacted:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert vol.compactor.packs_compacted > 0
        assert not vol.compactor.worth_it()

    with_volume(store, devices, body)
    found: dict[bytes, bytes] = {}
    with_volume(store, devices, reader(found), disk_cache_size=0)
    assert found == {b"img": bytes(content)}


async def _db_with_rewrites(vol: Volume, chunks: list[int]) -> Inode:
    """A 64 MiB file (8 full packs), then one commit rewriting 4 KiB in each of `chunks`."""
    ns = Namespace(vol.md)
    node = ns.create(ROOT_INODE, b"db", stat.S_IFREG | 0o644, 0, 0)
    node.size = await vol.data.write(node.id, 0, 0, os.urandom(64 * MiB))
    vol.md.put_inode(node)
    await vol.flush()
    for idx in chunks:
        await vol.data.write(node.id, node.size, idx * layout.CHUNK_SIZE, os.urandom(4096))
    await vol.flush()
    return node


def test_compaction_waits_while_chunks_die_faster_than_the_grace(
    store: CountingStore, devices: DeviceStore
) -> None:
    """Above the trigger, a check right after heavy rewriting (more written since the last
    check than the live bytes x elapsed / grace) skips: the packs empty themselves before a
    pass could free anything. A check after little writing compacts."""
    seen: list[float | bool | None] = []

    async def body(vol: Volume) -> None:
        # 3 of the 8 chunks of each pack rewritten: 88 packs' worth of 64 live, above 1.25.
        node = await _db_with_rewrites(vol, [p * 8 + k for p in range(8) for k in range(3)])
        c = vol.compactor
        assert c.worth_it()
        seen.append(c.due(1.0))  # 88 MiB uploaded in "1 s" over 64 MiB live: churning
        seen.append(c.churning)
        await vol.data.write(node.id, node.size, 3 * layout.CHUNK_SIZE, os.urandom(4096))
        await vol.flush()  # a change (not quiet), 1 MiB in an hour: no longer churning
        seen.append(c.due(3600.0))
        seen.append(c.churning)

    with_volume(store, devices, body)
    assert seen == [None, True, compactor.BUSY_AIM, False]


def test_a_quiet_mount_compacts_down_to_the_goal(
    store: CountingStore, devices: DeviceStore
) -> None:
    """Between the goal and the trigger a mount compacts once nothing changed since its
    previous check (the writer stopped), so it settles below GOAL, not at up to TRIGGER."""
    seen: list[object] = []

    async def body(vol: Volume) -> None:
        await _db_with_rewrites(vol, [p * 8 for p in range(8)])  # 72 packs' worth of 64 live
        c = vol.compactor
        stored, live = compactor.ratio(p for p in vol.md.all_packs() if p[2] > 0)
        seen.append(compactor.GOAL * live < stored < compactor.TRIGGER * live)
        seen.append(c.due(3600.0))  # the first look: below the trigger
        seen.append(c.due(3600.0))  # nothing changed since: quiet
        seen.append(await c.compact(compactor.AIM) > 0)  # as the mount's loop does
        await vol.flush()
        stored, live = compactor.ratio(p for p in vol.md.all_packs() if p[2] > 0)
        seen.append(stored <= compactor.AIM * live)
        seen.append(c.due(3600.0) or c.due(3600.0))  # at the goal: nothing more to do

    with_volume(store, devices, body)
    assert seen == [True, None, compactor.AIM, True, True, None]
    found: dict[bytes, bytes] = {}
    with_volume(store, devices, reader(found), disk_cache_size=0)
    assert len(found[b"db"]) == 64 * MiB


def test_a_pass_stopped_by_the_unmount_leaves_no_pack_unnamed(
    store: CountingStore, devices: DeviceStore
) -> None:
    """`stop` (the unmount calls it before its final commit) ends a pass under way and waits
    for it: every pack in the bucket is then in the pack table that commit carries. (A pass
    that went on after the final commit left its new packs in the bucket, named nowhere.)"""
    seen: list[object] = []
    content: dict[bytes, bytes] = {}

    async def body(vol: Volume) -> None:
        await _db_with_rewrites(vol, [p * 8 + k for p in range(8) for k in range(3)])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vol.compactor.compact, compactor.AIM)
            await trio.sleep(0)  # the pass starts: it reads its first pack in a thread
            await vol.compactor.stop()
            seen.append(vol.compactor.closing)
        seen.append(await vol.compactor.compact(compactor.AIM))  # stopped: no pass
        await vol.flush()
        names = {o.name for o in store.list(layout.DATA_PREFIX)}
        seen.append(names <= {layout.pack_name(p) for p, _, _ in vol.md.all_packs()})

    with_volume(store, devices, body)
    assert seen == [True, 0, True]
    with_volume(store, devices, reader(content), disk_cache_size=0)
    assert len(content[b"db"]) == 64 * MiB
