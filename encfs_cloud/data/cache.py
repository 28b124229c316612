"""The plaintext chunk cache in memory: a byte-bounded LRU plus pinned dirty chunks."""

from __future__ import annotations

from cachetools import LRUCache

from encfs_cloud.layout import CHUNK_SIZE

ChunkKey = tuple[int, int]  # (inode, chunk index)
CleanKey = tuple[int, int, int]  # (inode, chunk index, chunk version)


class ChunkCache:
    """Holds plaintext chunks in three states.

    - clean: identical to what the bucket holds; evictable (LRU, bounded by `capacity`).
      Keyed by chunk version too, so a truncated or rewritten chunk can never be served
      stale: its old entry is simply never asked for again and ages out.
    - dirty: written since the last flush; pinned until the uploader takes it.
    - in flight: taken by the uploader, sealed into a pack whose upload has not finished;
      pinned because the bucket does not serve it yet.
    Dirty plus in-flight bytes are bounded separately by `dirty_limit` (back-pressure).
    """

    def __init__(self, capacity: int, dirty_limit: int) -> None:
        self.capacity = capacity
        self.dirty_limit = dirty_limit
        self._clean: LRUCache[CleanKey, bytes | bytearray | memoryview] = LRUCache(
            maxsize=max(capacity, 1), getsizeof=len
        )
        self.dirty: dict[ChunkKey, bytearray] = {}
        # In-flight buffers are never modified again (a new write makes a new dirty copy).
        self.inflight: dict[ChunkKey, bytes | bytearray] = {}
        # Whole chunks streamed in (one 1 MiB write, or a chunk that started empty and was
        # filled to the end) are not kept as clean once they land: the kernel's page cache
        # holds them (open keeps it), and keeping them made every written byte need fresh,
        # page-faulted memory; dropped, the next writes reuse it (design.md, k4's notes).
        self._fresh: set[ChunkKey] = set()  # dirty chunks that started empty
        self._streamed: set[int] = set()  # id() of such in-flight buffers
        self.dirty_bytes = 0
        self.inflight_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(
        self, key: ChunkKey, version: int | None, *, count: bool = True
    ) -> bytes | bytearray | memoryview | None:
        buf: bytes | bytearray | memoryview | None = self.dirty.get(key)
        if buf is None:
            buf = self.inflight.get(key)
        if buf is None and version is not None:
            buf = self._clean.get((*key, version))
        if count:  # look-ups that only plan a prefetch do not count as hits or misses
            if buf is None:
                self.misses += 1
            else:
                self.hits += 1
        return buf

    def pinned(self, key: ChunkKey) -> bool:
        """Dirty or in flight: not (yet) what the bucket holds."""
        return key in self.dirty or key in self.inflight

    def put_clean(self, key: ChunkKey, version: int, data: bytes | bytearray | memoryview) -> None:
        if len(data) <= self.capacity:
            self._clean[(*key, version)] = data

    def dirty_buffer(self, key: ChunkKey, base: bytes | bytearray | memoryview) -> bytearray:
        """The writable buffer for `key`, created from `base` (its current content) if new."""
        buf = self.dirty.get(key)
        if buf is not None:
            return buf
        buf = bytearray(base)
        if not buf:
            self._fresh.add(key)
        self.dirty[key] = buf
        self.dirty_bytes += len(buf)
        return buf

    def resized(self, key: ChunkKey, old_len: int) -> None:
        """Account for a dirty buffer that grew or shrank from `old_len`."""
        self.dirty_bytes += len(self.dirty[key]) - old_len

    def take_dirty(self, key: ChunkKey) -> bytearray:
        """Move a dirty chunk to in flight; the buffer is handed over, not copied."""
        buf = self.dirty.pop(key)
        self.dirty_bytes -= len(buf)
        self._set_inflight(key, buf)
        if key in self._fresh:
            self._fresh.discard(key)
            if len(buf) == CHUNK_SIZE:
                self._streamed.add(id(buf))
        return buf

    def put_inflight(self, key: ChunkKey, data: bytes) -> None:
        """A whole chunk written in one piece goes straight to in flight (no dirty copy)."""
        old = self.dirty.pop(key, None)
        if old is not None:
            self.dirty_bytes -= len(old)
        self._fresh.discard(key)
        self._set_inflight(key, data)
        if len(data) == CHUNK_SIZE:
            self._streamed.add(id(data))

    def _set_inflight(self, key: ChunkKey, data: bytes | bytearray) -> None:
        old = self.inflight.pop(key, None)
        if old is not None:
            self.inflight_bytes -= len(old)
            self._streamed.discard(id(old))
        self.inflight[key] = data
        self.inflight_bytes += len(data)

    def landed(self, key: ChunkKey, version: int, data: bytes | bytearray) -> None:
        """A pack holding `data` for `key` is in the bucket: unpin it, keep it as clean."""
        if self.inflight.get(key) is data:
            del self.inflight[key]
            self.inflight_bytes -= len(data)
            if id(data) in self._streamed:
                self._streamed.discard(id(data))
                return
        self.put_clean(key, version, data)

    def unpin(self, key: ChunkKey, data: bytes | bytearray) -> None:
        """Stop holding `data` in flight for `key`: its pack was sealed to the disk cache (reads
        go there), or a merge gave the chunk another version (its pack still uploads `data`
        from its own reference)."""
        if self.inflight.get(key) is data:
            del self.inflight[key]
            self.inflight_bytes -= len(data)
            self._streamed.discard(id(data))

    def forget(self, ino: int, first_idx: int = 0) -> None:
        """Drop every state of chunks >= first_idx of `ino` (truncate, delete)."""
        for key in [k for k in self.dirty if k[0] == ino and k[1] >= first_idx]:
            self.dirty_bytes -= len(self.dirty.pop(key))
            self._fresh.discard(key)
        for key in [k for k in self.inflight if k[0] == ino and k[1] >= first_idx]:
            data = self.inflight.pop(key)
            self.inflight_bytes -= len(data)
            self._streamed.discard(id(data))

    def dirty_keys(self, ino: int | None = None) -> list[ChunkKey]:
        if ino is None:
            return list(self.dirty)
        return [k for k in self.dirty if k[0] == ino]

    @property
    def pressure(self) -> bool:
        return self.dirty_bytes + self.inflight_bytes >= self.dirty_limit

    @property
    def clean_bytes(self) -> int:
        return int(self._clean.currsize)

    def clear(self) -> None:
        """Drop all plaintext (at unmount); overwrite what we own so it does not linger."""
        for buf in self.dirty.values():
            buf[:] = bytes(len(buf))
        self.dirty.clear()
        self.inflight.clear()
        self._fresh.clear()
        self._streamed.clear()
        self._clean.clear()
        self.dirty_bytes = self.inflight_bytes = 0
