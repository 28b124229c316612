"""File contents: reads through the chunk cache with prefetch, writes into dirty chunks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio

from encfs_cloud import layout
from encfs_cloud.data.cache import ChunkCache, ChunkKey
from encfs_cloud.data.diskcache import DiskCache
from encfs_cloud.data.uploader import Uploader
from encfs_cloud.errors import IntegrityError, ObjectMissingError, StoreError
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree.metadata import ChunkRef, Metadata

log = logging.getLogger(__name__)

# Sequential read-ahead, in chunks: a window that starts small when reads turn sequential (or
# at a large first read from offset 0), doubles at every top-up up to PREFETCH_MAX or a quarter
# of the clean cache, and is topped up per PREFETCH_STEP chunks read (a pack): the GETs stay
# back to back, not in bursts that end together while the reader waits (design.md, Data path).
PREFETCH_MIN, PREFETCH_MAX, PREFETCH_STEP = 8, 64, 8
# A run may reach this many chunks past the window to end where its pack ends: GETs then
# cover whole packs instead of being cut in two at every top-up.
PACK_SLACK = 8
READ_AROUND_BYTES = 1 << 20  # a miss on a small chunk fetches this aligned slot of its pack

Run = list[tuple[int, int, ChunkRef]]  # (inode, chunk index, where) back to back in a pack


class FileData:
    """Reads and writes byte ranges of regular files; sizes live in the inode rows."""

    def __init__(
        self,
        md: Metadata,
        cache: ChunkCache,
        sealer: Sealer,
        store: ObjectStore,
        uploader: Uploader,
        limiter: trio.CapacityLimiter,
        disk: DiskCache | None = None,
    ) -> None:
        self.md = md
        self.disk = disk
        self.cache = cache
        self.sealer = sealer
        self.store = store
        self.uploader = uploader
        self.limiter = limiter
        self._fetching: dict[tuple[int, int, int], trio.Event] = {}
        self._last_read: dict[int, int] = {}  # inode → last chunk index read (sequential?)
        self._prefetched: dict[int, int] = {}  # inode → prefetch scheduled below this index
        self._window: dict[int, int] = {}  # inode → read-ahead window in chunks
        self.nursery: trio.Nursery | None = None
        # Applies other devices' commits now (set by the mount): a chunk whose pack is gone
        # was usually rewritten elsewhere, and the newer commit says where it is now.
        self.refresh: Callable[[], Awaitable[object]] | None = None
        self.bytes_fetched = 0
        self.integrity_errors = 0
        self.store_errors = 0  # reads the store failed after its retries (for `status`)

    @property
    def fetches_in_flight(self) -> int:
        """Chunk downloads under way (for `status`)."""
        return len(self._fetching)

    # --- reading -------------------------------------------------------------------------

    async def chunk(
        self, ino: int, idx: int, *, refreshed: bool = False
    ) -> bytes | bytearray | memoryview | None:
        """Plaintext of one chunk, or None for a hole (never written)."""
        key = (ino, idx)
        ref = self.md.get_chunk(ino, idx)
        data = self.cache.get(key, ref.version if ref else None)
        if data is not None or ref is None:
            if ref is not None and self.disk is not None and not self.cache.pinned(key):
                self.disk.used(ref.pack, ref.off)  # a use the disk cache's LRU sees too
            return data
        event = self._fetching.get((ino, idx, ref.version))
        if event is not None:  # a prefetch or another reader is already on it
            await event.wait()
            return await self.chunk(ino, idx)
        run, spare = [(ino, idx, ref)], []
        window = self._read_around(ref)
        if window is not None:
            spare = self._neighbours(ref, window)
            if self.disk is None:  # else they go sealed to disk only: see _fetch_from_store
                run, spare = run + spare, []
        try:
            result = (await self._fetch_run(run, window=window, spare=spare))[0]
        except ObjectMissingError:
            if self.md.get_chunk(ino, idx) != ref:
                # Compaction or a rewrite here moved the chunk and its old pack went meanwhile.
                return await self.chunk(ino, idx, refreshed=refreshed)
            if refreshed or self.refresh is None:
                raise
            await self.refresh()  # another device may have moved or rewritten it
            now = self.md.get_chunk(ino, idx)
            if now is None or now == ref:
                raise  # deleted or truncated elsewhere, or really lost: never zeros
            return await self.chunk(ino, idx, refreshed=True)
        if isinstance(result, BaseException):
            raise result
        return result

    def _read_around(self, ref: ChunkRef) -> tuple[int, int] | None:
        """The read-around GET for a cold small chunk: (start, length), or None for none.

        Always the READ_AROUND_BYTES-aligned slot of the pack that holds the chunk (stores cut
        a range at the object's end), or READ_AROUND_BYTES from the chunk's start when it
        crosses a slot's end: the request shows at most where the chunk starts, and the
        answer's length only the pack's size, both of which the bucket owner sees anyway;
        never how many chunks follow, which of them are live or where the live data ends
        (issue #10). Aligned rather than from the chunk: directory order follows random ids,
        not the order files were written in, so a tree copy reads a pack's small files in no
        particular order, and a slot serves those stored before the chunk as well as after.
        """
        if ref.len >= READ_AROUND_BYTES:
            return None
        if self.disk is not None and self.disk.holds(ref.pack, ref.off):
            return None  # served locally: a GET would only be wasted
        start = ref.off - ref.off % READ_AROUND_BYTES
        if ref.off + ref.len > start + READ_AROUND_BYTES:
            start = ref.off
        return start, READ_AROUND_BYTES

    def _neighbours(self, ref: ChunkRef, window: tuple[int, int]) -> Run:
        """The other live chunks wholly inside the window (files written together are usually
        read together: a tree copy, a backup, rsync): fetched with the same GET."""
        run: Run = []
        end = window[0] + window[1]
        for ino, idx, near in self.md.chunks_in_pack(ref.pack, window[0], end):
            if near.off + near.len > end:
                break
            if near.off == ref.off:
                continue  # the chunk asked for, first in the run already
            if (
                (ino, idx, near.version) in self._fetching
                or self.cache.get((ino, idx), near.version, count=False) is not None
                or (self.disk is not None and self.disk.holds(near.pack, near.off))
            ):
                continue
            run.append((ino, idx, near))
        return run

    def _claim(self, run: Run) -> trio.Event:
        """Mark the run's chunks as being fetched, so no other reader fetches them again."""
        event = trio.Event()
        for ino, idx, ref in run:
            self._fetching[(ino, idx, ref.version)] = event
        return event

    async def _fetch_run(
        self,
        run: Run,
        event: trio.Event | None = None,
        window: tuple[int, int] | None = None,
        spare: Run | None = None,
    ) -> list[bytes | memoryview | IntegrityError]:
        """Fetch chunks of one pack (back to back, or inside `window`), with one ranged GET
        or from the disk cache; cache them. `spare` chunks (in `window` too) go to disk only.

        A prefetch claims its chunks when it is scheduled (event given), not when its task
        starts: a reader served from the cache can run ahead of tasks not yet started.
        """
        spare = spare or []
        tokens = [(ino, idx, ref.version) for ino, idx, ref in run + spare]
        if event is None:
            event = self._claim(run + spare)
        try:
            fetched: list[int] = []  # bytes the bucket sent (the disk cache may serve the rest)
            results = await trio.to_thread.run_sync(
                self._fetch, run, window, fetched, spare, limiter=self.limiter
            )
            self.bytes_fetched += sum(fetched)  # trio thread: no race
        finally:
            for token in tokens:
                del self._fetching[token]
            event.set()
        for (ino, idx, ref), plain in zip(run, results, strict=True):
            if isinstance(plain, BaseException):
                continue
            current = self.md.get_chunk(ino, idx)
            if current is not None and current.version == ref.version:
                self.cache.put_clean((ino, idx), ref.version, plain)
        return results

    def _fetch(
        self, run: Run, window: tuple[int, int] | None, fetched: list[int], spare: Run
    ) -> list[bytes | memoryview | IntegrityError]:
        """The run's chunks, from the disk cache where it holds them, else with one GET per
        stretch of missing chunks; each chunk opened on its own, so one bad chunk fails alone.
        With a read-around `window`, one GET of exactly that range."""
        if window is not None:
            return self._fetch_from_store(run, fetched, window, spare)
        results: list[bytes | memoryview | IntegrityError | None] = [None] * len(run)
        disk = self.disk
        if disk is not None:
            for i, (ino, idx, ref) in enumerate(run):
                sealed = disk.get(ref.pack, ref.off, ref.len)
                if sealed is None:
                    continue
                try:
                    results[i] = self._open(ino, idx, ref, sealed)
                except IntegrityError as exc:
                    # A damaged or altered cache file: drop it and ask the bucket instead.
                    log.warning("inode %d chunk %d: disk cache entry dropped: %s", ino, idx, exc)
                    disk.drop(ref.pack, ref.off)
        start = 0
        while start < len(run):
            if results[start] is not None:
                start += 1
                continue
            end = start + 1
            while end < len(run) and results[end] is None:
                end += 1
            results[start:end] = self._fetch_from_store(run[start:end], fetched)
            start = end
        return [r for r in results if r is not None]

    def _fetch_from_store(
        self,
        run: Run,
        fetched: list[int],
        window: tuple[int, int] | None = None,
        spare: Run | None = None,
    ) -> list[bytes | memoryview | IntegrityError]:
        """One ranged GET for chunks of one pack: back to back, or inside `window`.

        The `spare` chunks of a read-around are kept sealed in the disk cache, not opened:
        no memory and no decryption until a reader asks, and that read is a use the disk
        cache's LRU sees (held in memory instead, one read before its first use could be
        evicted from disk and then read from memory: the disk would lose a recent one).
        """
        first = run[0][2]
        name = layout.pack_name(first.pack)
        if window is None:
            window = first.off, run[-1][2].off + run[-1][2].len - first.off
        try:
            blob = memoryview(self.store.get(name, *window))
            fetched.append(len(blob))
        except StoreError as exc:
            self.store_errors += 1
            log.error("inode %d chunk %d: reading object %s failed: %s", *run[0][:2], name, exc)
            raise
        keep: list[tuple[int, bytes | memoryview]] = []  # for the disk cache, in one call
        results: list[bytes | memoryview | IntegrityError] = []
        for ino, idx, ref in run:
            start = ref.off - window[0]
            try:
                if start + ref.len > len(blob):
                    raise IntegrityError(f"object {name} is shorter than its chunks")
                sealed = blob[start : start + ref.len]
                results.append(self._open(ino, idx, ref, sealed))
                keep.append((ref.off, sealed))
            except IntegrityError as exc:
                self.integrity_errors += 1
                log.error("inode %d chunk %d in object %s: %s", ino, idx, name, exc)
                results.append(exc)
        for _, _, ref in spare or ():
            start = ref.off - window[0]
            if start + ref.len <= len(blob):  # else its read says
                keep.append((ref.off, blob[start : start + ref.len]))
        if self.disk is not None:
            self.disk.put_chunks(first.pack, keep)
        return results

    def _open(
        self, ino: int, idx: int, ref: ChunkRef, sealed: bytes | memoryview
    ) -> bytes | memoryview:
        return self.sealer.open_chunk(
            ino, idx, ref.version, ref.gen, ref.plain_len, sealed, ref.digest, ref.pack
        )

    async def read(self, ino: int, size: int, offset: int, length: int) -> bytes:
        if offset >= size or length <= 0:
            return b""
        length = min(length, size - offset)
        indices = layout.chunk_range(offset, length)
        self._maybe_prefetch(ino, indices, size, offset, length)
        pieces = []
        for idx in indices:
            base = idx * layout.CHUNK_SIZE
            lo = max(offset, base) - base
            hi = min(offset + length, base + layout.CHUNK_SIZE) - base
            data = await self.chunk(ino, idx)
            piece = data[lo:hi] if data is not None else b""
            if len(piece) < hi - lo:  # a hole, or a short chunk below EOF, reads as zeros
                piece = bytes(piece) + bytes(hi - lo - len(piece))
            pieces.append(piece)
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    def _maybe_prefetch(self, ino: int, indices: range, size: int, off: int, n: int) -> None:
        """On sequential reads keep a growing window of chunks ahead being fetched.

        Chunks written in sequence usually sit back to back in one pack; such runs are
        fetched with one ranged GET each, several in flight, which matters most when each
        request costs a round trip.
        """
        start = off == 0 and n >= min(layout.CHUNK_SIZE // 2, size)  # kernel read-ahead's size
        last = self._last_read.get(ino, -1 if start else None)
        self._last_read[ino] = indices[-1]
        if last is None or indices[0] not in (last, last + 1) or self.nursery is None:
            self._prefetched.pop(ino, None)  # a jump: start over when reads turn sequential
            self._window.pop(ino, None)
            return
        if indices[-1] == last:
            return  # still inside the chunk we already prefetched past
        window = self._window.get(ino, PREFETCH_MIN)
        if self._prefetched.get(ino, 0) - indices[-1] > window - min(window // 2, PREFETCH_STEP):
            return  # enough ahead; top up by a pack or more so runs stay long (one GET each)
        if ino in self._prefetched:  # the reader used a step of the window: widen it
            window = max(PREFETCH_MIN, min(2 * window, self._max_window()))
        self._window[ino] = window
        count = layout.chunk_count(size)
        end = min(indices[-1] + 1 + window, count)
        run: Run = []
        idx = max(indices[-1] + 1, self._prefetched.get(ino, 0))
        while idx < min(end + PACK_SLACK, count):
            ref = self.md.get_chunk(ino, idx)
            wanted = (
                ref is not None
                and (ino, idx, ref.version) not in self._fetching
                and self.cache.get((ino, idx), ref.version, count=False) is None
            )
            adjacent = bool(run) and _adjacent(run[-1][2], ref)
            if idx >= end and not (wanted and adjacent):
                break  # past the window, and the current run's pack has ended
            if run and (not wanted or not adjacent):
                self.nursery.start_soon(self._prefetch, run, self._claim(run))
                run = []
            if wanted and ref is not None:
                run.append((ino, idx, ref))
            idx += 1
        if run:
            self.nursery.start_soon(self._prefetch, run, self._claim(run))
        self._prefetched[ino] = idx

    def _max_window(self) -> int:
        """The widest read-ahead window: prefetched chunks must not evict each other."""
        return max(PREFETCH_MIN, min(PREFETCH_MAX, self.cache.capacity // layout.CHUNK_SIZE // 4))

    async def _prefetch(self, run: Run, event: trio.Event) -> None:
        with contextlib.suppress(StoreError):  # the real read reports it
            await self._fetch_run(run, event)

    # --- writing -------------------------------------------------------------------------

    async def _writable(self, ino: int, idx: int, size: int) -> bytearray:
        key: ChunkKey = (ino, idx)
        buf = self.cache.dirty.get(key)
        if buf is not None:
            return buf
        base: bytes | bytearray | memoryview = b""
        if idx * layout.CHUNK_SIZE < size:
            current = await self.chunk(ino, idx)
            if current is not None:
                base = current
            buf = self.cache.dirty.get(key)  # a concurrent write may have created it
            if buf is not None:
                return buf
        return self.cache.dirty_buffer(key, base)

    async def write(self, ino: int, size: int, offset: int, data: bytes) -> int:
        """Write `data` at `offset`; returns the new file size. Holes fill with zeros."""
        await self.uploader.wait_for_space()
        view = memoryview(data)
        pos = 0
        for idx in layout.chunk_range(offset, len(data)):
            base = idx * layout.CHUNK_SIZE
            lo = max(offset, base) - base
            hi = min(offset + len(data), base + layout.CHUNK_SIZE) - base
            if lo == 0 and hi == layout.CHUNK_SIZE:
                # A whole chunk in one write (the kernel's writeback cache sends 1 MiB
                # writes): no read-modify-write and no copy, straight into a pack.
                whole = data if len(data) == hi else bytes(view[pos : pos + hi])
                self.cache.put_inflight((ino, idx), whole)
                self.uploader.add_chunk((ino, idx), whole)
                pos += hi
                continue
            buf = await self._writable(ino, idx, size)
            old_len = len(buf)
            if len(buf) < lo:
                buf.extend(bytes(lo - len(buf)))
            buf[lo:hi] = view[pos : pos + hi - lo]
            pos += hi - lo
            self.cache.resized((ino, idx), old_len)
            if hi == layout.CHUNK_SIZE:
                self.uploader.flush_chunk((ino, idx))  # a full chunk goes out at once
        return max(size, offset + len(data))

    async def truncate(self, ino: int, old_size: int, new_size: int) -> None:
        if new_size >= old_size:
            return  # growing: the new range is a hole and reads as zeros
        keep = layout.chunk_count(new_size)
        self.md.drop_chunks(ino, keep)
        self.cache.forget(ino, keep)
        tail = new_size % layout.CHUNK_SIZE
        if tail:
            idx = keep - 1
            buf = await self._writable(ino, idx, old_size)
            if len(buf) > tail:
                old_len = len(buf)
                del buf[tail:]
                self.cache.resized((ino, idx), old_len)

    def allocated_blocks(self, ino: int, size: int, block: int, stored: int | None = None) -> int:
        """Blocks of `block` bytes that `ino`'s chunks fill, stored or waiting for upload.

        Holes (chunks never written) count nothing, so `du` sees a sparse file as sparse.
        `stored`: the committed part, if the caller already has it (Metadata.stored_blocks).
        A waiting chunk replaces its stored version; the pending keys of this inode are found
        by whichever is smaller to walk: its chunk indices, or every pending chunk.
        """
        if stored is None:
            stored = self.md.stored_blocks([ino], block).get(ino, 0)
        blocks = stored
        dirty, inflight = self.cache.dirty, self.cache.inflight
        if not dirty and not inflight:
            return blocks
        count = layout.chunk_count(size)
        if count <= len(dirty) + len(inflight):
            keys = {(ino, i) for i in range(count) if (ino, i) in dirty or (ino, i) in inflight}
        else:
            keys = {k for k in dirty if k[0] == ino} | {k for k in inflight if k[0] == ino}
        for key in keys:
            waiting = dirty.get(key)
            length = len(waiting) if waiting is not None else len(inflight[key])
            ref = self.md.get_chunk(*key)
            if ref is not None:
                blocks -= -(-ref.plain_len // block)
            blocks += -(-length // block)
        return blocks

    def forget(self, ino: int) -> None:
        """The inode is gone: drop its chunks from cache and metadata."""
        self.cache.forget(ino)
        self._last_read.pop(ino, None)
        self._prefetched.pop(ino, None)
        self._window.pop(ino, None)


def _adjacent(prev: ChunkRef, ref: ChunkRef | None) -> bool:
    return ref is not None and ref.pack == prev.pack and ref.off == prev.off + prev.len
