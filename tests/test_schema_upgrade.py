"""A tree written by an earlier version (entries as a rowid table) is rebuilt at load."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from encfs_cloud import layout
from encfs_cloud.tree import journal
from encfs_cloud.tree.merge import Merger
from encfs_cloud.tree.metadata import ROOT_INODE, TABLE_KEYS, Metadata
from encfs_cloud.tree.namespace import Namespace
from tests.test_commit_compression import _bucket, _snapshot_info, _zlib_payload
from tests.test_merge import Pair, _paths
from tests.tree_invariants import tree_problems

REG = stat.S_IFREG | 0o644

# The entry table as versions before 2026-12-03 wrote it into snapshots and deltas.
OLD_DENTRIES = """
CREATE TABLE dentries_v1(
    id INTEGER PRIMARY KEY, parent INT NOT NULL, name BLOB NOT NULL, inode INT NOT NULL);
INSERT INTO dentries_v1 SELECT id, parent, name, inode FROM dentries;
DROP TABLE dentries;
PRAGMA legacy_alter_table=ON;
ALTER TABLE dentries_v1 RENAME TO dentries;
PRAGMA legacy_alter_table=OFF;
CREATE UNIQUE INDEX dentries_by_name ON dentries(parent, name);
CREATE INDEX dentries_by_parent ON dentries(parent, id);
"""


def _as_old_version(body: bytes) -> bytes:
    """The same database (snapshot or delta) with the entry table of the earlier schema."""
    conn = sqlite3.connect(":memory:")
    conn.isolation_level = None
    conn.deserialize(body)
    conn.executescript(OLD_DENTRIES)
    return conn.serialize()


def _tree(entries: int) -> tuple[Metadata, Namespace, int]:
    md = Metadata()
    ns = Namespace(md)
    ns.ensure_root(0, 0)
    folder = ns.create(ROOT_INODE, b"folder", stat.S_IFDIR | 0o755, 0, 0)
    for i in range(entries):
        ns.create(folder.id, b"file-%04d" % i, REG, 0, 0)
    md.set_xattr(folder.id, b"user.k", b"v")
    return md, ns, folder.id


def _rows(md: Metadata) -> dict[str, set[tuple[object, ...]]]:
    return {t: set(md.db.execute(f"SELECT * FROM main.{t}")) for t in TABLE_KEYS}


def _schema(md: Metadata) -> tuple[str, list[str]]:
    sql = md.db.execute("SELECT sql FROM sqlite_master WHERE name='dentries'").fetchone()[0]
    indexes = [
        r[0]
        for r in md.db.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='dentries'"
        )
    ]
    return str(sql), sorted(indexes)


def _listing(md: Metadata, parent: int) -> list[bytes]:
    names, after = [], 0
    while page := md.list_entries(parent, after, 7):
        names += [name for _, name, _ in page]
        after = page[-1][0]
    return names


def test_old_snapshot_is_rebuilt_once_and_keeps_every_row() -> None:
    md, _, folder = _tree(300)
    old = _as_old_version(journal.export_snapshot(md))
    stored = _raw(old).execute("SELECT name FROM sqlite_master WHERE type='index'").fetchall()
    assert ("dentries_by_parent",) in stored  # what the earlier version wrote
    loaded = journal.load_snapshot(old)
    assert loaded.upgraded
    sql, indexes = _schema(loaded)
    assert "WITHOUT ROWID" in sql and indexes == ["dentries_by_name"]
    assert loaded.db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert loaded.db.execute("PRAGMA freelist_count").fetchone() == (0,)  # loaded compacted
    assert _rows(loaded) == _rows(md)
    assert sorted(_listing(loaded, folder)) == [b"file-%04d" % i for i in range(300)]
    assert loaded.lookup(folder, b"file-0123") == md.lookup(folder, b"file-0123")
    # The next commit writes the rebuilt tree whole, and it loads without a rebuild.
    again = journal.export_snapshot(loaded)
    assert not loaded.upgraded
    assert loaded.size_bytes() < _raw_size(old)  # no (parent, id) index any more
    assert not journal.load_snapshot(again).upgraded


def _raw_size(body: bytes) -> int:
    conn = _raw(body)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int(pages - free) * int(conn.execute("PRAGMA page_size").fetchone()[0])


def _raw(body: bytes) -> sqlite3.Connection:
    """The database as stored, without Metadata's upgrade."""
    conn = sqlite3.connect(":memory:")
    conn.deserialize(body)
    return conn


def test_old_snapshot_and_deltas_replay_from_a_bucket(tmp_path: Path) -> None:
    store, sealer = _bucket(tmp_path)
    md, ns, folder = _tree(50)
    snap = _zlib_payload(_snapshot_info(), _as_old_version(journal.export_snapshot(md)))
    sealed = sealer.seal_object(layout.commit_name(1), "commit", snap)
    store.put(layout.commit_name(1), sealed, if_none_match=True)
    ns.rename(folder, b"file-0001", ROOT_INODE, b"moved", 0)
    ns.unlink(folder, b"file-0002")
    ns.create(folder, b"new", REG, 0, 0)
    info = journal.CommitInfo(2, journal.KIND_DELTA, journal.commit_hash(sealed), 1, 0)
    delta = _zlib_payload(info, _as_old_version(journal.export_delta(md)))
    store.put(
        layout.commit_name(2),
        sealer.seal_object(layout.commit_name(2), "commit", delta),
        if_none_match=True,
    )
    replayed, head, _ = journal.replay(store, sealer)
    assert head.seq == 2 and replayed.upgraded
    assert _rows(replayed) == _rows(md)
    assert b"file-0002" not in _listing(replayed, folder)


def test_another_devices_old_snapshot_is_rebuilt_under_the_merge_base() -> None:
    md, ns, _ = _tree(0)
    journal.export_snapshot(md)
    merger = Merger(md, "here")
    other, _, other_folder = _tree(40)
    merger.fast_forward(journal.KIND_SNAPSHOT, _as_old_version(journal.export_snapshot(other)))
    assert "WITHOUT ROWID" in _schema(md)[0]
    assert _rows(md) == _rows(other)
    # The base's views and the undo triggers work on the rebuilt table.
    base = set(md.db.execute(f"SELECT * FROM {merger.base.source('dentries')}"))
    assert base == _rows(other)["dentries"]
    ns.create(other_folder, b"after", REG, 0, 0)
    assert (other_folder, b"after") in merger.base.keys("dentries")
    assert merger.base.row("dentries", (other_folder, b"after")) is None


def test_entry_ids_are_unique_per_directory_only() -> None:
    md, ns, folder = _tree(3)
    second = ns.create(ROOT_INODE, b"second", stat.S_IFDIR | 0o755, 0, 0)
    taken = md.db.execute("SELECT id FROM dentries WHERE parent=?", (folder,)).fetchone()[0]
    target = md.lookup(folder, b"file-0000")
    md.db.execute("INSERT INTO dentries VALUES(?,?,?,?)", (taken, second.id, b"same id", target))
    assert md.entry_id_taken(second.id, taken) and not md.entry_id_taken(ROOT_INODE, taken)
    assert _listing(md, second.id) == [b"same id"]
    assert len(_listing(md, folder)) == 3
    assert md.new_entry_id(second.id) not in (taken, 0, ROOT_INODE)


def test_orphans_come_from_the_partial_index_also_in_an_old_tree() -> None:
    md, ns, folder = _tree(5)
    kept = ns.unlink(folder, b"file-0001")  # as if still open: the inode stays, no name
    assert kept.nlink == 0 and md.get_inode(kept.id) is not None
    assert md.orphans() == [kept.id]
    plan = md.db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM inodes WHERE nlink<=0 AND id<>?", (ROOT_INODE,)
    ).fetchall()
    assert "inodes_unlinked" in str(plan)
    old = _as_old_version(journal.export_snapshot(md))
    old_conn = _raw(old)
    old_conn.execute("DROP INDEX inodes_unlinked")
    loaded = journal.load_snapshot(old_conn.serialize())
    assert loaded.orphans() == [kept.id]
    loaded.delete_inode(kept.id)
    assert loaded.orphans() == []


def test_local_changes_merge_over_another_devices_old_snapshot() -> None:
    """The remote side of a merge may be a snapshot of the earlier schema, read as it is."""
    p = Pair()
    p.l.create(ROOT_INODE, b"mine", REG, 0, 0)
    p.r.create(ROOT_INODE, b"theirs", REG, 0, 0)
    p.r.rename(ROOT_INODE, b"a", ROOT_INODE, b"a-renamed", 0)
    p.merger.stage_remote(journal.KIND_SNAPSHOT, _as_old_version(journal.export_snapshot(p.remote)))
    result = p.merger.merge(p.merger.plan())
    assert result is not None
    p.merger.finish_remote()
    assert tree_problems(p.local) == []
    paths = _paths(p.local)
    assert {"/mine", "/theirs", "/a-renamed", "/docs/report.odt"} <= set(paths)
    assert "/a" not in paths
    assert "WITHOUT ROWID" in _schema(p.local)[0]
