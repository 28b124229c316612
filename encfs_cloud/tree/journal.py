"""Metadata commits: delta and snapshot encoding, the hash chain, and replay at mount."""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import zstandard

from encfs_cloud import layout
from encfs_cloud.crypto import aead
from encfs_cloud.errors import IntegrityError, ObjectMissingError
from encfs_cloud.keys.sealed import Sealer, object_generation
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree.metadata import SCHEMA, TABLE_KEYS, Metadata
from encfs_cloud.tree.upgrade import upgrade_schema

log = logging.getLogger(__name__)

KIND_SNAPSHOT = "snapshot"
KIND_DELTA = "delta"
_PREAMBLE = struct.Struct(">I")  # length of the JSON commit header that precedes the body
# Bodies are zstd level 1: it decompresses about 3 times faster than zlib level 1 (a third of a
# 1,000,000-file mount went to zlib) and compresses 5 times faster and a little smaller. The
# header names it ("z"); commits written before it have no "z" and a zlib body.
_ZSTD = "zstd"
_ZSTD_LEVEL = 1
# Snapshots up to this size are compacted before sealing (compact_snapshot). Compaction holds
# three more copies of the tree for a moment (the source, the rebuilt one, its bytes): past
# about 2,000,000 files that transient would outweigh what full pages save.
COMPACT_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CommitInfo:
    seq: int
    kind: str
    prev_hash: bytes
    snapshot_seq: int  # the snapshot this commit builds on (itself for a snapshot)
    time_ns: int


@dataclass(frozen=True)
class Head:
    """The newest commit: what the next commit chains to."""

    seq: int
    hash: bytes
    snapshot_seq: int
    deltas_since_snapshot: int
    delta_bytes_since_snapshot: int


def export_delta(md: Metadata) -> bytes:
    """Serialize every row touched since the last export (final state or deletion)."""
    db = md.db
    db.execute("ATTACH DATABASE ':memory:' AS delta")
    try:
        db.executescript(SCHEMA.format(s="delta."))
        for table, keys in TABLE_KEYS.items():
            cols = ",".join(keys)
            db.execute(f"CREATE TABLE delta.del_{table}({cols})")
            touched = md.dirty[table]
            if not touched:
                continue
            db.executemany(
                f"INSERT INTO delta.del_{table} VALUES({','.join('?' * len(keys))})", touched
            )
            mcols = ",".join("m." + k for k in keys)
            db.execute(
                f"INSERT INTO delta.{table} SELECT m.* FROM main.{table} m "
                f"WHERE ({mcols}) IN (SELECT {cols} FROM delta.del_{table})"
            )
            # What still exists is an upsert, not a deletion.
            db.execute(
                f"DELETE FROM delta.del_{table} "
                f"WHERE ({cols}) IN (SELECT {cols} FROM delta.{table})"
            )
        blob = db.serialize(name="delta")
    finally:
        db.execute("DETACH DATABASE delta")
    for touched in md.dirty.values():
        touched.clear()
    return blob


@contextmanager
def attached(md: Metadata, body: bytes, name: str) -> Iterator[None]:
    """A commit body readable as schema `name` of md's connection while the block runs."""
    db = md.db
    db.execute(f"ATTACH DATABASE ':memory:' AS {name}")
    try:
        db.deserialize(body, name=name)
        yield
    finally:
        db.execute(f"DETACH DATABASE {name}")


def apply_delta(md: Metadata, blob: bytes, schema: str = "main") -> None:
    """Apply a delta to `md` (or to another database attached to it, e.g. a merge's remote)."""
    db = md.db
    try:
        with attached(md, blob, "delta"):
            for table, keys in TABLE_KEYS.items():
                cols = ",".join(keys)
                db.execute(
                    f"DELETE FROM {schema}.{table} "
                    f"WHERE ({cols}) IN (SELECT {cols} FROM delta.del_{table})"
                )
                db.execute(f"INSERT OR REPLACE INTO {schema}.{table} SELECT * FROM delta.{table}")
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(f"metadata delta is malformed: {exc}") from None


def export_snapshot(md: Metadata) -> bytes:
    for touched in md.dirty.values():
        touched.clear()
    md.upgraded = False  # the bucket gets today's schema
    return md.db.serialize()


def load_snapshot(blob: bytes) -> Metadata:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    try:
        conn.deserialize(blob)
        upgraded = upgrade_schema(conn)
        if upgraded and len(blob) <= COMPACT_MAX_BYTES:  # load without the old table's pages
            blob = compact_snapshot(conn.serialize())
            conn.close()
            conn = sqlite3.connect(":memory:", check_same_thread=False)
            conn.deserialize(blob)
        md = Metadata(conn)
        md.upgraded = upgraded
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(f"metadata snapshot is malformed: {exc}") from None
    return md


def encode_commit(info: CommitInfo, body: bytes) -> bytes:
    header = json.dumps(
        {
            "seq": info.seq,
            "kind": info.kind,
            "prev": info.prev_hash.hex(),
            "snapshot": info.snapshot_seq,
            "time_ns": info.time_ns,
            "z": _ZSTD,
        }
    ).encode()
    packed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(body)
    return _PREAMBLE.pack(len(header)) + header + packed


def decode_commit(name: str, payload: bytes) -> tuple[CommitInfo, bytes]:
    try:
        (hlen,) = _PREAMBLE.unpack_from(payload)
        header = json.loads(payload[4 : 4 + hlen])
        info = CommitInfo(
            seq=int(header["seq"]),
            kind=str(header["kind"]),
            prev_hash=bytes.fromhex(header["prev"]),
            snapshot_seq=int(header["snapshot"]),
            time_ns=int(header["time_ns"]),
        )
        body = _decompress(header.get("z"), payload[4 + hlen :])
    except (ValueError, KeyError, struct.error, zlib.error, zstandard.ZstdError) as exc:
        raise IntegrityError(f"commit {name} is malformed: {exc}") from None
    if layout.commit_seq(name) != info.seq or info.kind not in (KIND_SNAPSHOT, KIND_DELTA):
        raise IntegrityError(f"commit {name} does not match its name")
    return info, body


def _decompress(method: object, packed: bytes) -> bytes:
    if method is None:  # written before commits named their compression
        return zlib.decompress(packed)
    if method != _ZSTD:
        raise ValueError(f"unknown compression {method!r}")
    # compress() records the body's size in the frame, so one call sizes the output exactly.
    return zstandard.ZstdDecompressor().decompress(packed)


def compact_snapshot(body: bytes) -> bytes:
    """The same database rebuilt with full pages (VACUUM INTO) on connections of its own.

    A tree grown by inserts at random places (random ids) keeps its pages about two thirds
    full, and a mount holds exactly the pages of the snapshot it loads: rebuilt, the
    snapshot, a mount's memory and its load time shrink by a tenth or more. Run where the
    snapshot is sealed (a worker thread), not on the live tree, which the FUSE thread owns.
    """
    # Into a private in-memory database (memdb: one buffer, freed whole on close; never a
    # file). A plain VACUUM copies through a temporary database made of page-sized blocks
    # that stayed in the daemon's heap afterwards (+30 MiB for a 43 MiB tree here).
    target = f"file:/snapshot-{secrets.token_hex(16)}?vfs=memdb"
    source = sqlite3.connect(":memory:", check_same_thread=False)
    into = sqlite3.connect(target, uri=True, check_same_thread=False)
    try:
        source.execute("PRAGMA temp_store=MEMORY")  # nothing of the tree in /var/tmp
        source.deserialize(body)
        source.execute("VACUUM INTO ?", (target,))
        return into.serialize()
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(f"metadata snapshot is malformed: {exc}") from None
    finally:
        source.close()
        into.close()


def seal_commit(sealer: Sealer, info: CommitInfo, body: bytes) -> bytes:
    name = layout.commit_name(info.seq)
    if info.kind == KIND_SNAPSHOT and len(body) <= COMPACT_MAX_BYTES:
        body = compact_snapshot(body)
    return sealer.seal_object(name, "commit", encode_commit(info, body))


def commit_hash(sealed: bytes) -> bytes:
    return aead.digest(sealed)


def commit_seqs(store: ObjectStore) -> list[int]:
    """The sequence numbers of every metadata commit in the bucket, ascending."""
    names = (layout.commit_seq(o.name) for o in store.list(layout.META_PREFIX))
    return sorted(s for s in names if s is not None)


def rollback_problem(
    head: Head, hashes: dict[int, bytes], md: Metadata, seen_seq: int, seen_hash: bytes | None
) -> str | None:
    """Why the replayed state cannot follow the newest commit this device saw, or None.

    The seen commit's hash comes from the commits just read or, when a later snapshot
    deleted that commit, from the history the tree carries.
    """
    if head.seq < seen_seq:
        return f"the bucket's newest commit is {head.seq} but this device has seen {seen_seq}"
    seen = hashes.get(seen_seq) or md.commit_hash_of(seen_seq)
    if seen_seq and seen is not None and seen != seen_hash:
        return f"commit {seen_seq} in the bucket differs from the one this device saw"
    return None


def replay(
    store: ObjectStore,
    sealer: Sealer,
    on_progress: Callable[[int, int], None] | None = None,
    seqs: list[int] | None = None,
) -> tuple[Metadata, Head, dict[int, bytes]]:
    """Load the newest snapshot and every delta after it, checking the hash chain.

    Returns the metadata, the head, and the hash of each commit read (seq → hash) so the
    caller can compare them with what this device has seen before (rollback detection).
    `seqs`, if the caller already listed them, saves listing the commits again.
    """
    if seqs is None:
        seqs = commit_seqs(store)
    if not seqs:
        raise IntegrityError("the bucket holds no metadata commit")
    hashes: dict[int, bytes] = {}
    # Walk back from the newest commit to its snapshot, then forward checking the chain.
    newest = seqs[-1]
    blob = _fetch(store, newest)
    info, _ = decode_commit(
        layout.commit_name(newest), sealer.open_object(layout.commit_name(newest), "commit", blob)
    )
    snapshot_seq = info.snapshot_seq
    needed = list(range(snapshot_seq, newest + 1))
    present = set(seqs)
    missing = [s for s in needed if s not in present]
    if missing:
        raise IntegrityError(f"metadata commit {missing[0]} is missing from the bucket")
    md: Metadata | None = None
    prev: bytes | None = None
    prev_gen = 0
    delta_bytes = 0
    for n, seq in enumerate(needed):
        name = layout.commit_name(seq)
        sealed = blob if seq == newest else _fetch(store, seq)
        prev_gen = check_generation(sealer, name, seq, object_generation(sealed), prev_gen)
        cinfo, cbody = decode_commit(name, sealer.open_object(name, "commit", sealed))
        if cinfo.snapshot_seq != snapshot_seq:
            raise IntegrityError(f"commit {name} belongs to another snapshot")
        if seq == snapshot_seq:
            if cinfo.kind != KIND_SNAPSHOT:
                raise IntegrityError(f"commit {name} should be a snapshot")
            md = load_snapshot(cbody)
        else:
            if cinfo.kind != KIND_DELTA or prev is None or cinfo.prev_hash != prev:
                raise IntegrityError(f"commit {name} does not chain to the one before it")
            assert md is not None
            apply_delta(md, cbody)
            delta_bytes += len(sealed)
        prev = commit_hash(sealed)
        hashes[seq] = prev
        if on_progress:
            on_progress(n + 1, len(needed))
    assert md is not None and prev is not None
    head = Head(newest, prev, snapshot_seq, len(needed) - 1, delta_bytes)
    return md, head, hashes


def check_generation(sealer: Sealer, name: str, seq: int, gen: int, prev_gen: int) -> int:
    """Generations are a one-way ratchet along the chain; returns `gen` for the next commit.

    From where the keyring says a generation starts, nothing may be sealed under an older one:
    a device that only holds older keys (a revoked one) cannot append to the chain.
    """
    need = sealer.keys.required_generation(seq)
    if gen < need:
        raise IntegrityError(
            f"commit {name} is sealed under key generation {gen}, but generation {need} "
            f"began at commit {sealer.keys.starts[need]}: written with a retired key "
            "(a revoked device?)"
        )
    if gen < prev_gen:
        raise IntegrityError(
            f"commit {name} is sealed under key generation {gen}, older than the commit "
            f"before it ({prev_gen}): written with a retired key (a revoked device?)"
        )
    return gen


def _fetch(store: ObjectStore, seq: int) -> bytes:
    name = layout.commit_name(seq)
    try:
        return store.get(name)
    except ObjectMissingError:
        raise IntegrityError(f"metadata commit {name} vanished while reading") from None
