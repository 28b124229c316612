"""The sealed disk cache: bucket ciphertext kept on local disk, evicted LRU within a budget."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

from encfs_cloud.keys.privfiles import check_private_dir, make_private_dir

log = logging.getLogger(__name__)

SPILL_DIR = "spill"
FOLDERS_FILE = "cache-folders"  # in the device folder: cache_dir= folders used
DEFAULT_MAX = 1 << 30  # the default budget: 1 GiB or a tenth of the free space, the smaller
_TMP = ".tmp"


def default_folder(fs_id: bytes) -> Path:
    """`$XDG_CACHE_HOME/encfs-cloud/<fs id hex>` (XDG's default: ~/.cache)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "encfs-cloud" / fs_id.hex()


def default_size(folder: Path) -> int:
    """1 GiB, or a tenth of the free space where the cache lives if that is less."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return DEFAULT_MAX
    return min(DEFAULT_MAX, free // 10)


def remember(device_folder: Path, folder: Path) -> None:
    """Note a cache folder given with `cache_dir=` in the device folder, so `wipe` finds it."""
    record = device_folder / FOLDERS_FILE
    known = set(record.read_text().splitlines()) if record.is_file() else set()
    if str(folder) in known or not device_folder.is_dir():
        return
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{folder}\n")


def remove_all(device_folder: Path, fs_id: bytes) -> list[Path]:
    """Delete the default cache folder and every one `remember` noted; returns those removed.

    They hold only ciphertext, so unlike the device key they need no overwrite.
    """
    record = device_folder / FOLDERS_FILE
    folders = [default_folder(fs_id)]
    if record.is_file():
        folders += [Path(line) for line in record.read_text().splitlines() if line]
    removed = []
    for folder in folders:
        # Only folders named after the filesystem: never one the user named in cache_dir=.
        if folder.name == fs_id.hex() and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    with contextlib.suppress(OSError):  # like the device folder's root: gone once empty
        default_folder(fs_id).parent.rmdir()
    return removed


class DiskCache:
    """Sealed chunks and whole sealed packs, byte for byte as the bucket holds them.

    Entries are files named after the pack (`<pack id>`: a whole pack) or a chunk's slot in it
    (`<pack id>-<offset hex>`); nothing in them or their names is plaintext. The reader opens
    every sealed chunk again with its associated data, so a damaged or altered file can only
    fail authentication: the caller then drops it and fetches from the bucket. Files are not
    fsynced for the same reason: a torn file after a crash is just a miss.

    `spill/` holds sealed packs written while the bucket was slower than the writer: pinned
    (never evicted) until uploaded, then moved into the cache. All methods run in worker
    threads; one lock guards the index.
    """

    def __init__(self, folder: Path, capacity: int, *, keep_spill: bool = False) -> None:
        self.folder = folder
        self.capacity = capacity
        if not folder.parent.exists():
            make_private_dir(folder.parent)
        make_private_dir(folder)
        check_private_dir(folder)
        self.spill_folder = folder / SPILL_DIR
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # name → size, oldest first
        self._by_pack: dict[str, set[str]] = {}
        self._stamps: dict[str, int] = {}  # name → use time not yet in its mtime
        self.bytes = 0
        self.spill_bytes = 0
        self.hits = 0
        self.misses = 0
        self.dropped = 0  # entries that failed authentication or had the wrong size
        self._clock = 0
        self._load(keep_spill)

    def _load(self, keep_spill: bool) -> None:
        entries: list[tuple[float, str, int]] = []
        for entry in os.scandir(self.folder):
            if entry.name == SPILL_DIR:
                continue
            if not entry.is_file(follow_symlinks=False):
                continue  # not ours: never served, never counted
            if entry.name.endswith(_TMP):
                _unlink(Path(entry.path))  # an interrupted write
                continue
            st = entry.stat(follow_symlinks=False)
            entries.append((st.st_mtime_ns, entry.name, st.st_size))
        for _, name, size in sorted(entries):
            self._add(name, size)
        if self.spill_folder.is_dir() and not keep_spill:
            # Spilled packs of a mount that crashed: no commit names them (a commit waits for
            # its packs to land), so they hold nothing that was acknowledged by fsync.
            shutil.rmtree(self.spill_folder, ignore_errors=True)
        make_private_dir(self.spill_folder)
        self._evict()

    # --- index -------------------------------------------------------------------------------

    def _add(self, name: str, size: int) -> None:
        old = self._files.pop(name, None)
        if old is not None:
            self.bytes -= old
        self._files[name] = size
        self._by_pack.setdefault(name.split("-", 1)[0], set()).add(name)
        self.bytes += size

    def _remove(self, name: str) -> None:
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
        _unlink(self.folder / name)

    def _evict(self) -> None:
        with self._lock:
            while self._files and self.bytes + self.spill_bytes > self.capacity:
                self._remove(next(iter(self._files)))

    # --- reading -----------------------------------------------------------------------------

    def get(self, pack: str, off: int, length: int) -> bytes | None:
        """The sealed bytes [off, off+length) of a pack, from a chunk file or a pack file."""
        if not _valid(pack):
            return None
        for name, start in ((f"{pack}-{off:x}", 0), (pack, off)):
            with self._lock:
                known = name in self._files
            if not known and not (name == pack and self._spilled(pack)):
                continue
            path = self.folder / name if known else self.spill_folder / pack
            blob = _pread(path, start, length)
            if blob is None or len(blob) != length:
                self.drop(pack, off)
                continue
            with self._lock:
                if name in self._files:
                    self._files.move_to_end(name)
                self.hits += 1
            self._touch(path)
            return blob
        with self._lock:
            self.misses += 1
        return None

    def _touch(self, path: Path) -> None:
        """Record use in the mtime, so the LRU order survives a remount. Strictly increasing:
        file systems stamp times with a coarse clock, and ties would lose the order."""
        with self._lock:
            self._clock = max(time.time_ns(), self._clock + 1)
            stamp = self._clock
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
        with self._lock:
            if f"{pack}-{off:x}" in self._files or pack in self._files:
                return True
        return self._spilled(pack)

    def drop(self, pack: str, off: int) -> None:
        """Forget the entries that served a bad chunk; the next read goes to the bucket."""
        with self._lock:
            self.dropped += 1
            self._remove(f"{pack}-{off:x}")
            self._remove(pack)

    # --- filling -----------------------------------------------------------------------------

    def put_chunk(self, pack: str, off: int, data: bytes | memoryview) -> None:
        self._put(f"{pack}-{off:x}", data)

    def put_pack(self, pack: str, blob: bytes | bytearray | memoryview) -> None:
        with self._lock:  # chunk files of the pack are now redundant
            for name in [n for n in self._by_pack.get(pack, ()) if n != pack]:
                self._remove(name)
        self._put(pack, blob)

    def _put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        if not _valid(name.split("-", 1)[0]):
            return
        if len(data) > self.capacity // 4:
            return  # one entry may not push out most of the cache
        try:
            _write_new(self.folder / name, data)
        except OSError as exc:  # a full or read-only disk costs speed, never correctness
            log.warning("disk cache: cannot write an entry (%s)", exc.strerror)
            return
        self._touch(self.folder / name)
        with self._lock:
            self._add(name, len(data))
        self._evict()
        self.save_order()  # a worker thread already: the uses seen since, on disk too

    def forget_pack(self, pack: str) -> None:
        """A pack left the bucket: its entries can never be asked for again."""
        with self._lock:
            for name in list(self._by_pack.get(pack, ())):
                self._remove(name)

    # --- spilled packs -----------------------------------------------------------------------

    def _spilled(self, pack: str) -> bool:
        return _valid(pack) and (self.spill_folder / pack).is_file()

    def can_spill(self, size: int) -> bool:
        with self._lock:
            return self.spill_bytes + size <= self.capacity

    def spill(self, pack: str, blob: bytes | bytearray | memoryview) -> None:
        """Keep a sealed pack on disk until it is uploaded (raises OSError if it cannot)."""
        if not _valid(pack):
            raise OSError(f"not a pack id: {pack!r}")
        _write_new(self.spill_folder / pack, blob)
        with self._lock:
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
        size = src.stat().st_size
        with self._lock:
            self.spill_bytes -= size
        if size > self.capacity // 4:
            _unlink(src)
            return
        os.replace(src, self.folder / pack)
        self._touch(self.folder / pack)
        with self._lock:
            self._add(pack, size)
        self._evict()


def _valid(pack: str) -> bool:
    """Pack ids are random hex; anything else (a forged commit naming "../x") never becomes
    a path."""
    return 0 < len(pack) <= 64 and all(c in "0123456789abcdef" for c in pack)


def _pread(path: Path, off: int, length: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return os.pread(fd, length, off)
    except OSError:
        return None
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Write to a private temporary and rename it in place: readers see whole files only."""
    tmp = path.with_name(f"{path.name}.{os.urandom(4).hex()}{_TMP}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
