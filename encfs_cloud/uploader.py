"""Write-back: dirty chunks into sealed packs, parallel uploads, and ordered metadata commits."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import trio

from . import layout
from .cache import ChunkCache, ChunkKey
from .errors import StoreError
from .journal import (
    KIND_DELTA,
    KIND_SNAPSHOT,
    CommitInfo,
    Head,
    commit_hash,
    export_delta,
    export_snapshot,
    seal_commit,
)
from .metadata import ChunkRef, Metadata
from .sealed import Sealer, sealed_chunk_len
from .store.base import ObjectStore

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_DELTAS = 256
SNAPSHOT_MIN_DELTA_BYTES = 8 << 20


@dataclass
class Pack:
    id: str
    entries: list[tuple[ChunkKey, int, bytes | bytearray]] = field(
        default_factory=list
    )  # key, version, data
    size: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Uploader:
    """Owns the open pack, the uploads in flight and the commit sequence.

    Runs entirely on the trio thread; sealing and store calls go to worker threads through
    one `CapacityLimiter`, so transfers run in parallel and never block FUSE requests.
    """

    def __init__(
        self,
        md: Metadata,
        cache: ChunkCache,
        sealer: Sealer,
        store: ObjectStore,
        head: Head,
        *,
        limiter: trio.CapacityLimiter,
        on_commit: Callable[[Head], None],
        sync_timeout: float = 120.0,
    ) -> None:
        self.md = md
        self.cache = cache
        self.sealer = sealer
        self.store = store
        self.head = head
        self.limiter = limiter
        self.on_commit = on_commit
        self.sync_timeout = sync_timeout
        self.open_pack: Pack | None = None
        self.pending: dict[str, Pack] = {}
        self.nursery: trio.Nursery | None = None
        self._commit_lock = trio.Lock()
        self._commits_started = 0
        self._commit_done_index = 0
        self.space_freed = trio.Event()
        self.bytes_uploaded = 0
        self.commits = 0
        self.last_commit_ns = 0
        self.errors = 0

    # --- chunks into packs ---------------------------------------------------------------

    def flush_chunk(self, key: ChunkKey) -> None:
        """Move one dirty chunk into the open pack and point the metadata at its slot."""
        self.add_chunk(key, self.cache.take_dirty(key))

    def add_chunk(self, key: ChunkKey, data: bytes | bytearray) -> None:
        """Put `data` (now in flight in the cache, never modified again) into the open pack."""
        ino, idx = key
        version = self.md.next_counter("next_version", 1)
        length = sealed_chunk_len(len(data))
        pack = self.open_pack
        if pack is not None and pack.size + length > layout.PACK_TARGET:
            self.close_pack()
            pack = None
        if pack is None:
            pack = Pack(layout.random_id())
            self.md.add_pack(pack.id, 0)
            self.open_pack = pack
        ref = ChunkRef(pack.id, pack.size, length, len(data), version, self.sealer.keys.current)
        pack.entries.append((key, version, data))
        pack.size += length
        self.md.set_chunk(ino, idx, ref)
        if pack.size >= layout.PACK_TARGET:
            self.close_pack()

    def flush_dirty(self, ino: int | None = None) -> None:
        for key in self.cache.dirty_keys(ino):
            self.flush_chunk(key)

    def close_pack(self) -> None:
        pack = self.open_pack
        if pack is None:
            return
        self.open_pack = None
        self.pending[pack.id] = pack
        assert self.nursery is not None, "uploader not started"
        self.nursery.start_soon(self._upload, pack)

    async def _upload(self, pack: Pack) -> None:
        delay = 0.5
        while True:
            try:
                blob = await trio.to_thread.run_sync(self._build_pack, pack, limiter=self.limiter)
                # Stores treat any bytes-like body alike; the pack is never modified again,
                # so it is not copied into an immutable `bytes` (8 MiB per pack).
                body = cast(bytes, blob)
                await trio.to_thread.run_sync(
                    self.store.put, layout.pack_name(pack.id), body, limiter=self.limiter
                )
                break
            except StoreError as exc:
                self.errors += 1
                pack.error = exc
                log.warning("upload of pack %s failed (%s); retrying in %.1fs", pack.id, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)
        pack.error = None
        self.bytes_uploaded += len(blob)
        for key, version, data in pack.entries:
            self.cache.landed(key, version, data)
        pack.entries.clear()
        del self.pending[pack.id]
        pack.done.set()
        self._wake_writers()

    def _build_pack(self, pack: Pack) -> bytearray:
        total = pack.size
        blob = bytearray(layout.size_class(total))
        view = memoryview(blob)
        off = 0
        for (ino, idx), version, data in pack.entries:
            length = sealed_chunk_len(len(data))
            self.sealer.seal_chunk_into(ino, idx, version, data, view[off : off + length])
            off += length
        # Random padding is indistinguishable from ciphertext: the size class is all that shows.
        view[off:] = os.urandom(len(blob) - off)
        return blob

    def _wake_writers(self) -> None:
        if not self.cache.pressure:
            self.space_freed.set()
            self.space_freed = trio.Event()

    async def wait_for_space(self) -> None:
        """Back-pressure: block a writer while too many dirty bytes wait for upload."""
        while self.cache.pressure:
            self.flush_dirty()
            self.close_pack()
            await self.space_freed.wait()

    # --- commits -------------------------------------------------------------------------

    def has_changes(self) -> bool:
        return bool(self.cache.dirty) or any(self.md.dirty.values()) or self.open_pack is not None

    async def sync(self) -> None:
        """Return once everything changed before this call is in the bucket (group commit)."""
        ticket = self._commits_started
        async with self._commit_lock:
            if self._commit_done_index > ticket:
                return  # a commit that began after our call has finished
            self._commits_started += 1
            index = self._commits_started
            await self._commit_locked()
            self._commit_done_index = index

    async def _commit_locked(self) -> None:
        if not self.has_changes():
            await self._wait_packs(list(self.pending.values()))
            return
        # Everything from here to the export runs without a checkpoint, so the exported rows
        # describe one instant and reference only packs that exist or are uploading.
        self.flush_dirty()
        self.close_pack()
        waiting = list(self.pending.values())
        head = self.head
        snapshot = (
            head.seq == 0
            or head.deltas_since_snapshot >= SNAPSHOT_EVERY_DELTAS
            or head.delta_bytes_since_snapshot > SNAPSHOT_MIN_DELTA_BYTES
        )
        seq = head.seq + 1
        body = export_snapshot(self.md) if snapshot else export_delta(self.md)
        info = CommitInfo(
            seq=seq,
            kind=KIND_SNAPSHOT if snapshot else KIND_DELTA,
            prev_hash=head.hash,
            snapshot_seq=seq if snapshot else head.snapshot_seq,
            time_ns=time.time_ns(),
        )
        # Packs dead at this instant are unreferenced by this commit; once it is durable
        # their objects can go. (A dead pack never comes back to life: only the open pack
        # gains chunks.)
        dead = self._dead_packs()
        sealed = await trio.to_thread.run_sync(
            seal_commit, self.sealer, info, body, limiter=self.limiter
        )
        await self._wait_packs(waiting)
        await self._put_commit(seq, sealed)
        if snapshot:
            self.head = Head(seq, commit_hash(sealed), seq, 0, 0)
            assert self.nursery is not None
            self.nursery.start_soon(self._drop_commits_before, seq)
        else:
            self.head = Head(
                seq,
                commit_hash(sealed),
                head.snapshot_seq,
                head.deltas_since_snapshot + 1,
                head.delta_bytes_since_snapshot + len(sealed),
            )
        self.commits += 1
        self.last_commit_ns = info.time_ns
        self.on_commit(self.head)
        if dead:
            self.md.forget_packs(dead)
            assert self.nursery is not None
            self.nursery.start_soon(self._delete_objects, [layout.pack_name(p) for p in dead])

    async def _wait_packs(self, packs: list[Pack]) -> None:
        with trio.move_on_after(self.sync_timeout) as scope:
            for pack in packs:
                await pack.done.wait()
        if scope.cancelled_caught:
            raise StoreError("the store is not accepting uploads; changes stay queued in memory")

    async def _put_commit(self, seq: int, sealed: bytes) -> None:
        name = layout.commit_name(seq)
        deadline = trio.current_time() + self.sync_timeout
        delay = 0.5
        while True:
            try:
                await trio.to_thread.run_sync(
                    lambda: self.store.put(name, sealed, if_none_match=True), limiter=self.limiter
                )
                return
            except StoreError as exc:
                # PreconditionFailed means someone else wrote this seq: never overwrite it.
                self.errors += 1
                if type(exc).__name__ == "PreconditionFailedError" or (
                    trio.current_time() + delay > deadline
                ):
                    raise
                log.warning("commit %s failed (%s); retrying", name, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _dead_packs(self) -> list[str]:
        open_id = self.open_pack.id if self.open_pack else None
        return [p for p in self.md.dead_packs() if p not in self.pending and p != open_id]

    async def _drop_commits_before(self, seq: int) -> None:
        names = await trio.to_thread.run_sync(
            lambda: [o.name for o in self.store.list(layout.META_PREFIX)], limiter=self.limiter
        )
        old = [n for n in names if (layout.commit_seq(n) or seq) < seq]
        await self._delete_objects(old)

    async def _delete_objects(self, names: list[str]) -> None:
        for name in names:
            try:
                await trio.to_thread.run_sync(self.store.delete, name, limiter=self.limiter)
            except StoreError as exc:
                log.warning("could not delete %s (%s); fsck will collect it", name, exc)

    # --- background loop -----------------------------------------------------------------

    async def run(self, commit_interval: float, *, task_status: trio.TaskStatus[None]) -> None:
        """Commit every `commit_interval` seconds while anything changed."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(commit_interval)
                if self.has_changes():
                    try:
                        await self.sync()
                    except StoreError as exc:
                        log.warning("periodic commit failed: %s", exc)
