"""The sealed disk cache: bucket ciphertext kept on local disk, evicted LRU within a budget."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from encfs_cloud.data.cachefiles import (
    TMP_SUFFIX,
    pread_entry,
    unlink_quietly,
    valid_pack,
    write_whole,
)
from encfs_cloud.data.spillfolder import SpillFolder
from encfs_cloud.keys.privfiles import check_private_dir, make_private_dir

log = logging.getLogger(__name__)

SPILL_DIR = "spill"
# Chunk entries wait in memory for the writer thread, up to this many bytes; beyond, an entry
# is not kept (the disk is slower than the bucket: a later read costs a GET, nothing more).
PENDING_MAX = 32 << 20


class DiskCache:
    """Sealed chunks and whole sealed packs, byte for byte as the bucket holds them.

    Entries are files named after the pack (`<pack id>`: a whole pack) or a chunk's slot in it
    (`<pack id>-<offset hex>`); nothing in them or their names is plaintext. The reader opens
    every sealed chunk again with its associated data, so a damaged or altered file can only
    fail authentication: the caller then drops it and fetches from the bucket. Files are not
    fsynced for the same reason: a torn file after a crash is just a miss.

    Chunk entries are written by a thread of the cache's own, off the reader's path: until
    then they are served from memory (`_pending`). Whole packs are written at once (an
    uploader's worker thread, big writes). Several mounts may share the folder: each writes
    through temporaries in its own spill folder and renames (readers see whole files only)
    and takes a file that vanished (another mount evicted it) for a miss.

    `spill/<mount>/` holds sealed packs written while the bucket was slower than the writer:
    pinned (never evicted) until uploaded, then moved into the cache. All methods except
    `used` run in worker threads; one lock guards the index. `close` at unmount.
    """

    def __init__(self, folder: Path, capacity: int) -> None:
        self.folder = folder
        self.capacity = capacity
        if not folder.parent.exists():
            make_private_dir(folder.parent)
        make_private_dir(folder)
        check_private_dir(folder)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the writer thread's: work, or closing
        self._pending: OrderedDict[str, bytes | memoryview] = OrderedDict()
        self._idle = True  # the writer thread is between batches
        self._drained = threading.Condition(self._lock)  # `flush` waits on it
        self._pending_bytes = 0
        self._writer: threading.Thread | None = None
        self._writer_pid = 0  # a fork (the daemon) does not inherit the parent's thread
        self._closed = False
        self._written = 0  # bytes written since the folder was last scanned
        self._shared = False  # another mount used the folder while this one ran
        self._files: OrderedDict[str, int] = OrderedDict()  # name → size, oldest first
        self._by_pack: dict[str, set[str]] = {}
        self._spilled: dict[str, int] = {}  # pack → size, this mount's spill files
        self._stamps: dict[str, int] = {}  # name → use time not yet in its mtime
        self.bytes = 0
        self.spill_bytes = 0
        self.hits = 0
        self.misses = 0
        self.dropped = 0  # entries that failed authentication or had the wrong size
        self._clock = 0
        for _, name, size in sorted(self._scan()):
            self._add(name, size)
        self._room = SpillFolder(folder / SPILL_DIR)
        self.spill_folder = self._room.path
        self._evict()

    def _scan(self) -> list[tuple[int, str, int]]:
        """(mtime, name, size) of every entry on disk."""
        entries: list[tuple[int, str, int]] = []
        for entry in os.scandir(self.folder):
            if entry.name == SPILL_DIR:
                continue
            if not entry.is_file(follow_symlinks=False):
                continue  # not ours: never served, never counted
            if entry.name.endswith(TMP_SUFFIX):
                # An older version's interrupted write: temporaries are now written in the
                # writer's own spill folder, which a crash leaves to the next sweep.
                unlink_quietly(Path(entry.path))
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # evicted meanwhile by another mount
            entries.append((st.st_mtime_ns, entry.name, st.st_size))
        return entries

    def _rescan(self) -> None:
        """Take in the entries other mounts wrote and forget those they evicted, so the
        budget holds for the folder, not only for what this mount wrote (writer thread)."""
        self.save_order()  # our uses are in the mtimes, the order the scan sorts by
        entries = sorted(self._scan())
        with self._lock:
            self._files.clear()
            self._by_pack.clear()
            self._stamps.clear()
            self.bytes = 0
            for _, name, size in entries:
                self._add(name, size)

    # --- index -------------------------------------------------------------------------------

    def _add(self, name: str, size: int) -> None:
        old = self._files.pop(name, None)
        if old is not None:
            self.bytes -= old
        self._files[name] = size
        self._by_pack.setdefault(name.split("-", 1)[0], set()).add(name)
        self.bytes += size

    def _remove(self, name: str, *, unlink: bool = True) -> None:
        self._drop_pending(name)
        size = self._files.pop(name, None)
        if size is None:
            return
        self.bytes -= size
        self._stamps.pop(name, None)
        pack = name.split("-", 1)[0]
        names = self._by_pack.get(pack)
        if names is not None:
            names.discard(name)
            if not names:
                del self._by_pack[pack]
        if unlink:
            unlink_quietly(self.folder / name)

    def _drop_pending(self, name: str) -> None:
        data = self._pending.pop(name, None)
        if data is not None:
            self._pending_bytes -= len(data)

    def _evict(self) -> None:
        with self._lock:
            while self._files and self.bytes + self.spill_bytes > self.capacity:
                self._remove(next(iter(self._files)))

    # --- reading -----------------------------------------------------------------------------

    def get(self, pack: str, off: int, length: int) -> bytes | memoryview | None:
        """The sealed bytes [off, off+length) of a pack, from a chunk file or a pack file
        (or the queue: then possibly a view of an immutable GET answer, not a copy)."""
        if not valid_pack(pack):
            return None
        for name, start in ((f"{pack}-{off:x}", 0), (pack, off)):
            with self._lock:
                waiting = self._pending.get(name)
                if waiting is not None and len(waiting) == length:
                    self.hits += 1
                    return waiting  # bytes, or a view of bytes: no one can change it
                known = name in self._files
                spilled = name == pack and pack in self._spilled
            if not known and not spilled:
                continue
            path = self.folder / name if known else self.spill_folder / pack
            blob = pread_entry(path, start, length)
            if blob is None:  # another mount evicted it: a miss, not a bad entry
                with self._lock:
                    self._remove(name, unlink=False)
                continue
            if len(blob) != length:
                self.drop(pack, off)
                continue
            with self._lock:
                if name in self._files:
                    self._files.move_to_end(name)
                    # The mtime follows with the next batch of writes or at unmount.
                    self._clock = max(time.time_ns(), self._clock + 1)
                    self._stamps[name] = self._clock
                self.hits += 1
            return blob
        with self._lock:
            self.misses += 1
        return None

    def _stamp(self) -> int:
        """A use time for an mtime, so the LRU order survives a remount. Strictly increasing:
        file systems stamp times with a coarse clock, and ties would lose the order."""
        with self._lock:
            self._clock = max(time.time_ns(), self._clock + 1)
            return self._clock

    def _touch(self, path: Path) -> None:
        stamp = self._stamp()
        with contextlib.suppress(OSError):
            os.utime(path, ns=(stamp, stamp))

    def used(self, pack: str, off: int) -> None:
        """A reader took this chunk from the memory cache: its entry becomes the newest.

        Without this, the order would be that of fetches, not of use: a chunk fetched early
        beside another (read-around) but read last would go first. No system call here (it
        runs for every memory hit, on the event loop): the order changes in memory at once
        and reaches the files' mtimes with the next write here or `save_order` at unmount.
        Never waits for the lock (a worker may hold it while deleting files): skipped then.
        """
        if not self._lock.acquire(blocking=False):
            return
        try:
            for name in (f"{pack}-{off:x}", pack):
                if name in self._files:
                    self._files.move_to_end(name)
                    self._clock = max(time.time_ns(), self._clock + 1)
                    self._stamps[name] = self._clock
                    return
        finally:
            self._lock.release()

    def save_order(self) -> None:
        """Write the use order `used` kept in memory into the files' mtimes (blocking)."""
        with self._lock:
            stamps, self._stamps = self._stamps, {}
        for name, stamp in stamps.items():
            with contextlib.suppress(OSError):  # evicted meanwhile
                os.utime(self.folder / name, ns=(stamp, stamp))

    def holds(self, pack: str, off: int) -> bool:
        """Whether a chunk at `off` of `pack` may be served from disk (a hint, not a promise)."""
        chunk = f"{pack}-{off:x}"
        with self._lock:
            return (
                chunk in self._pending
                or chunk in self._files
                or pack in self._files
                or pack in self._spilled
            )

    def drop(self, pack: str, off: int) -> None:
        """Forget the entries that served a bad chunk; the next read goes to the bucket."""
        with self._lock:
            self.dropped += 1
            self._remove(f"{pack}-{off:x}")
            self._remove(pack)

    # --- filling -----------------------------------------------------------------------------

    def put_chunk(self, pack: str, off: int, data: bytes | memoryview) -> None:
        """Keep one sealed chunk (see put_chunks)."""
        self.put_chunks(pack, [(off, data)])

    def put_chunks(self, pack: str, entries: list[tuple[int, bytes | memoryview]]) -> None:
        """Keep sealed chunks of one pack, (offset, bytes): queued for the writer thread,
        served from memory until written. A reader waits for no disk write.

        Views of one immutable answer that fill at least half of it (a run of a pack: one
        GET) are queued as they are, all of them or none, so what the queue keeps alive is at
        most twice what it counts; anything else is copied: a slice of a read-around's answer
        would keep all of it alive for one small chunk, and a view of a buffer that can
        change would alias what is written next into it.
        """
        if not valid_pack(pack):
            return
        # One entry may not push out most of the cache.
        entries = [(off, data) for off, data in entries if len(data) <= self.capacity // 4]
        total = sum(len(data) for _, data in entries)
        with self._lock:
            if self._closed or not entries:
                return
            # A copy of each chunk of a run was a third of a cold read's page faults
            # (design.md, "Where a cold read's CPU goes").
            share = self._pending_bytes + total <= PENDING_MAX and _one_answer(entries, total)
            for off, data in entries:
                if self._pending_bytes + len(data) > PENDING_MAX:
                    continue
                name = f"{pack}-{off:x}"
                self._drop_pending(name)
                self._pending[name] = data if share else bytes(data)
                self._pending_bytes += len(data)
            if self._writer is None or self._writer_pid != os.getpid():
                self._writer = threading.Thread(
                    target=self._write_pending, name="disk-cache-writer", daemon=True
                )
                self._writer_pid = os.getpid()
                self._writer.start()
            self._wake.notify()

    def put_pack(self, pack: str, blob: bytes | bytearray | memoryview) -> None:
        with self._lock:  # chunk files of the pack are now redundant
            for name in [n for n in self._by_pack.get(pack, ()) if n != pack]:
                self._remove(name)
            for name in [n for n in self._pending if n.startswith(f"{pack}-")]:
                self._drop_pending(name)
        if not valid_pack(pack) or len(blob) > self.capacity // 4:
            return
        if self._write(pack, blob):
            self._evict()

    def _write(self, name: str, data: bytes | bytearray | memoryview) -> bool:
        """One entry to disk and into the index; False if the disk refused it."""
        try:
            write_whole(self.folder / name, data, self.spill_folder, self._stamp())
        except OSError as exc:  # a full or read-only disk costs speed, never correctness
            log.warning("disk cache: cannot write an entry (%s)", exc.strerror)
            return False
        with self._lock:
            self._add(name, len(data))
            self._written += len(data)
        return True

    def _write_pending(self) -> None:
        """The writer thread: queued chunk entries to disk in batches; one eviction pass and
        one write of the use order per batch, not per entry."""
        while True:
            with self._lock:
                self._idle = True
                self._drained.notify_all()
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return
                self._idle = False
                batch, size = [], 0
                for item in self._pending.items():  # bounded: the rescans below stay frequent
                    batch.append(item)
                    size += len(item[1])
                    if size >= self.capacity // 16:
                        break
            try:
                self._write_batch(batch)
            except OSError as exc:  # e.g. the folder became unreadable: entries are misses
                log.warning("disk cache: %s", exc)

    def _write_batch(self, batch: list[tuple[str, bytes | memoryview]]) -> None:
        for name, data in batch:
            ok = self._write(name, data)
            with self._lock:
                if self._pending.get(name) is data:
                    self._drop_pending(name)
                elif ok and name not in self._pending:  # dropped while being written
                    self._remove(name)
        self._evict()
        self.save_order()
        if self._written > self.capacity // 8 and self._others():
            self._written = 0
            self._rescan()
            self._evict()

    def _others(self) -> bool:
        self._shared = self._shared or self._room.others()
        return self._shared

    def flush(self) -> None:
        """Wait until the queued entries are on disk and in the index (blocking)."""
        with self._lock:
            writer = self._writer if self._writer_pid == os.getpid() else None
            while writer is not None and writer.is_alive() and (self._pending or not self._idle):
                self._drained.wait(1.0)

    def close(self) -> None:
        """At unmount: write what is queued, save the use order, give up the spill folder
        (its packs are uploaded or spooled by now)."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            writer = self._writer if self._writer_pid == os.getpid() else None
        if writer is not None:
            writer.join()
        if self._others():  # the last to stop sees what all wrote: the folder within budget
            self._rescan()
            self._evict()
        self.save_order()
        self._room.close(remove=True)

    def forget_pack(self, pack: str) -> None:
        """A pack left the bucket: its entries can never be asked for again."""
        with self._lock:
            for name in list(self._by_pack.get(pack, ())):
                self._remove(name)
            for name in [n for n in self._pending if n.startswith(f"{pack}-")]:
                self._drop_pending(name)

    # --- spilled packs -----------------------------------------------------------------------

    def can_spill(self, size: int) -> bool:
        with self._lock:
            return self.spill_bytes + size <= self.capacity

    def spill(self, pack: str, blob: bytes | bytearray | memoryview) -> None:
        """Keep a sealed pack on disk until it is uploaded (raises OSError if it cannot)."""
        if not valid_pack(pack):
            raise OSError(f"not a pack id: {pack!r}")
        write_whole(self.spill_folder / pack, blob, self.spill_folder)
        with self._lock:
            self._spilled[pack] = len(blob)
            self.spill_bytes += len(blob)
        self._evict()

    def read_spilled(self, pack: str) -> bytearray:
        with open(self.spill_folder / pack, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            blob = bytearray(size)
            view = memoryview(blob)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    raise OSError(f"spilled pack {pack} is shorter than it was")
                got += n
        return blob

    def spill_landed(self, pack: str) -> None:
        """The pack is in the bucket: its spill file becomes an ordinary (evictable) entry."""
        src = self.spill_folder / pack
        with self._lock:
            size = self._spilled.pop(pack, None)
            if size is None:
                return
            self.spill_bytes -= size
        if size > self.capacity // 4:
            unlink_quietly(src)
            return
        os.replace(src, self.folder / pack)
        self._touch(self.folder / pack)
        with self._lock:
            self._add(pack, size)
        self._evict()


def _one_answer(entries: list[tuple[int, bytes | memoryview]], total: int) -> bool:
    """Whether the entries are views of one `bytes` object (no one can change it), together
    at least half of it; or are `bytes` themselves (each is then its own answer)."""
    if all(type(data) is bytes for _, data in entries):
        return True
    first = entries[0][1]
    answer = first.obj if isinstance(first, memoryview) else None
    if type(answer) is not bytes:
        return False
    same = all(isinstance(data, memoryview) and data.obj is answer for _, data in entries)
    return same and 2 * total >= len(answer)
