"""When a commit is a snapshot: a fixed count of deltas, or delta bytes that scale with the tree."""

from __future__ import annotations

import stat

from encfs_cloud.data.committer import SNAPSHOT_EVERY_DELTAS, snapshot_due
from encfs_cloud.tree import journal
from encfs_cloud.tree.journal import Head
from encfs_cloud.tree.metadata import ROOT_INODE, Metadata
from encfs_cloud.tree.namespace import Namespace

MiB = 1 << 20


def _tail(deltas: int, delta_bytes: int) -> Head:
    return Head(10, b"h" * 32, 10 - deltas, deltas, delta_bytes)


def test_small_tree_snapshots_after_8_mib_of_deltas() -> None:
    assert not snapshot_due(_tail(3, 7 * MiB), 1 * MiB)
    assert snapshot_due(_tail(3, 9 * MiB), 1 * MiB)


def test_large_tree_lets_deltas_grow_with_it() -> None:
    # A 2 GiB tree (10,000,000 files) waits for 128 MiB of deltas, not 8.
    assert not snapshot_due(_tail(3, 100 * MiB), 2048 * MiB)
    assert snapshot_due(_tail(3, 130 * MiB), 2048 * MiB)


def test_delta_count_and_first_commit_always_snapshot() -> None:
    assert snapshot_due(_tail(SNAPSHOT_EVERY_DELTAS, 0), 2048 * MiB)
    assert snapshot_due(Head(0, b"", 0, 0, 0), 0)


def test_tree_size_follows_the_tree_and_tracks_its_snapshot() -> None:
    md = Metadata()
    ns = Namespace(md)
    ns.ensure_root(0, 0)
    empty = md.size_bytes()
    for i in range(5000):
        ns.create(ROOT_INODE, b"file-%05d" % i, stat.S_IFREG | 0o644, 0, 0)
    grown = md.size_bytes()
    assert grown > empty + 5000 * 100
    # The rule compares delta bytes (compressed, sealed) with this size: the snapshot of the
    # same tree is smaller than it, never larger.
    assert (
        len(
            journal.encode_commit(
                journal.CommitInfo(1, "snapshot", b"", 1, 0), journal.export_snapshot(md)
            )
        )
        < grown
    )
