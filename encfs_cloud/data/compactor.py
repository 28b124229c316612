"""Compaction: re-seal the live chunks of mostly dead packs into new packs, then switch."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import trio

from encfs_cloud import layout
from encfs_cloud.data.diskcache import DiskCache
from encfs_cloud.data.presence import DELETE_GRACE
from encfs_cloud.data.uploader import Uploader
from encfs_cloud.errors import EncfsCloudError, IntegrityError, StoreError
from encfs_cloud.keys.sealed import Sealer, sealed_chunk_len
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree.metadata import ChunkRef, Metadata

log = logging.getLogger(__name__)

GOAL = 1.05  # compaction stops once stored bytes are at most this times the live bytes
# A mount's pass aims this low: the planner's estimate lands just above its aim, and commits
# and keys count too (1 GiB rewritten at random: aiming at GOAL left 1.052 in packs, 1.060 in
# the bucket, and too little above GOAL for a second pass to be worth MIN_RECLAIM).
AIM = 1.02
# While files are still being written a pass stops here: its last packs would be the fullest
# (up to MAX_LIVE_FRACTION live), and every byte copied keeps its old pack in the bucket for
# the deletion grace too. Measured with 5 rewrites/s of 1 GiB: a pass down to AIM copied
# 690 MB to free 250 MB, and the ratio stood at 2.1 (median; 2.5 at most) as old packs waited.
BUSY_AIM = 1.15
TRIGGER = 1.25  # a mount starts compacting above this ratio (fsck --repair: above GOAL)
MAX_LIVE_FRACTION = 0.9  # packs fuller than this are never rewritten (write amplification)
MIN_RECLAIM = 4 << 20  # a mount does not bother for less
CHECK_INTERVAL = 15.0  # one sum over the pack table per check (see design.md "Compaction")
# A freed pack waits DELETE_GRACE before it may go: compaction frees nothing sooner, so live
# chunks rewritten faster than once per grace die before it would pay.

Move = tuple[int, int, ChunkRef, ChunkRef]  # inode, index, old place, new place


@dataclass
class NewPack:
    """A pack being filled with re-sealed chunks (all of one key generation)."""

    id: str = field(default_factory=layout.random_id)
    parts: list[bytes | bytearray | memoryview] = field(default_factory=list)
    size: int = 0
    moves: list[Move] = field(default_factory=list)

    def blob(self) -> bytearray:
        out = bytearray(layout.pack_class(self.size))
        off = 0
        for part in self.parts:
            out[off : off + len(part)] = part
            off += len(part)
        out[off:] = os.urandom(len(out) - off)  # as the uploader pads: random, like ciphertext
        return out


def ratio(packs: Iterable[tuple[str, int, int]]) -> tuple[int, int]:
    """(stored, live) bytes over the pack table; packs of unknown size count as their live."""
    stored = live = 0
    for _, size, used in packs:
        stored += size if size > 0 else used
        live += used
    return stored, live


def copy_size(live: int) -> int:
    """What `live` bytes of copied chunks take once packed: full packs, then one padded."""
    full, rest = divmod(live, layout.PACK_TARGET)
    return full * layout.PACK_TARGET + (layout.pack_class(rest) if rest else 0)


def plan(
    packs: Iterable[tuple[str, int, int]],
    goal: float = GOAL,
    busy: frozenset[str] = frozenset(),
    min_reclaim: int = 1 << 20,
) -> list[str]:
    """The emptiest packs whose rewrite brings stored/live down to `goal` (or as close as
    packs at most MAX_LIVE_FRACTION live allow); none if that frees less than `min_reclaim`."""
    table = [(p, size, used) for p, size, used in packs if size > 0 and used > 0]
    total, live = ratio(table)
    chosen: list[str] = []
    chosen_size = chosen_live = 0
    for pack, size, used in sorted(table, key=lambda t: t[2] / t[1]):
        if total - chosen_size + copy_size(chosen_live) <= goal * live:
            break
        if pack in busy or used > MAX_LIVE_FRACTION * size:
            continue
        chosen.append(pack)
        chosen_size += size
        chosen_live += used
    if chosen_size - copy_size(chosen_live) < min_reclaim:
        return []
    return chosen


def read_live(store: ObjectStore, pack: str, rows: list[tuple[int, int, ChunkRef]]) -> list[bytes]:
    """The sealed bytes of `rows` (one pack, sorted by offset) with one ranged GET."""
    start, end = rows[0][2].off, max(r.off + r.len for _, _, r in rows)
    blob = memoryview(store.get(layout.pack_name(pack), start, end - start))
    if len(blob) < end - start:
        raise StoreError(f"object {layout.pack_name(pack)} is shorter than its chunks")
    return [bytes(blob[r.off - start : r.off - start + r.len]) for _, _, r in rows]


class Repacker:
    """Fills new packs with the live chunks of old ones, one open pack per key generation.

    Each chunk is opened and sealed again under the new pack's subkey (chunk keys are per pack,
    which bounds how many seals one key makes), with the same generation, inode, index and
    version, so its associated data and its row's digest stay as they were. A chunk that does
    not open stays where it is: fsck reports it, compaction never launders it.
    """

    def __init__(self, sealer: Sealer) -> None:
        self.sealer = sealer
        self._open: dict[int, NewPack] = {}

    def add(self, ino: int, idx: int, ref: ChunkRef, sealed: bytes) -> NewPack | None:
        """Move one chunk; returns a pack that is full (the chunk went into a fresh one)."""
        try:
            plain = self.sealer.open_chunk(
                ino, idx, ref.version, ref.gen, ref.plain_len, sealed, ref.digest, ref.pack
            )
        except IntegrityError as exc:
            log.error("compaction: inode %d chunk %d left in place: %s", ino, idx, exc)
            return None
        full = None
        size = sealed_chunk_len(ref.plain_len)
        pack = self._open.get(ref.gen)
        if pack is not None and pack.size + size > layout.PACK_TARGET:
            full = self._open.pop(ref.gen)
            pack = None
        if pack is None:
            pack = self._open[ref.gen] = NewPack()
        out = bytearray(size)
        self.sealer.seal_chunk_into(
            ino, idx, ref.version, bytes(plain), memoryview(out), ref.gen, pack.id
        )
        new = ChunkRef(pack.id, pack.size, size, ref.plain_len, ref.version, ref.gen, ref.digest)
        pack.parts.append(out)
        pack.size += size
        pack.moves.append((ino, idx, ref, new))
        return full

    def add_pack(
        self, store: ObjectStore, pack: str, rows: list[tuple[int, int, ChunkRef]]
    ) -> list[NewPack]:
        """Read one old pack's live chunks and move them all; returns the packs filled."""
        full = []
        for (ino, idx, ref), sealed in zip(rows, read_live(store, pack, rows), strict=True):
            done = self.add(ino, idx, ref, sealed)
            if done is not None:
                full.append(done)
        return full

    def finish(self) -> list[NewPack]:
        packs = list(self._open.values())
        self._open.clear()
        return packs


def switch(md: Metadata, pack: NewPack, size: int) -> int:
    """The new pack is in the bucket: point the chunks that did not change meanwhile at it.

    Runs without awaiting, so a commit sees either all of the pack's chunks moved or none.
    Returns how many moved; the rest are dead in the new pack (a write replaced them).
    """
    md.add_pack(pack.id, size)
    moved = 0
    for ino, idx, old, new in pack.moves:
        if md.get_chunk(ino, idx) == old:
            md.set_chunk(ino, idx, new)
            moved += 1
    return moved


def compact_now(md: Metadata, store: ObjectStore, sealer: Sealer, packs: list[str]) -> int:
    """Rewrite `packs` synchronously (fsck --repair holds the lease); returns the bytes copied.

    The old packs end up with no live chunk: the caller's recount lists them as dead, and
    they are deleted once the commit that no longer names them is durable.
    """
    repacker, copied = Repacker(sealer), 0
    ready: list[NewPack] = []
    for pack in packs:
        rows = md.chunks_in_pack(pack, 0, 1 << 62)
        if rows:
            ready += repacker.add_pack(store, pack, rows)
    for new in ready + repacker.finish():
        blob = new.blob()
        store.put(layout.pack_name(new.id), bytes(blob))
        switch(md, new, len(blob))
        copied += new.size
    return copied


class Compactor:
    """The background compaction of a read-write mount: every CHECK_INTERVAL seconds, when
    `due` says so, rewrite the emptiest packs down to AIM.

    Store calls run in worker threads; the metadata is touched only on the trio thread, and
    the chunk rows of a new pack switch in one step after it landed (see `switch`). Old packs
    are not deleted here: they become dead packs, which the committer deletes after the next
    durable commit, by the same rule as every other deletion.
    """

    def __init__(
        self,
        md: Metadata,
        store: ObjectStore,
        sealer: Sealer,
        limiter: trio.CapacityLimiter,
        *,
        uploader: Uploader,
        stopped: Callable[[], bool],
        disk: DiskCache | None = None,
    ) -> None:
        self.md = md
        self.store = store
        self.sealer = sealer
        self.limiter = limiter
        self.uploader = uploader  # packs it is filling or sending are never candidates
        self.stopped = stopped  # the mount may no longer write (lease lost, revoked)
        self.disk = disk
        self.bytes_copied = 0
        self.packs_compacted = 0
        self._last: tuple[int, int] | None = None  # (stored, live) at the previous check
        self._uploaded = uploader.bytes_uploaded  # the uploader's counter then
        self.churning = False  # the last check skipped: chunks die faster than a pass pays
        self.closing = False  # the mount is unmounting: no more passes (see `stop`)
        self._pass = trio.Lock()

    def _busy(self) -> frozenset[str]:
        ids = set(self.uploader.pending)
        if self.uploader.open_pack is not None:
            ids.add(self.uploader.open_pack.id)
        return frozenset(ids)

    def worth_it(self, goal: float = TRIGGER) -> bool:
        # Dead packs wait for the next durable commit to be deleted: not compaction's job.
        stored, live = ratio(p for p in self.md.all_packs() if p[2] > 0)
        return stored > goal * live and stored - live >= MIN_RECLAIM

    def due(self, elapsed: float) -> float | None:
        """The goal of a pass to make now, `elapsed` seconds after the previous check, or None.

        Above TRIGGER, unless the files are rewritten so fast that a live chunk lasts less
        than DELETE_GRACE (written since the last check > live bytes x elapsed / DELETE_GRACE):
        the packs then empty themselves before a pass could free anything, and copying their live
        chunks only adds uploads that die too. Down to BUSY_AIM while writes go on; down to
        AIM, from anywhere above GOAL, once nothing changed since the previous check (the
        writer stopped), so a mount settles below GOAL by itself, not at wherever below
        TRIGGER the writes left it.
        """
        stored, live = ratio(p for p in self.md.all_packs() if p[2] > 0)
        written = self.uploader.bytes_uploaded - self._uploaded
        self._uploaded = self.uploader.bytes_uploaded
        quiet, self._last = self._last == (stored, live), (stored, live)
        if stored - live < MIN_RECLAIM:
            return None
        churning = written * DELETE_GRACE > live * elapsed
        if churning != self.churning:
            self.churning = churning
            log.info(
                "compaction %s: %d bytes written in %.0f s over %d live",
                "paused (chunks rewritten faster than once a grace)" if churning else "resumed",
                written,
                elapsed,
                live,
            )
        if quiet:
            return AIM if stored > GOAL * live else None
        return BUSY_AIM if not churning and stored > TRIGGER * live else None

    async def compact(self, goal: float = GOAL) -> int:
        """One pass; returns the number of packs emptied (0 if stopped midway)."""
        async with self._pass:
            return await self._compact(goal)

    async def stop(self) -> None:
        """No pass from now on; returns once a pass under way has ended, landing no more
        packs. The unmount calls this before its final commit: a pack landed after that
        commit would stay in the bucket with nothing naming it, until fsck --repair."""
        self.closing = True
        async with self._pass:
            pass

    def _halted(self) -> bool:
        return self.closing or self.stopped()

    async def _compact(self, goal: float) -> int:
        started, copied = trio.current_time(), self.bytes_copied
        targets = plan(self.md.all_packs(), goal, self._busy(), MIN_RECLAIM)
        repacker = Repacker(self.sealer)
        for pack in targets:
            rows = self.md.chunks_in_pack(pack, 0, 1 << 62)
            if self._halted():
                return 0
            if not rows:
                continue
            full = await trio.to_thread.run_sync(
                repacker.add_pack, self.store, pack, rows, limiter=self.limiter
            )
            for new in full:
                if self._halted():  # packs landed so far are switched: the next commit has them
                    return 0
                await self._land(new)
        for new in repacker.finish():
            if self._halted():
                return 0
            await self._land(new)
        self.packs_compacted += len(targets)
        if targets:
            log.info(
                "compaction: %d packs rewritten, %d bytes copied in %.1f s",
                len(targets),
                self.bytes_copied - copied,
                trio.current_time() - started,
            )
        return len(targets)

    async def _land(self, new: NewPack) -> None:
        blob = new.blob()
        name = layout.pack_name(new.id)
        body = cast(bytes, blob)  # never modified again: no copy into `bytes`
        await trio.to_thread.run_sync(self.store.put, name, body, limiter=self.limiter)
        if self.disk is not None:
            await trio.to_thread.run_sync(self.disk.put_pack, new.id, blob, limiter=self.limiter)
        switch(self.md, new, len(blob))
        self.bytes_copied += new.size

    async def run(self, interval: float = CHECK_INTERVAL) -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            elapsed, last = max(now - last, 1e-3), now
            goal = None if self._halted() else self.due(elapsed)
            if goal is None:
                continue
            try:
                await self.compact(goal)
            except (EncfsCloudError, OSError) as exc:  # never the end of the mount: next time
                log.warning("compaction stopped: %s", exc)
