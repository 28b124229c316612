"""Rebasing one device's uncommitted tree over another device's commit: the conflict rules."""

from __future__ import annotations

import secrets
import stat

from encfs_cloud.tree import journal
from encfs_cloud.tree.merge import Merger
from encfs_cloud.tree.metadata import ROOT_INODE, ChunkRef, Metadata
from encfs_cloud.tree.namespace import Namespace
from encfs_cloud.tree.rowsets import conflict_name
from tests.tree_invariants import tree_problems

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644


def _copy(md: Metadata) -> Metadata:
    return journal.load_snapshot(journal.export_snapshot(md))


def _write(md: Metadata, ino: int, idx: int, size: int) -> None:
    pack = secrets.token_hex(8)
    md.add_pack(pack, 8192)
    md.set_chunk(ino, idx, ChunkRef(pack, 0, 4124, 100, secrets.randbits(63), 1, bytes(32)))
    inode = md.get_inode(ino)
    assert inode is not None
    inode.size = size
    md.put_inode(inode)


def _paths(md: Metadata) -> dict[str, int]:
    found: dict[str, int] = {}
    stack = [(ROOT_INODE, "")]
    while stack:
        parent, prefix = stack.pop()
        for _, name, node in md.list_entries(parent, 0, 1 << 30):
            path = f"{prefix}/{name.decode()}"
            found[path] = node.id
            if node.is_dir:
                stack.append((node.id, path))
    return found


class Pair:
    """A base tree, this device (`local`, with its merger) and another device (`remote`)."""

    def __init__(self) -> None:
        base = Metadata()
        self.ns = Namespace(base)
        self.ns.ensure_root(0, 0)
        docs = self.ns.create(ROOT_INODE, b"docs", DIR, 0, 0)
        report = self.ns.create(docs.id, b"report.odt", REG, 0, 0)
        _write(base, report.id, 0, 100)
        self.ns.create(ROOT_INODE, b"a", DIR, 0, 0)
        self.ns.create(ROOT_INODE, b"b", DIR, 0, 0)
        journal.export_delta(base)
        self.report = report.id
        self.local, self.remote = _copy(base), _copy(base)
        self.merger = Merger(self.local, "laptop")
        self.l, self.r = Namespace(self.local), Namespace(self.remote)

    def rebase(self) -> tuple[list[tuple[int, bytes]], dict[int, int]]:
        self.merger.stage_remote(journal.KIND_DELTA, journal.export_delta(self.remote))
        plan = self.merger.plan()
        result = self.merger.merge(plan)
        assert result is not None
        out, copies = result
        for old, new in copies.items():  # what the data layer does: reseal under `new`
            for idx, _ in plan.copies[old]:
                _write(self.local, new, idx, self.local.get_inode(new).size)  # type: ignore[union-attr]
        self.merger.finish_remote()
        assert tree_problems(self.local) == []
        return out.conflicts, copies


def test_disjoint_changes_both_survive() -> None:
    p = Pair()
    p.l.create(ROOT_INODE, b"mine", REG, 0, 0)
    p.r.create(ROOT_INODE, b"theirs", REG, 0, 0)
    conflicts, _ = p.rebase()
    assert conflicts == []
    assert {"/mine", "/theirs", "/docs/report.odt"} <= set(_paths(p.local))


def test_same_file_rewritten_on_both_keeps_both_first_committer_keeps_name() -> None:
    p = Pair()
    _write(p.remote, p.report, 0, 200)
    _write(p.local, p.report, 0, 300)
    conflicts, copies = p.rebase()
    paths = _paths(p.local)
    assert paths["/docs/report.odt"] == p.report
    assert p.local.get_inode(p.report).size == 200  # type: ignore[union-attr]
    (name,) = [n for n in paths if "conflict from laptop" in n]
    assert name.startswith("/docs/report (conflict from laptop ") and name.endswith(").odt")
    assert p.local.get_inode(paths[name]).size == 300  # type: ignore[union-attr]
    assert copies == {p.report: paths[name]}
    assert len(conflicts) == 1


def test_same_name_created_on_both_sides() -> None:
    p = Pair()
    theirs = p.r.create(ROOT_INODE, b"notes.txt", REG, 0, 0)
    mine = p.l.create(ROOT_INODE, b"notes.txt", REG, 0, 0)
    conflicts, _ = p.rebase()
    paths = _paths(p.local)
    assert paths["/notes.txt"] == theirs.id
    assert [i for n, i in paths.items() if "notes (conflict from laptop" in n] == [mine.id]
    assert len(conflicts) == 1


def test_delete_there_modify_here_the_file_comes_back() -> None:
    p = Pair()
    docs = _paths(p.remote)["/docs"]
    p.r.unlink(docs, b"report.odt")
    p.remote.delete_inode(p.report)
    _write(p.local, p.report, 1, 2 << 20)
    p.rebase()
    assert _paths(p.local)["/docs/report.odt"] == p.report
    assert p.local.get_chunk(p.report, 1) is not None


def test_delete_here_modify_there_the_file_comes_back() -> None:
    p = Pair()
    docs = _paths(p.local)["/docs"]
    p.l.unlink(docs, b"report.odt")
    p.local.delete_inode(p.report)
    _write(p.remote, p.report, 0, 50)
    p.rebase()
    assert _paths(p.local)["/docs/report.odt"] == p.report
    assert p.local.get_inode(p.report).size == 50  # type: ignore[union-attr]


def test_plain_delete_against_no_change_stays_deleted() -> None:
    p = Pair()
    docs = _paths(p.local)["/docs"]
    p.l.unlink(docs, b"report.odt")  # still open here: the inode row stays with nlink 0
    p.r.create(ROOT_INODE, b"other", REG, 0, 0)
    p.rebase()
    assert "/docs/report.odt" not in _paths(p.local)


def test_rmdir_of_a_directory_that_gained_entries_elsewhere_keeps_it() -> None:
    p = Pair()
    a = _paths(p.local)["/a"]
    p.r.create(a, b"new", REG, 0, 0)
    p.l.rmdir(ROOT_INODE, b"a")
    p.local.delete_inode(a)
    p.rebase()
    assert _paths(p.local)["/a/new"]


def test_renames_that_would_make_a_cycle_leave_everything_reachable() -> None:
    p = Pair()
    paths = _paths(p.local)
    p.l.rename(ROOT_INODE, b"a", paths["/b"], b"a", 0)
    p.r.rename(ROOT_INODE, b"b", paths["/a"], b"b", 0)
    p.rebase()
    after = _paths(p.local)
    assert paths["/a"] in after.values() and paths["/b"] in after.values()


def test_rename_versus_rename_gives_one_name() -> None:
    p = Pair()
    docs = _paths(p.local)["/docs"]
    p.l.rename(ROOT_INODE, b"docs", ROOT_INODE, b"mine", 0)
    p.r.rename(ROOT_INODE, b"docs", ROOT_INODE, b"theirs", 0)
    p.rebase()
    after = _paths(p.local)
    assert after["/theirs"] == docs and "/mine" not in after
    assert after["/theirs/report.odt"] == p.report


def test_rename_into_a_directory_deleted_elsewhere() -> None:
    p = Pair()
    paths = _paths(p.local)
    p.r.rmdir(ROOT_INODE, b"a")
    p.remote.delete_inode(paths["/a"])
    p.l.rename(ROOT_INODE, b"b", paths["/a"], b"b", 0)
    p.rebase()
    after = _paths(p.local)
    assert paths["/b"] in after.values()


def test_metadata_on_both_sides_last_commit_wins_per_field() -> None:
    p = Pair()
    theirs = p.remote.get_inode(p.report)
    mine = p.local.get_inode(p.report)
    assert theirs is not None and mine is not None
    theirs.uid, theirs.mtime_ns = 42, 7
    mine.mode, mine.mtime_ns = stat.S_IFREG | 0o600, 9
    p.remote.put_inode(theirs)
    p.local.put_inode(mine)
    p.remote.set_xattr(p.report, b"user.a", b"theirs")
    p.local.set_xattr(p.report, b"user.b", b"mine")
    conflicts, _ = p.rebase()
    got = p.local.get_inode(p.report)
    assert got is not None and conflicts == []
    assert (got.uid, got.mode, got.mtime_ns) == (42, stat.S_IFREG | 0o600, 9)
    assert p.local.list_xattrs(p.report) == [b"user.a", b"user.b"]


def test_the_rebased_delta_reproduces_the_merged_tree_on_the_other_device() -> None:
    p = Pair()
    _write(p.remote, p.report, 0, 200)
    _write(p.local, p.report, 0, 300)
    p.l.create(ROOT_INODE, b"mine", REG, 0, 0)
    p.r.create(ROOT_INODE, b"theirs", REG, 0, 0)
    p.rebase()
    # The other device applies our next delta over its own (committed) state.
    journal.apply_delta(p.remote, journal.export_delta(p.local))
    rows = "SELECT * FROM {} ORDER BY 1, 2"
    for table in ("inodes", "dentries", "chunks", "xattrs", "packs"):
        assert (
            p.remote.db.execute(rows.format(table)).fetchall()
            == p.local.db.execute(rows.format("main." + table)).fetchall()
        )


def test_conflict_names_stay_within_name_max() -> None:
    name = conflict_name(b"x" * 250 + b".txt", "laptop", 0)
    assert len(name) <= 255 and name.endswith(b").txt")
    assert conflict_name(b".bashrc", "d", 0).startswith(b".bashrc (conflict from d ")
