"""The commit after a known head, read and checked like replay checks every commit."""

from __future__ import annotations

from dataclasses import dataclass

from encfs_cloud import layout
from encfs_cloud.errors import IntegrityError, ObjectMissingError
from encfs_cloud.keys.sealed import Sealer, object_generation
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree.journal import (
    KIND_DELTA,
    KIND_SNAPSHOT,
    CommitInfo,
    Head,
    check_generation,
    commit_hash,
    commit_seqs,
    decode_commit,
    export_snapshot,
    replay,
)


@dataclass(frozen=True)
class NextCommit:
    info: CommitInfo
    body: bytes  # the plaintext delta or snapshot (memory only)
    sealed: bytes  # as in the bucket: compared with a commit of ours whose reply was lost
    head: Head  # the head once it is applied


def next_commit(store: ObjectStore, sealer: Sealer, head: Head) -> NextCommit | None:
    """`meta/<head.seq + 1>` if another writer made it, else None: one GET.

    Refuses (IntegrityError) what replay would refuse: a commit that does not authenticate,
    is sealed under a generation older than the keyring requires from its number on (a
    revoked device's), does not chain to `head`, or claims a snapshot it does not build on.
    """
    name = layout.commit_name(head.seq + 1)
    try:
        sealed = store.get(name)
    except ObjectMissingError:
        return None
    check_generation(sealer, name, head.seq + 1, object_generation(sealed), 0)
    info, body = decode_commit(name, sealer.open_object(name, "commit", sealed))
    if info.prev_hash != head.hash:
        raise IntegrityError(f"commit {name} does not chain to commit {head.seq}")
    digest = commit_hash(sealed)
    if info.kind == KIND_SNAPSHOT:
        if info.snapshot_seq != info.seq:
            raise IntegrityError(f"commit {name} should be a snapshot")
        return NextCommit(info, body, sealed, Head(info.seq, digest, info.seq, 0, 0))
    if info.kind != KIND_DELTA or info.snapshot_seq != head.snapshot_seq:
        raise IntegrityError(f"commit {name} belongs to another snapshot")
    after = Head(
        info.seq,
        digest,
        head.snapshot_seq,
        head.deltas_since_snapshot + 1,
        head.delta_bytes_since_snapshot + len(sealed),
    )
    return NextCommit(info, body, sealed, after)


def jump_commit(store: ObjectStore, sealer: Sealer, head: Head) -> NextCommit | None:
    """When the commits after `head` were already folded into a snapshot and deleted (this
    mount fell further behind than other mounts waited for), the newest state as one
    snapshot; None if nothing is newer. One LIST, plus a replay if we fell behind.

    The newest state must carry `head` in its history: anything else is a fork.
    """
    seqs = commit_seqs(store)
    if not seqs or seqs[-1] <= head.seq:
        return None
    if head.seq + 1 in seqs:
        return next_commit(store, sealer, head)
    md, newest, _ = replay(store, sealer, seqs=seqs)
    if head.seq and md.commit_hash_of(head.seq) != head.hash:
        raise IntegrityError(
            f"the bucket's history does not contain commit {head.seq} as this mount applied it"
        )
    info = CommitInfo(newest.seq, KIND_SNAPSHOT, b"", newest.seq, 0)
    return NextCommit(info, export_snapshot(md), b"", newest)
