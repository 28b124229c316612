"""A directory's parent comes from the entry it was last seen under, checked, never stale."""

from __future__ import annotations

import errno
import random
import stat

from encfs_cloud.errors import FsError
from encfs_cloud.tree import journal
from encfs_cloud.tree.metadata import ROOT_INODE, Metadata
from encfs_cloud.tree.namespace import Namespace

DIR = stat.S_IFDIR | 0o755


def _scanned(md: Metadata, ino: int) -> int | None:
    row = md.db.execute("SELECT parent FROM dentries WHERE inode=?", (ino,)).fetchone()
    return int(row[0]) if row else None


def test_parent_follows_random_renames_and_removals() -> None:
    rng = random.Random(5)
    md = Metadata()
    ns = Namespace(md)
    ns.ensure_root(0, 0)
    dirs = [ROOT_INODE]
    for step in range(600):
        kind = rng.randrange(4)
        parent = rng.choice(dirs)
        name = b"d%d" % rng.randrange(12)
        try:
            if kind == 0 or len(dirs) < 4:
                dirs.append(ns.create(parent, name, DIR, 0, 0).id)
            elif kind == 1:
                row = md.db.execute(
                    "SELECT parent, name FROM dentries ORDER BY random() LIMIT 1"
                ).fetchone()
                ns.rename(int(row[0]), bytes(row[1]), parent, name, 0)
            elif kind == 2:
                ns.rmdir(parent, name)
            else:  # remembered by lookup and by listing, as the FUSE operations do
                ns.lookup(parent, name)
                md.list_entries(parent, 0, 1000)
        except FsError as exc:
            assert exc.errno in (errno.EEXIST, errno.ENOENT, errno.ENOTEMPTY, errno.EINVAL)
        dirs = [ROOT_INODE] + [int(r[0]) for r in md.db.execute("SELECT inode FROM dentries")]
        for ino in dirs[1:]:
            assert md.parent_of(ino) == _scanned(md, ino), step
        assert md.dir_entries, "nothing was remembered"


def test_a_hint_from_another_tree_state_is_checked() -> None:
    md = Metadata()
    ns = Namespace(md)
    ns.ensure_root(0, 0)
    a = ns.create(ROOT_INODE, b"a", DIR, 0, 0)
    b = ns.create(a.id, b"b", DIR, 0, 0)
    assert md.parent_of(b.id) == a.id
    # Another device's snapshot replaces the tree under the hint: b now lives in the root.
    other = journal.load_snapshot(journal.export_snapshot(md))
    Namespace(other).rename(a.id, b"b", ROOT_INODE, b"b", 0)
    md.db.deserialize(journal.export_snapshot(other))
    assert md.dir_entries[b.id] == (a.id, b"b")
    assert md.parent_of(b.id) == ROOT_INODE
    assert md.dir_entries[b.id] == (ROOT_INODE, b"b")
    ns.rmdir(ROOT_INODE, b"b")
    assert md.parent_of(b.id) is None
