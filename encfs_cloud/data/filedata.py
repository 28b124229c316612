"""File contents: reads through the chunk cache with prefetch, writes into dirty chunks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio

from encfs_cloud import layout
from encfs_cloud.data.cache import ChunkCache, ChunkKey
from encfs_cloud.data.uploader import Uploader
from encfs_cloud.errors import IntegrityError, ObjectMissingError, StoreError
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree.metadata import ChunkRef, Metadata

log = logging.getLogger(__name__)

PREFETCH_CHUNKS = 16
READ_AROUND_BYTES = 1 << 20  # a miss on a small chunk also fetches the small chunks after it

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
    ) -> None:
        self.md = md
        self.cache = cache
        self.sealer = sealer
        self.store = store
        self.uploader = uploader
        self.limiter = limiter
        self._fetching: dict[tuple[int, int, int], trio.Event] = {}
        self._last_read: dict[int, int] = {}  # inode → last chunk index read (sequential?)
        self._prefetched: dict[int, int] = {}  # inode → prefetch scheduled below this index
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
            return data
        event = self._fetching.get((ino, idx, ref.version))
        if event is not None:  # a prefetch or another reader is already on it
            await event.wait()
            return await self.chunk(ino, idx)
        run = [(ino, idx, ref)]
        if ref.len < READ_AROUND_BYTES:
            run += self._neighbours(ref)
        try:
            result = (await self._fetch_run(run))[0]
        except ObjectMissingError:
            if refreshed or self.refresh is None:
                raise
            await self.refresh()
            now = self.md.get_chunk(ino, idx)
            if now is None or now.version == ref.version:
                raise  # deleted or truncated elsewhere, or really lost: never zeros
            return await self.chunk(ino, idx, refreshed=True)
        if isinstance(result, BaseException):
            raise result
        return result

    def _neighbours(self, ref: ChunkRef) -> Run:
        """Small chunks stored right after this one (files written together are usually read
        together: a tree copy, a backup, rsync): fetched in the same GET."""
        run: Run = []
        end = ref.off + ref.len
        for ino, idx, near in self.md.chunks_in_pack(ref.pack, end, ref.off + READ_AROUND_BYTES):
            if near.off != end or near.off + near.len > ref.off + READ_AROUND_BYTES:
                break  # a gap (a dead chunk) or too far: stop the run here
            if (ino, idx, near.version) in self._fetching or self.cache.get(
                (ino, idx), near.version, count=False
            ) is not None:
                break
            run.append((ino, idx, near))
            end = near.off + near.len
        return run

    async def _fetch_run(self, run: Run) -> list[bytes | memoryview | IntegrityError]:
        """Fetch chunks lying back to back in one pack with one ranged GET; cache them."""
        tokens = [(ino, idx, ref.version) for ino, idx, ref in run]
        event = trio.Event()
        for token in tokens:
            self._fetching[token] = event
        try:
            results = await trio.to_thread.run_sync(self._fetch, run, limiter=self.limiter)
            self.bytes_fetched += sum(ref.len for _, _, ref in run)  # trio thread: no race
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

    def _fetch(self, run: Run) -> list[bytes | memoryview | IntegrityError]:
        """One GET for the run; each chunk opened on its own, so one bad chunk fails alone."""
        first = run[0][2]
        name = layout.pack_name(first.pack)
        total = run[-1][2].off + run[-1][2].len - first.off
        try:
            blob = memoryview(self.store.get(name, first.off, total))
        except StoreError as exc:
            self.store_errors += 1
            log.error(
                "inode %d chunk %d: reading object %s failed: %s", run[0][0], run[0][1], name, exc
            )
            raise
        results: list[bytes | memoryview | IntegrityError] = []
        for ino, idx, ref in run:
            start = ref.off - first.off
            try:
                if start + ref.len > len(blob):
                    raise IntegrityError(f"object {name} is shorter than its chunks")
                results.append(
                    self.sealer.open_chunk(
                        ino,
                        idx,
                        ref.version,
                        ref.gen,
                        ref.plain_len,
                        blob[start : start + ref.len],
                    )
                )
            except IntegrityError as exc:
                self.integrity_errors += 1
                log.error("inode %d chunk %d in object %s: %s", ino, idx, name, exc)
                results.append(exc)
        return results

    async def read(self, ino: int, size: int, offset: int, length: int) -> bytes:
        if offset >= size or length <= 0:
            return b""
        length = min(length, size - offset)
        indices = layout.chunk_range(offset, length)
        self._maybe_prefetch(ino, indices, size)
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

    def _maybe_prefetch(self, ino: int, indices: range, size: int) -> None:
        """On sequential reads keep PREFETCH_CHUNKS chunks ahead being fetched.

        Chunks written in sequence usually sit back to back in one pack; such runs are
        fetched with one ranged GET, which matters most when each request costs a round trip.
        """
        last = self._last_read.get(ino)
        self._last_read[ino] = indices[-1]
        if last is None or indices[0] not in (last, last + 1) or self.nursery is None:
            self._prefetched.pop(ino, None)  # a jump: start over when reads turn sequential
            return
        if indices[-1] == last:
            return  # still inside the chunk we already prefetched past
        if self._prefetched.get(ino, 0) - indices[-1] > PREFETCH_CHUNKS // 2:
            return  # enough in flight; top up in batches so runs stay long (one GET each)
        end = min(indices[-1] + 1 + PREFETCH_CHUNKS, layout.chunk_count(size))
        run: Run = []
        for idx in range(max(indices[-1] + 1, self._prefetched.get(ino, 0)), end):
            ref = self.md.get_chunk(ino, idx)
            wanted = (
                ref is not None
                and (ino, idx, ref.version) not in self._fetching
                and self.cache.get((ino, idx), ref.version, count=False) is None
            )
            if run and (not wanted or not _adjacent(run[-1][2], ref)):
                self.nursery.start_soon(self._prefetch, run)
                run = []
            if wanted and ref is not None:
                run.append((ino, idx, ref))
        if run:
            self.nursery.start_soon(self._prefetch, run)
        self._prefetched[ino] = end

    async def _prefetch(self, run: Run) -> None:
        with contextlib.suppress(StoreError):  # the real read reports it
            await self._fetch_run(run)

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

    def forget(self, ino: int) -> None:
        """The inode is gone: drop its chunks from cache and metadata."""
        self.cache.forget(ino)
        self._last_read.pop(ino, None)
        self._prefetched.pop(ino, None)


def _adjacent(prev: ChunkRef, ref: ChunkRef | None) -> bool:
    return ref is not None and ref.pack == prev.pack and ref.off == prev.off + prev.len
