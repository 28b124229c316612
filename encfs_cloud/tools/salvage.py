"""Salvage: copy every intact file out of a damaged filesystem, from its newest readable state."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from encfs_cloud import layout
from encfs_cloud.errors import (
    EXIT_ALL_SAVED,
    EXIT_SOME_LOST,
    IntegrityError,
    ObjectMissingError,
    StoreError,
    UsageError,
)
from encfs_cloud.keys.sealed import Sealer, object_generation
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree import acl
from encfs_cloud.tree.journal import (
    KIND_DELTA,
    KIND_SNAPSHOT,
    CommitInfo,
    Head,
    apply_delta,
    check_generation,
    commit_hash,
    decode_commit,
    load_snapshot,
    replay,
)
from encfs_cloud.tree.metadata import ROOT_INODE, ChunkRef, Inode, Metadata

READ_THREADS = 8
READ_WINDOW = 16  # chunks of one file fetched ahead of the writer
PARTIAL_SUFFIX = b".salvage-partial"
_FATAL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # DEST itself fails: stop, do not go on

Progress = Callable[[int, int], None]  # (bytes copied, bytes in all files)
# Left in DEST while a salvage runs: a DEST holding it may be salvaged into again (resumed).
INCOMPLETE = b".encfs-cloud-salvage-incomplete"


# --- the newest replayable state ----------------------------------------------------------


@dataclass
class Recovered:
    """The newest metadata state that replays, and why it is not the newest commit if not."""

    md: Metadata
    head: Head
    newest_seq: int  # the newest commit in the bucket
    problems: list[str] = field(default_factory=list)  # empty: the head itself replayed

    @property
    def complete(self) -> bool:
        return not self.problems


def commit_seqs(store: ObjectStore) -> list[int]:
    names = (o.name for o in store.list(layout.META_PREFIX))
    return sorted(s for s in (layout.commit_seq(n) for n in names) if s is not None)


def _open_commit(
    store: ObjectStore, sealer: Sealer, seq: int
) -> tuple[CommitInfo, bytes, bytes] | str:
    """(info, body, sealed bytes) of one commit, or why it cannot be used."""
    name = layout.commit_name(seq)
    try:
        sealed = store.get(name)
        info, body = decode_commit(name, sealer.open_object(name, "commit", sealed))
    except ObjectMissingError:
        return f"metadata commit {seq} is missing"
    except IntegrityError as exc:
        return f"metadata commit {seq}: {exc}"
    return info, body, sealed


def recover_state(store: ObjectStore, sealer: Sealer) -> Recovered:
    """The strict replay if it works; else the newest snapshot that opens plus every delta
    after it that opens and chains (an older snapshot chain if the newest one is broken)."""
    seqs = commit_seqs(store)
    if not seqs:  # initialized but never written: the empty state (no root yet)
        return Recovered(Metadata(), Head(0, b"", 0, 0, 0), 0)
    try:
        md, head, _ = replay(store, sealer)
        return Recovered(md, head, max(seqs[-1], head.seq))
    except IntegrityError as exc:
        first = str(exc)
    present = set(seqs)
    problems = [first]
    for snap in reversed(seqs):
        opened = _open_commit(store, sealer, snap)
        if isinstance(opened, str) or opened[0].kind != KIND_SNAPSHOT:
            continue
        try:
            gen = _ratchet(sealer, snap, opened[2], 0)
            md = load_snapshot(opened[1])
        except IntegrityError as exc:
            problems.append(f"metadata commit {snap}: {exc}")
            continue
        seq, prev, delta_bytes = snap, commit_hash(opened[2]), 0
        while seq + 1 in present:
            nxt = _open_commit(store, sealer, seq + 1)
            if isinstance(nxt, str):
                problems.append(nxt)
                break
            info, body, sealed = nxt
            if info.kind != KIND_DELTA or info.snapshot_seq != snap or info.prev_hash != prev:
                problems.append(f"metadata commit {seq + 1} does not chain to commit {seq}")
                break
            try:
                gen = _ratchet(sealer, seq + 1, sealed, gen)
                apply_delta(md, body)
            except IntegrityError as exc:
                problems.append(f"metadata commit {seq + 1}: {exc}")
                break
            seq, prev, delta_bytes = seq + 1, commit_hash(sealed), delta_bytes + len(sealed)
        else:
            if seq < seqs[-1]:
                problems.append(f"metadata commit {seq + 1} is missing")
        head = Head(seq, prev, snap, seq - snap, delta_bytes)
        return Recovered(md, head, seqs[-1], [] if seq >= seqs[-1] else problems)
    raise IntegrityError(f"no metadata snapshot in the bucket opens ({first}); nothing to recover")


def _ratchet(sealer: Sealer, seq: int, sealed: bytes, prev_gen: int) -> int:
    name = layout.commit_name(seq)
    return check_generation(sealer, name, seq, object_generation(sealed), prev_gen)


# --- reading file data ---------------------------------------------------------------------


def read_chunk(
    store: ObjectStore, sealer: Sealer, ino: int, idx: int, ref: ChunkRef | None
) -> bytes | memoryview:
    """One chunk's plaintext (b"" for a hole); raises IntegrityError / StoreError."""
    if ref is None:
        return b""
    blob = store.get(layout.pack_name(ref.pack), ref.off, ref.len)
    return sealer.open_chunk(
        ino, idx, ref.version, ref.gen, ref.plain_len, blob, ref.digest, ref.pack
    )


def display(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace") or "/"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ObjectMissingError):
        return "is in a data object that is missing"
    if isinstance(exc, IntegrityError):
        return "fails authentication"
    return f"cannot be read ({exc})"


# --- copying out ------------------------------------------------------------------------


@dataclass
class SalvageResult:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    others: int = 0
    bytes: int = 0
    lost: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_LOST if self.lost else EXIT_ALL_SAVED


class Salvager:
    """Walks the tree from the root and recreates it under `dest` (a local directory)."""

    def __init__(
        self,
        store: ObjectStore,
        sealer: Sealer,
        md: Metadata,
        dest: str,
        *,
        partial: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.md = md
        self.dest = os.fsencode(dest)
        self.partial = partial
        self.progress = progress
        self.result = SalvageResult()
        self.resuming = False  # DEST holds what an interrupted run wrote: overwrite it
        self.total_bytes = md.usage()[0]
        self.copied: dict[int, bytes] = {}  # inode → first path saved (hard links)
        self.pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="salvage")

    def run(self) -> SalvageResult:
        marker = os.path.join(self.dest, INCOMPLETE)
        if os.path.lexists(self.dest) and (not os.path.isdir(self.dest) or os.listdir(self.dest)):
            if not os.path.isfile(marker):  # only what an interrupted salvage left is redone
                raise UsageError(f"{display(self.dest)} exists and is not an empty directory")
            self.resuming = True
        os.makedirs(self.dest, mode=0o700, exist_ok=True)
        # Present until the copy is complete: an interrupted run is resumed by running again.
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        result = self._copy()
        os.unlink(marker)
        return result

    def _copy(self) -> SalvageResult:
        root = self.md.get_inode(ROOT_INODE)
        dirs: list[tuple[bytes, Inode]] = []
        try:
            if root is None or not root.is_dir:
                self.result.lost.append(("/", "the root directory is missing"))
                return self.result
            dirs.append((self.dest, root))
            self._walk(root, dirs)
        finally:
            self.pool.shutdown(wait=True)
        # Modes and times last, children first: a read-only directory must not block its
        # own filling, and writing into a directory changes its mtime.
        for path, inode in reversed(dirs):
            self._attributes(path, inode)
        return self.result

    def _walk(self, root: Inode, dirs: list[tuple[bytes, Inode]]) -> None:
        stack: list[tuple[bytes, int]] = [(self.dest, root.id)]
        seen_dirs = {root.id}
        while stack:
            folder, ino = stack.pop()
            rows = self.md.db.execute(
                "SELECT name, inode FROM dentries WHERE parent=? ORDER BY id", (ino,)
            ).fetchall()
            for name, child in rows:
                if folder == self.dest and bytes(name) == INCOMPLETE:
                    self.result.lost.append(("/" + INCOMPLETE.decode(), "the name is reserved"))
                    continue
                path = os.path.join(folder, bytes(name))
                rel = b"/" + os.path.relpath(path, self.dest)
                inode = self.md.get_inode(child)
                try:
                    if inode is None:
                        self.result.lost.append((display(rel), "its inode is missing"))
                    elif not inode.is_dir:
                        self._leaf(path, rel, inode)
                    elif child not in seen_dirs:  # (a second name for a directory is skipped)
                        seen_dirs.add(child)
                        if not (self.resuming and os.path.isdir(path)):
                            os.mkdir(path, 0o700)
                        self.result.dirs += 1
                        self._xattrs(path, rel, inode)
                        dirs.append((path, inode))
                        stack.append((path, child))
                except OSError as exc:
                    if exc.errno in _FATAL:
                        raise
                    self.result.lost.append((display(rel), f"cannot be created: {exc.strerror}"))

    def _leaf(self, path: bytes, rel: bytes, inode: Inode) -> None:
        if self.resuming and os.path.lexists(path):
            os.unlink(path)  # written by the interrupted run, maybe half: written again
        first = self.copied.get(inode.id)
        if first is not None:
            os.link(first, path, follow_symlinks=False)
            return
        if inode.is_reg:
            if not self._file(path, rel, inode):
                return
            self.result.files += 1
        elif stat.S_ISLNK(inode.mode):
            if inode.target is None:
                self.result.lost.append((display(rel), "symlink without a target"))
                return
            os.symlink(inode.target, path)
            self.result.symlinks += 1
        else:
            try:
                os.mknod(path, inode.mode, inode.rdev)
            except OSError as exc:
                self.result.lost.append((display(rel), f"cannot make the node: {exc.strerror}"))
                return
            self.result.others += 1
        self.copied[inode.id] = path
        self._xattrs(path, rel, inode)
        self._attributes(path, inode)

    def _file(self, path: bytes, rel: bytes, inode: Inode) -> bool:
        """Copy one regular file; False (and listed as lost) if any chunk fails."""
        bad: list[tuple[int, str]] = []
        count = layout.chunk_count(inode.size)
        written = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            window: deque[tuple[int, Future[bytes | memoryview]]] = deque()
            for idx in range(count):
                # The row is looked up here: the SQLite connection stays on this thread.
                ref = self.md.get_chunk(inode.id, idx)
                job = self.pool.submit(read_chunk, self.store, self.sealer, inode.id, idx, ref)
                window.append((idx, job))
                if len(window) >= READ_WINDOW or idx == count - 1:
                    while window:
                        written += self._write_chunk(fd, inode, *window.popleft(), bad)
            os.ftruncate(fd, inode.size)
        finally:
            os.close(fd)
        if not bad:
            self.result.bytes += written
            return True
        what = ", ".join(f"chunk {i} {why}" for i, why in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        if self.partial:
            os.rename(path, path + PARTIAL_SUFFIX)
            what += f"{more}; what could be read is in {display(rel + PARTIAL_SUFFIX)}"
            more = ""
        else:
            os.unlink(path)
        self.result.lost.append((display(rel), what + more))
        return False

    def _write_chunk(
        self,
        fd: int,
        inode: Inode,
        idx: int,
        future: Future[bytes | memoryview],
        bad: list[tuple[int, str]],
    ) -> int:
        """Write one fetched chunk in place; returns the bytes written (0 if it failed)."""
        try:
            data = future.result()
        except (IntegrityError, StoreError) as exc:
            bad.append((idx, _reason(exc)))
            return 0
        base = idx * layout.CHUNK_SIZE
        data = data[: max(0, inode.size - base)]
        if data:
            os.pwrite(fd, data, base)
            if self.progress:
                self.progress(self.result.bytes + len(data), self.total_bytes)
        return len(data)

    def _xattrs(self, path: bytes, rel: bytes, inode: Inode) -> None:
        names = self.md.list_xattrs(inode.id)
        if not stat.S_ISLNK(inode.mode):
            # Made inside a copied directory with a default ACL, the copy inherited an ACL
            # that the original may not have had (removed, or set after it was created).
            for name in set(acl.NAMES) - set(names):
                with contextlib.suppress(OSError):
                    os.removexattr(path, name)
        for name in names:
            value = self.md.get_xattr(inode.id, name) or b""
            try:
                os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as exc:
                why = f"extended attribute {display(name)} not set: {exc.strerror}"
                self.result.lost.append((display(rel), why))

    def _attributes(self, path: bytes, inode: Inode) -> None:
        link = stat.S_ISLNK(inode.mode)
        if os.geteuid() == 0:
            os.lchown(path, inode.uid, inode.gid)  # before chmod: chown clears set-id bits
        if not link:
            os.chmod(path, stat.S_IMODE(inode.mode))
        os.utime(path, ns=(inode.atime_ns, inode.mtime_ns), follow_symlinks=False)


def salvage(
    store: ObjectStore,
    sealer: Sealer,
    dest: str,
    *,
    partial: bool = False,
    progress: Progress | None = None,
) -> tuple[Recovered, SalvageResult]:
    state = recover_state(store, sealer)
    if state.newest_seq == 0:
        state.md.db.close()
        os.makedirs(dest, mode=0o700, exist_ok=True)
        return state, SalvageResult()
    try:
        result = Salvager(store, sealer, state.md, dest, partial=partial, progress=progress).run()
    finally:
        state.md.db.close()
    if not state.complete:
        lost = f"changes after metadata commit {state.head.seq} ({'; '.join(state.problems)})"
        result.lost.insert(0, ("(newest changes)", lost))
    return state, result
