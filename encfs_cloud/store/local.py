"""A local folder as a bucket (file://): atomic, durable writes and flock-guarded conditions."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import quote

from encfs_cloud import layout
from encfs_cloud.errors import (
    BadSourceError,
    ObjectMissingError,
    PreconditionFailedError,
    StoreError,
)
from encfs_cloud.store.base import ObjectInfo, check_name
from encfs_cloud.store.memory import check_range

log = logging.getLogger(__name__)

LOCK_NAME = ".encfs-cloud-lock"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_etag(st: os.stat_result) -> str:
    """An etag from the file's identity, not its bytes: hashing every 8 MiB pack on put cost
    more CPU than sealing it. Every put is a new file renamed into place (a new inode and
    ctime), and a change behind our back moves ctime too, so the etag changes whenever the
    object does, which is all conditional writes need."""
    return f"{st.st_ino:x}-{st.st_ctime_ns:x}-{st.st_size:x}"


class LocalStore:
    """Object `a/b` is the file `<root>/a/b`; names starting with '.' never show in `list()`.

    Every rename into place and every delete happens under an exclusive `flock` on
    `<root>/.encfs-cloud-lock`, so a conditional write's check and its rename are one step for
    all threads and all processes sharing the folder. Data is written to a hidden temp file in
    the target's folder and renamed into place: a crash leaves either the old object or the
    new one, never a torn one under a name something durable refers to.

    Packs (`data/...`, always new names) are renamed into place without an fsync; every other
    put or delete (a commit, a snapshot, the head, the lease, keys), and `close()`, first
    fsyncs every pack put so far and its folder (`barrier()`). A commit names only packs whose
    put returned before it, so whatever a durable commit names is durable, while the packs of
    one commit are flushed together: an fsync per pack stalled the other uploads' writes on
    the filesystem's journal (design.md, "file:// writes").
    """

    def __init__(self, root: str) -> None:
        if not os.path.isabs(root):
            raise BadSourceError(f"file:// needs an absolute path, not {root!r}")
        self.root = root
        self.url = "file://" + quote(root)
        self._unsynced: dict[str, str] = {}  # path of a pack renamed into place -> its name
        self._unsynced_lock = threading.Lock()
        self._barrier_lock = threading.Lock()  # one barrier at a time: the next waits for it
        self._lost: list[str] = []  # packs whose fsync failed: nothing is committed after

    def _path(self, name: str) -> str:
        check_name(name)
        return os.path.join(self.root, *name.split("/"))

    def _missing(self, name: str) -> ObjectMissingError:
        return ObjectMissingError(f"object {name} is missing from {self.url}")

    def get(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        check_range(start, length)
        path = self._path(name)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(name) from None
        with f:
            if start:
                f.seek(start)
            return f.read() if length is None else f.read(length)

    def get_with_etag(self, name: str, limit: int | None = None) -> tuple[bytes, str]:
        # fstat of the open file: the etag and the bytes describe the same version.
        try:
            f = open(self._path(name), "rb")  # noqa: SIM115 - closed by the with below
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(name) from None
        with f:
            return f.read(-1 if limit is None else limit), _file_etag(os.fstat(f.fileno()))

    def put(
        self,
        name: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        path = self._path(name)
        if if_none_match and if_match is not None:
            raise ValueError("if_none_match and if_match are mutually exclusive")
        deferred = name.startswith(layout.DATA_PREFIX) and not if_none_match and if_match is None
        if not deferred:
            self.barrier()
        folder = os.path.dirname(path)
        self._make_folders(name, folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if deferred:
                    # Start writing it back now, without waiting: the barrier's fsync then
                    # waits for less. (On Linux, DONTNEED starts writeback of dirty pages
                    # and drops only clean ones.)
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                else:
                    os.fsync(f.fileno())
            with self._locked():
                if if_none_match or if_match is not None:
                    self._check_condition(name, path, if_none_match, if_match)
                try:
                    os.replace(tmp, path)
                except IsADirectoryError:
                    raise StoreError(
                        f"{self.url}: {name} is a folder of other objects, not an object"
                    ) from None
                etag = _file_etag(os.stat(path))  # under the lock: this version's etag
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if deferred:
            with self._unsynced_lock:
                self._unsynced[path] = name
        else:
            _fsync_dir(folder)
        log.debug("put %s (%d bytes)", name, len(data))
        return etag

    def barrier(self) -> None:
        """Make every pack put so far durable: its data, then its folder's entry.

        A pack whose fsync fails is removed and the error raised (as `StoreError`): after a
        failed fsync the kernel may have dropped the pages, and a later fsync would not say
        so, so the commit about to name it must fail rather than name bytes that may be gone.
        The failure stays: the committer retries the same commit, which names the lost pack,
        and its landing would have made a user's fsync(2) return success for lost data.
        """
        with self._barrier_lock:
            if self._lost:
                raise StoreError(
                    f"{self.url}: the disk lost {', '.join(self._lost)} (fsync failed); this "
                    "mount commits nothing more: unmount, check the disk, then run fsck"
                )
            with self._unsynced_lock:
                batch, self._unsynced = self._unsynced, {}
            if not batch:
                return
            failed: list[str] = []
            for path, name in batch.items():
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # deleted since its put: nothing refers to it
                try:
                    os.fsync(fd)
                except OSError as exc:
                    log.warning("fsync of %s failed (%s); removing it", name, exc)
                    failed.append(name)
                    with suppress(OSError):
                        os.unlink(path)
                finally:
                    os.close(fd)
            for folder in sorted({os.path.dirname(p) for p in batch}):
                _fsync_dir(folder)
            if failed:
                self._lost = failed
                raise StoreError(f"{self.url}: could not make {', '.join(failed)} durable")

    def _check_condition(
        self, name: str, path: str, if_none_match: bool, if_match: str | None
    ) -> None:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            current = None
        else:
            current = _file_etag(st) if stat.S_ISREG(st.st_mode) else None
        if if_none_match and current is not None:
            raise PreconditionFailedError(f"{self.url}: {name} already exists")
        if if_match is not None and current != if_match:
            raise PreconditionFailedError(f"{self.url}: {name} changed since it was read")

    def _make_folders(self, name: str, folder: str) -> None:
        """Create the root (only if its parent exists) and the object's folders, durably."""
        if not os.path.isdir(self.root):
            parent = os.path.dirname(self.root)
            if not os.path.isdir(parent):
                raise BadSourceError(f"{parent} does not exist: create it, or pick another folder")
            with suppress(FileExistsError):
                os.mkdir(self.root, 0o700)
            _fsync_dir(parent)
        rel = os.path.relpath(folder, self.root)
        current = self.root
        for part in [] if rel == "." else rel.split(os.sep):
            parent, current = current, os.path.join(current, part)
            try:
                os.mkdir(current, 0o700)
            except FileExistsError:
                if not os.path.isdir(current):
                    raise StoreError(
                        f"{self.url}: cannot store {name}, {current} is an object, not a folder"
                    ) from None
                continue
            _fsync_dir(parent)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # A fresh open file description per call: flock then excludes other threads of this
        # process exactly as it excludes other processes.
        fd = os.open(
            os.path.join(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        path = self._path(name)
        if not os.path.isdir(self.root):
            return
        if not name.startswith(layout.DATA_PREFIX):
            self.barrier()
        with self._locked():
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
        _fsync_dir(os.path.dirname(path))
        log.debug("delete %s", name)

    def head(self, name: str) -> ObjectInfo | None:
        path = self._path(name)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                return None
            return ObjectInfo(name, st.st_size, _file_etag(st))
        except (FileNotFoundError, NotADirectoryError):
            return None  # also when it vanished between stat and hashing

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Only the folder the prefix points into is walked. Names are sorted as whole strings
        # at the end, because a folder walk would put "a/b" before "a-c" and S3 does not.
        folder, _, _ = prefix.rpartition("/")
        if folder:
            try:
                check_name(folder)
            except ValueError:
                return  # no valid object name has this prefix
        names: list[str] = []
        stack = [(os.path.join(self.root, *folder.split("/")), folder + "/" if folder else "")]
        while stack:
            path, rel = stack.pop()
            try:
                entries = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                candidate = rel + entry.name
                if entry.is_dir(follow_symlinks=False):
                    sub = candidate + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        stack.append((entry.path, sub))
                elif entry.is_file(follow_symlinks=False) and candidate.startswith(prefix):
                    names.append(candidate)
        for name in sorted(names):
            info = self.head(name)
            if info is not None:  # deleted while we listed
                yield info

    def close(self) -> None:
        self.barrier()
