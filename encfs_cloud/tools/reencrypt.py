"""Re-encryption: every chunk and the metadata sealed again under the newest key generation."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from encfs_cloud import layout
from encfs_cloud.daemon import runtime
from encfs_cloud.daemon.exclusive import refuse_if_mounted
from encfs_cloud.daemon.lease import FencedStore, Lease
from encfs_cloud.errors import LeaseHeldError, PreconditionFailedError, RollbackError
from encfs_cloud.keys.device import DeviceState, DeviceStore
from encfs_cloud.keys.records import parse_header, seal_header, verify_header
from encfs_cloud.keys.sealed import OBJECT_MAGIC, Sealer, sealed_chunk_len
from encfs_cloud.keys.vault import Unlocked
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree.journal import (
    KIND_DELTA,
    KIND_SNAPSHOT,
    CommitInfo,
    Head,
    commit_hash,
    export_delta,
    export_snapshot,
    replay,
    rollback_problem,
    seal_commit,
)
from encfs_cloud.tree.metadata import ChunkRef, Metadata

log = logging.getLogger(__name__)

# A delta commit after this much re-sealed data: what an interrupted run keeps. A run resumes
# from the newest commit, so re-running after an interruption finishes the job.
COMMIT_EVERY_BYTES = 64 << 20
IO_THREADS = 4
READ_AHEAD = 4  # old packs fetched ahead of the one being re-sealed
_OBJECT_HEAD = struct.Struct(">4sI")  # a sealed object starts with magic and key generation

Progress = Callable[[int, int], None]


@dataclass
class Report:
    """What one run did."""

    generation: int
    chunks: int = 0
    packs_written: int = 0
    objects_deleted: int = 0
    committed: bool = False


# --- is it mounted? ---------------------------------------------------------------------------


def _source_key(source: str) -> tuple[str, ...]:
    """A normalised SOURCE, so file:///a//b/ and file:///a/b name the same filesystem."""
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return (scheme, os.path.normpath(unquote(parts.path)))
    if scheme == "s3":
        return (scheme, parts.netloc, parts.path.strip("/"))
    return (source,)


def _unescape_mounts(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted_here(source: str, fs_id: bytes) -> str | None:
    """Where this machine has the filesystem mounted, or None.

    Only this machine can be checked: until the single-writer lease exists, a mount on
    another machine is not visible here (see docs: re-encrypt with every mount unmounted).
    """
    key = _source_key(source)
    for entry in runtime.live_mounts():
        other = str(entry.get("source", ""))
        if entry.get("fs_id") == fs_id.hex() or (other and _source_key(other) == key):
            return str(entry.get("mountpoint"))
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if (
            len(fields) >= 3
            and fields[2] == "fuse.encfs-cloud"
            and _source_key(_unescape_mounts(fields[0])) == key
        ):
            return _unescape_mounts(fields[1])
    return None


def ensure_unmounted(source: str, fs_id: bytes) -> None:
    where = mounted_here(source, fs_id)
    if where is not None:
        raise LeaseHeldError(f"the filesystem is mounted at {where}; unmount it first")


@contextlib.contextmanager
def exclusive(
    store: ObjectStore, unlocked: Unlocked, source: str, *, takeover: bool = False
) -> Iterator[ObjectStore]:
    """The store, written only while we hold the single-writer lease (kept renewed).

    The lease keeps read-write mounts anywhere away; a read-only mount takes no lease, so
    this machine's mounts are checked too (one elsewhere would see its packs vanish).
    """
    ensure_unmounted(source, unlocked.fs_id)
    device = unlocked.device
    lease = Lease(store, Sealer(unlocked.fs_id, unlocked.keys), device.device_id, device.name)
    lease.acquire(takeover=takeover, how="--takeover")
    try:
        # Mounts that started before we took the lease (elsewhere too) must be gone.
        refuse_if_mounted(store, Sealer(unlocked.fs_id, unlocked.keys), takeover=takeover)
        with lease.renewed_in_background():
            yield FencedStore(store, lease)
    finally:
        lease.release()


# --- packs ------------------------------------------------------------------------------------


class _PackWriter:
    """Collects re-sealed chunks into new packs and uploads them on worker threads."""

    def __init__(
        self, store: ObjectStore, sealer: Sealer, md: Metadata, pool: ThreadPoolExecutor
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.md = md
        self.pool = pool
        self.gen = sealer.keys.current
        self.parts: list[bytes] = []
        self.pack_id = layout.random_id()
        self.entries: list[tuple[int, int, int, int, int, int, bytes]] = []
        self.size = 0
        self.uploads: deque[Future[str]] = deque()
        self.packs_written = 0
        self.bytes_since_commit = 0

    def add(self, ino: int, idx: int, version: int, plain: bytes, digest: bytes) -> None:
        if self.parts and self.size + sealed_chunk_len(len(plain)) > layout.PACK_TARGET:
            self.close()
        sealed = self.sealer.seal_chunk(ino, idx, version, plain, self.pack_id)
        self.entries.append((ino, idx, self.size, len(sealed), len(plain), version, digest))
        self.parts.append(sealed)
        self.size += len(sealed)
        self.bytes_since_commit += len(sealed)
        if self.size >= layout.PACK_TARGET:
            self.close()

    def close(self) -> None:
        """Seal the pack off: point the metadata at it and start its upload."""
        if not self.parts:
            return
        pack_id = self.pack_id
        self.pack_id = layout.random_id()  # chunks are sealed under their pack's subkey
        # Random padding is indistinguishable from ciphertext: the size class is all that shows.
        self.parts.append(os.urandom(layout.pack_class(self.size) - self.size))
        blob = b"".join(self.parts)
        self.md.add_pack(pack_id, len(blob))
        for ino, idx, off, length, plain_len, version, digest in self.entries:
            ref = ChunkRef(pack_id, off, length, plain_len, version, self.gen, digest)
            self.md.set_chunk(ino, idx, ref)
        while len(self.uploads) >= IO_THREADS:  # bounds the memory held by queued uploads
            self.uploads.popleft().result()
        self.uploads.append(self.pool.submit(self.store.put, layout.pack_name(pack_id), blob))
        self.packs_written += 1
        self.parts, self.entries, self.size = [], [], 0

    def wait(self) -> None:
        """Every closed pack is in the store (raises the first upload error)."""
        while self.uploads:
            self.uploads.popleft().result()


Plan = list[tuple[str, list[tuple[int, int, ChunkRef]]]]


def _plan(md: Metadata, gen: int) -> Plan:
    """Every pack holding a chunk of another generation, with all the chunks it holds.

    Whole packs are rewritten, not just their stale chunks: a pack left alive would keep the
    old ciphertext of the chunks moved out of it in the bucket.
    """
    rows = md.db.execute(
        "SELECT inode, idx, pack, off, len, plain_len, version, gen, digest FROM chunks "
        "WHERE pack IN (SELECT DISTINCT pack FROM chunks WHERE gen<>?) ORDER BY pack, off",
        (gen,),
    ).fetchall()
    plan: dict[str, list[tuple[int, int, ChunkRef]]] = {}
    for ino, idx, pack, off, length, plain_len, version, cgen, digest in rows:
        ref = ChunkRef(pack, off, length, plain_len, version, cgen, digest)
        plan.setdefault(pack, []).append((ino, idx, ref))
    return list(plan.items())


def _read_span(store: ObjectStore, pack: str, chunks: list[tuple[int, int, ChunkRef]]) -> bytes:
    # One ranged GET covering every live chunk: the pack's padding and dead tail stay unread.
    start = chunks[0][2].off
    end = max(ref.off + ref.len for _, _, ref in chunks)
    return store.get(layout.pack_name(pack), start, end - start)


def _read_ahead(
    pool: ThreadPoolExecutor, store: ObjectStore, plan: Plan
) -> Iterator[tuple[list[tuple[int, int, ChunkRef]], bytes]]:
    pending: deque[tuple[list[tuple[int, int, ChunkRef]], Future[bytes]]] = deque()
    todo = iter(plan)
    while True:
        while len(pending) < READ_AHEAD and (item := next(todo, None)) is not None:
            pending.append((item[1], pool.submit(_read_span, store, item[0], item[1])))
        if not pending:
            return
        chunks, future = pending.popleft()
        yield chunks, future.result()


# --- commits ----------------------------------------------------------------------------------


def _commit(
    store: ObjectStore, sealer: Sealer, md: Metadata, head: Head, *, snapshot: bool
) -> Head:
    seq = head.seq + 1
    body = export_snapshot(md) if snapshot else export_delta(md)
    info = CommitInfo(
        seq=seq,
        kind=KIND_SNAPSHOT if snapshot else KIND_DELTA,
        prev_hash=head.hash,
        snapshot_seq=seq if snapshot else head.snapshot_seq,
        time_ns=time.time_ns(),
    )
    sealed = seal_commit(sealer, info, body)
    try:
        store.put(layout.commit_name(seq), sealed, if_none_match=True)
    except PreconditionFailedError:
        raise LeaseHeldError(
            "the filesystem changed while it was being re-encrypted (is it mounted on another "
            "machine?); unmount it everywhere and run again"
        ) from None
    digest = commit_hash(sealed)
    if snapshot:
        return Head(seq, digest, seq, 0, 0)
    return Head(
        seq,
        digest,
        head.snapshot_seq,
        head.deltas_since_snapshot + 1,
        head.delta_bytes_since_snapshot + len(sealed),
    )


def _object_generation(store: ObjectStore, name: str) -> int | None:
    head = store.get(name, 0, _OBJECT_HEAD.size)
    if len(head) < _OBJECT_HEAD.size or head[:4] != OBJECT_MAGIC:
        return None
    return int(_OBJECT_HEAD.unpack(head)[1])


def _remember(devices: DeviceStore, fs_id: bytes, head: Head) -> None:
    def change(state: DeviceState) -> None:
        state.commit_seq = head.seq
        state.commit_hash = head.hash

    devices.update_state(fs_id, change)


def _retag_header(store: ObjectStore, unlocked: Unlocked) -> None:
    """Re-tag the header under the current generation if a revocation could not."""
    raw, etag = store.get_with_etag(layout.HEADER_NAME)
    header = parse_header(raw, store.url)
    if verify_header(unlocked.keys, header) != unlocked.keys.current:
        store.put(layout.HEADER_NAME, seal_header(unlocked.keys, header), if_match=etag)


def _delete(store: ObjectStore, names: list[str]) -> int:
    for name in names:
        store.delete(name)
    return len(names)


def _commit_names(store: ObjectStore) -> list[str]:
    return [o.name for o in store.list(layout.META_PREFIX) if layout.commit_seq(o.name) is not None]


# --- the whole job ----------------------------------------------------------------------------


def reencrypt(
    store: ObjectStore,
    unlocked: Unlocked,
    devices: DeviceStore,
    on_progress: Progress | None = None,
) -> Report:
    """Rewrite every chunk and commit sealed under an older generation; idempotent.

    The caller makes sure nothing else writes (`exclusive`). Order keeps every state
    readable: new packs, then the commit naming them, then the old packs and commits go.
    """
    fs_id = unlocked.fs_id
    sealer = Sealer(fs_id, unlocked.keys)
    gen = unlocked.keys.current
    report = Report(gen)
    _retag_header(store, unlocked)
    if not _commit_names(store):  # never committed: any pack is an orphan of a crash
        report.objects_deleted = _delete(store, [o.name for o in store.list(layout.DATA_PREFIX)])
        return report
    md, head, hashes = replay(store, sealer)
    try:
        state = devices.load_state(fs_id)
        problem = rollback_problem(head, hashes, md, state.commit_seq or 0, state.commit_hash)
        if problem:
            raise RollbackError(f"{problem}: refusing to re-encrypt a rolled-back filesystem")
        plan = _plan(md, gen)
        if on_progress is not None:
            on_progress(0, len(plan))
        with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="reencrypt") as pool:
            writer = _PackWriter(store, sealer, md, pool)
            for done, (chunks, span) in enumerate(_read_ahead(pool, store, plan), 1):
                base = chunks[0][2].off
                for ino, idx, ref in chunks:
                    blob = span[ref.off - base : ref.off - base + ref.len]
                    plain = sealer.open_chunk(
                        ino, idx, ref.version, ref.gen, ref.plain_len, blob, ref.digest, ref.pack
                    )
                    writer.add(ino, idx, ref.version, bytes(plain), ref.digest)
                    report.chunks += 1
                if writer.bytes_since_commit >= COMMIT_EVERY_BYTES:
                    writer.close()
                    writer.wait()
                    head = _commit(store, sealer, md, head, snapshot=False)
                    _remember(devices, fs_id, head)
                    writer.bytes_since_commit = 0
                if on_progress is not None:
                    on_progress(done, len(plan))
            writer.close()
            writer.wait()
            report.packs_written = writer.packs_written
        dead = md.dead_packs()
        is_clean_snapshot = (
            head.snapshot_seq == head.seq
            and _object_generation(store, layout.commit_name(head.seq)) == gen
        )
        if report.chunks or dead or not is_clean_snapshot:
            md.forget_packs(dead)
            head = _commit(store, sealer, md, head, snapshot=True)
            _remember(devices, fs_id, head)
            report.committed = True
        # Whatever a chunk names stays, listed in the packs table or not: deleting is final.
        live = {pack for pack, _, _ in md.all_packs()}
        live |= {pack for (pack,) in md.db.execute("SELECT DISTINCT pack FROM chunks")}
    finally:
        md.db.close()
    # Dead packs, orphans of interrupted runs or crashed mounts, and every older commit.
    stale = [
        o.name
        for o in store.list(layout.DATA_PREFIX)
        if o.name[len(layout.DATA_PREFIX) :] not in live
    ]
    stale += [n for n in _commit_names(store) if (layout.commit_seq(n) or 0) < head.seq]
    report.objects_deleted = _delete(store, stale)
    log.info(
        "re-encryption: %d chunks into %d packs under generation %d, %d objects deleted",
        report.chunks,
        report.packs_written,
        gen,
        report.objects_deleted,
    )
    return report
