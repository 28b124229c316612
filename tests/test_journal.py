"""Delta and snapshot commits reproduce the tree exactly, and carry the commit history."""

from __future__ import annotations

import stat

from encfs_cloud.tree import journal
from encfs_cloud.tree.metadata import ROOT_INODE, ChunkRef, Metadata
from encfs_cloud.tree.namespace import Namespace


def _tree(md: Metadata) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for table in ("inodes", "dentries", "xattrs", "chunks", "packs", "counters", "history"):
        rows += [(table, *r) for r in md.db.execute(f"SELECT * FROM {table} ORDER BY 1, 2")]
    return rows


def test_deltas_and_snapshots_replay_to_the_same_tree() -> None:
    md = Metadata()
    ns = Namespace(md)
    ns.ensure_root(0, 0)
    replica = journal.load_snapshot(journal.export_snapshot(md))
    for round_ in range(3):
        d = ns.create(ROOT_INODE, f"dir{round_}".encode(), stat.S_IFDIR | 0o755, 0, 0)
        f = ns.create(d.id, b"f" * 255, stat.S_IFREG | 0o644, 0, 0)
        md.add_pack(f"pack{round_}", 0)
        md.set_chunk(f.id, 0, ChunkRef(f"pack{round_}", 0, 4124, 10, 7, 1, bytes(32)))
        md.set_xattr(f.id, b"user.k", b"v" * 100)
        if round_ == 1:  # a directory moves into another; a file loses its data
            ns.rename(ROOT_INODE, b"dir0", d.id, b"moved", 0)
            md.drop_chunks(f.id, 0)
        md.record_commit(round_ + 1, bytes([round_]) * 32)
        journal.apply_delta(replica, journal.export_delta(md))
        assert _tree(replica) == _tree(md)
        assert not any(md.dirty.values())
    again = journal.load_snapshot(journal.export_snapshot(md))
    assert _tree(again) == _tree(md)
    assert again.commit_hash_of(2) == bytes([1]) * 32
    assert again.commit_hash_of(9) is None
