"""Write-back: dirty chunks into sealed packs and their parallel uploads."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import cast

import trio

from encfs_cloud import layout
from encfs_cloud.data.cache import ChunkCache, ChunkKey
from encfs_cloud.data.diskcache import DiskCache
from encfs_cloud.errors import StoreError
from encfs_cloud.keys.sealed import Sealer, chunk_digest, sealed_chunk_len
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree.metadata import ChunkRef, Metadata

log = logging.getLogger(__name__)

UPLOAD_SLOTS = 4  # packs sealed or sending at once; reads keep the other I/O threads
CLOSE_ROOM = 64 << 10  # a pack with less room left than this is closed (under 1 % padding)
FULL_PACK = layout.pack_class(layout.PACK_TARGET)  # the size of every pack a long write fills


@dataclass
class Pack:
    id: str
    gen: int  # every chunk in a pack is sealed under this key generation
    entries: list[tuple[ChunkKey, int, bytes | bytearray]] = field(
        default_factory=list
    )  # key, version, data
    size: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    spilled: bool = False  # sealed into the disk cache's spill folder; entries released


class Uploader:
    """Owns the open pack and the uploads in flight.

    Runs entirely on the trio thread; sealing and store calls go to worker threads through
    one `CapacityLimiter`, so transfers run in parallel and never block FUSE requests.
    """

    def __init__(
        self,
        md: Metadata,
        cache: ChunkCache,
        sealer: Sealer,
        store: ObjectStore,
        *,
        limiter: trio.CapacityLimiter,
        disk: DiskCache | None = None,
    ) -> None:
        self.md = md
        self.disk = disk  # sealed copies of uploaded packs, and packs spilled before upload
        self.cache = cache
        self.sealer = sealer
        self.store = store
        self.limiter = limiter
        self.upload_slots = trio.Semaphore(UPLOAD_SLOTS)
        self.open_pack: Pack | None = None
        self.pending: dict[str, Pack] = {}
        self.nursery: trio.Nursery | None = None
        self.space_freed = trio.Event()
        # Sealed full-size pack buffers whose upload finished, reused for the next packs: a
        # fresh 8 MiB bytearray is zero-filled and page-faulted in before it is sealed into
        # (design.md, "file:// writes"). At most UPLOAD_SLOTS; dropped once no pack is being
        # filled or uploaded, so an idle mount holds none.
        self._free_blobs: list[bytearray] = []
        self.bytes_uploaded = 0
        self.bytes_spilled = 0
        self.errors = 0

    # --- chunks into packs ---------------------------------------------------------------

    def flush_chunk(self, key: ChunkKey) -> None:
        """Move one dirty chunk into the open pack and point the metadata at its slot."""
        self.add_chunk(key, self.cache.take_dirty(key))

    def add_chunk(self, key: ChunkKey, data: bytes | bytearray) -> None:
        """Put `data` (now in flight in the cache, never modified again) into the open pack."""
        ino, idx = key
        # Random, not a counter: after a crash a counter would rewind, and a chunk rewritten
        # then would share (inode, index, version) with an orphaned sealed chunk whose bytes
        # would still authenticate. 63 random bits never repeat in practice.
        version = secrets.randbits(63)
        length = sealed_chunk_len(len(data))
        pack = self.open_pack
        gen = self.sealer.keys.current
        # A new key generation (a revocation) must not reach chunks whose metadata already
        # names the old one: such a pack is closed as it is.
        if pack is not None and (pack.size + length > layout.PACK_TARGET or pack.gen != gen):
            self.close_pack()
            pack = None
        if pack is None:
            pack = Pack(layout.random_id(), gen)
            self.md.add_pack(pack.id, 0)
            self.open_pack = pack
        ref = ChunkRef(pack.id, pack.size, length, len(data), version, pack.gen, chunk_digest(data))
        pack.entries.append((key, version, data))
        pack.size += length
        self.md.set_chunk(ino, idx, ref)
        # Full once less than CLOSE_ROOM is left: eight whole chunks leave 32 KiB, and waiting
        # for the next write to learn that it does not fit would hold the upload back.
        if layout.PACK_TARGET - pack.size < CLOSE_ROOM:
            self.close_pack()

    def flush_dirty(self, ino: int | None = None) -> None:
        for key in self.cache.dirty_keys(ino):
            self.flush_chunk(key)

    def close_pack(self) -> None:
        pack = self.open_pack
        if pack is None:
            return
        self.open_pack = None
        self.md.set_pack_size(pack.id, layout.pack_class(pack.size))
        self.pending[pack.id] = pack
        assert self.nursery is not None, "uploader not started"
        self.nursery.start_soon(self._upload, pack)

    async def _upload(self, pack: Pack) -> None:
        # The bucket is slower than the writers: every upload slot is taken, so this pack
        # would wait holding its plaintext. Spilled now, while the writer goes on; spilling
        # only once the dirty limit was reached made the writer wait for each spill in turn
        # (write 8 MiB, stop, seal and write them to disk, go on: design.md).
        if self.cache.pressure or self.upload_slots.value == 0:
            await self._spill(pack)
        delay = 0.5
        while True:
            try:
                # A slot covers sealing and sending, so at most UPLOAD_SLOTS sealed pack
                # buffers exist at once (each 8 MiB, plus what the HTTP client copies).
                async with self.upload_slots:
                    blob = await trio.to_thread.run_sync(
                        self._build_pack, pack, limiter=self.limiter
                    )
                    # Stores treat any bytes-like body alike; the pack is never modified again,
                    # so it is not copied into an immutable `bytes`.
                    body = cast(bytes, blob)
                    # Abandoned on cancel (unmount): the pack stays pending and is spooled.
                    await trio.to_thread.run_sync(
                        self.store.put,
                        layout.pack_name(pack.id),
                        body,
                        limiter=self.limiter,
                        abandon_on_cancel=True,
                    )
                break
            except (StoreError, OSError) as exc:  # OSError: its spill file could not be read
                self.errors += 1
                log.warning("upload of pack %s failed (%s); retrying in %.1fs", pack.id, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.bytes_uploaded += len(blob)
        if self.disk is not None:
            await trio.to_thread.run_sync(self._keep_on_disk, pack, blob, limiter=self.limiter)
        for key, version, data in pack.entries:
            self.cache.landed(key, version, data)
        pack.entries.clear()
        del self.pending[pack.id]
        # Only after a put that returned: a failed or abandoned one may still be reading it.
        self._recycle(blob)
        pack.done.set()
        self._wake_writers()

    def _recycle(self, blob: bytearray) -> None:
        """Keep a full-size pack buffer nobody refers to any more for the next pack."""
        if not self.pending and self.open_pack is None:
            self._free_blobs.clear()  # nothing being written: give the memory back
        elif len(blob) == FULL_PACK and len(self._free_blobs) < UPLOAD_SLOTS:
            self._free_blobs.append(blob)

    def _pack_buffer(self, size: int) -> bytearray:
        """A buffer for a sealed pack of `size` bytes; every byte of it is overwritten."""
        if size == FULL_PACK:
            with contextlib.suppress(IndexError):  # list.pop is atomic: worker threads share it
                return self._free_blobs.pop()
        return bytearray(size)

    def _keep_on_disk(self, pack: Pack, blob: bytearray) -> None:
        """A landed pack stays on disk, sealed, so re-reading it (even after a remount) is local."""
        assert self.disk is not None
        try:
            if pack.spilled:
                self.disk.spill_landed(pack.id)
            else:
                self.disk.put_pack(pack.id, blob)
        except OSError as exc:
            log.warning("disk cache: cannot keep pack %s (%s)", pack.id, exc)

    async def _spill(self, pack: Pack) -> None:
        """The bucket is slower than the writer: seal the pack to disk now and release its
        plaintext, so the writer goes on at disk speed; the upload sends the sealed file."""
        disk = self.disk
        if disk is None or not disk.can_spill(layout.pack_class(pack.size)):
            return  # no room: the writer waits for the bucket, as without a disk cache

        def seal_and_write() -> int:
            assert disk is not None
            blob = self._build_pack(pack)
            disk.spill(pack.id, blob)
            self._recycle(blob)  # on disk now; the upload reads the file back
            return len(blob)

        try:
            size = await trio.to_thread.run_sync(seal_and_write, limiter=self.limiter)
        except OSError as exc:
            log.warning(
                "disk cache: cannot spill pack %s (%s); waiting for the bucket", pack.id, exc
            )
            return
        self.bytes_spilled += size
        pack.spilled = True
        for key, _version, data in pack.entries:
            self.cache.unpin(key, data)
        pack.entries.clear()
        self._wake_writers()

    def _build_pack(self, pack: Pack) -> bytearray:
        if pack.spilled:
            assert self.disk is not None
            return self.disk.read_spilled(pack.id)
        total = pack.size
        blob = self._pack_buffer(layout.pack_class(total))
        view = memoryview(blob)
        off = 0
        for (ino, idx), version, data in pack.entries:
            length = sealed_chunk_len(len(data))
            self.sealer.seal_chunk_into(
                ino, idx, version, data, view[off : off + length], pack.gen, pack.id
            )
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

    async def wait_packs(self, packs: list[Pack], timeout: float) -> None:
        with trio.move_on_after(timeout) as scope:
            for pack in packs:
                await pack.done.wait()
        if scope.cancelled_caught:
            raise StoreError("the store is not accepting uploads; changes stay queued in memory")

    def dead_packs(self) -> list[str]:
        """Packs no chunk refers to any more, except those still being filled or uploaded."""
        open_id = self.open_pack.id if self.open_pack else None
        return [p for p in self.md.dead_packs() if p not in self.pending and p != open_id]

    def spool_packs(self) -> list[tuple[str, bytearray]]:
        """Every pack not yet in the bucket, sealed, for the local spool (ciphertext only)."""
        self.close_pack()
        return [(layout.pack_name(p.id), self._build_pack(p)) for p in self.pending.values()]

    async def delete_objects(self, names: list[str]) -> None:
        for name in names:
            try:
                await trio.to_thread.run_sync(
                    self.store.delete, name, limiter=self.limiter, abandon_on_cancel=True
                )
            except StoreError as exc:
                log.warning("could not delete %s (%s); fsck will collect it", name, exc)
            if self.disk is not None and name.startswith(layout.DATA_PREFIX):
                pack_id = name[len(layout.DATA_PREFIX) :]
                await trio.to_thread.run_sync(self.disk.forget_pack, pack_id, limiter=self.limiter)

    # --- background loop -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Own the nursery that uploads run in, until cancelled."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            await trio.sleep_forever()
