"""The undo-log merge base equals a full copy of the durable head kept the old way, always."""

from __future__ import annotations

import os
import random
import secrets
import stat

from encfs_cloud.errors import FsError
from encfs_cloud.tree import journal
from encfs_cloud.tree.merge import Merger
from encfs_cloud.tree.metadata import ROOT_INODE, TABLE_KEYS, ChunkRef, Metadata
from encfs_cloud.tree.namespace import Namespace

REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


def _differences(md: Metadata) -> list[str]:
    """Rows where the undo-log base and the full copy `truth` disagree."""
    db = md.db
    found = []
    for table in TABLE_KEYS:
        view = f"temp.base_{table}"
        for one, other in ((view, f"truth.{table}"), (f"truth.{table}", view)):
            rows = db.execute(f"SELECT * FROM {one} EXCEPT SELECT * FROM {other}").fetchall()
            found += [f"{table}: {r!r} only in {one}" for r in rows[:3]]
    return found


class Model:
    """One device's live tree, its merge base, and the truth: base as a full copy."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.md = Metadata()
        self.ns = Namespace(self.md)
        self.ns.ensure_root(0, 0)
        journal.export_snapshot(self.md)  # the first commit: base = main
        self.merger = Merger(self.md, "here")
        db = self.md.db
        db.execute("ATTACH DATABASE ':memory:' AS truth")
        db.deserialize(db.serialize(), name="truth")
        self.queue: list[tuple[str, bytes]] = []

    def files(self) -> list[tuple[int, bytes, int]]:
        return [
            (int(p), bytes(n), int(i))
            for p, n, i in self.md.db.execute("SELECT parent, name, inode FROM main.dentries")
        ]

    def change(self) -> None:
        """One random change of the kinds a mount makes (rows added, replaced, deleted)."""
        rng, ns, md = self.rng, self.ns, self.md
        entries = self.files()
        dirs = [ROOT_INODE] + [i for _, _, i in entries if md.get_inode(i).is_dir]  # type: ignore[union-attr]
        kind = rng.randrange(8)
        name = b"n%d" % rng.randrange(40)
        parent = rng.choice(dirs)
        try:
            if kind <= 1 or not entries:
                ns.create(parent, name, DIR if kind == 1 else REG, 0, 0)
            elif kind == 2:
                p, n, _ = rng.choice(entries)
                ns.unlink(p, n) if not md.get_inode(md.lookup(p, n) or 0).is_dir else ns.rmdir(p, n)  # type: ignore[union-attr]
            elif kind == 3:
                p, n, _ = rng.choice(entries)
                ns.rename(p, n, parent, name, 0)
            elif kind == 4:
                _, _, ino = rng.choice(entries)
                node = md.get_inode(ino)
                if node is not None and node.is_reg:
                    pack = secrets.token_hex(8)
                    md.add_pack(pack, 8192)
                    ref = ChunkRef(pack, 0, 4124, 100, rng.randrange(1 << 62), 1, os.urandom(32))
                    md.set_chunk(ino, rng.randrange(3), ref)
                    node.size = rng.randrange(1 << 20)
                    md.put_inode(node)
            elif kind == 5:
                _, _, ino = rng.choice(entries)
                md.drop_chunks(ino, rng.randrange(3))
            elif kind == 6:
                _, _, ino = rng.choice(entries)
                ns.setxattr(ino, b"user.k%d" % rng.randrange(3), os.urandom(4), 0)
            else:
                md.set_counter(f"c{rng.randrange(3)}", rng.randrange(100))
        except (OSError, FsError):
            pass  # exists, not empty, not a directory...: the model only needs some change

    def export(self) -> None:
        self.merger.note_local()
        if self.rng.random() < 0.2:
            self.queue.append((journal.KIND_SNAPSHOT, journal.export_snapshot(self.md)))
        else:
            self.queue.append((journal.KIND_DELTA, journal.export_delta(self.md)))

    def land(self) -> None:
        kind, body = self.queue.pop(0)
        self.merger.own_commit_durable(kind, body)
        if kind == journal.KIND_SNAPSHOT:
            self.md.db.deserialize(body, name="truth")
        else:
            journal.apply_delta(self.md, body, schema="truth")
        if not self.queue:
            self.merger.all_local_durable()


def test_undo_log_base_follows_the_durable_head() -> None:
    seed = int(os.environ.get("ENCFS_MODEL_SEED") or random.randrange(1 << 32))
    print(f"seed {seed}")
    m = Model(random.Random(seed))
    for step in range(1500):
        roll = m.rng.random()
        if roll < 0.75:
            m.change()
        elif roll < 0.88:
            m.export()
        elif m.queue:
            m.land()
        assert not _differences(m.md), (step, _differences(m.md))
    # What a merge starts from: the whole base, materialized.
    m.md.db.execute("ATTACH DATABASE ':memory:' AS whole")
    m.merger.base.materialize("whole")
    for table in TABLE_KEYS:
        rows = m.md.db.execute(
            f"SELECT * FROM whole.{table} EXCEPT SELECT * FROM truth.{table} UNION ALL "
            f"SELECT * FROM truth.{table} EXCEPT SELECT * FROM whole.{table}"
        )
        assert not rows.fetchall(), table


def test_a_spooled_snapshot_becomes_local_changes_over_an_unchanged_base() -> None:
    m = Model(random.Random(7))
    durable = m.md.db.serialize(name="truth")
    for _ in range(200):
        m.change()
    spooled = journal.export_snapshot(m.md)
    # A fresh mount replays the durable head, then adopts the commit it spooled while offline.
    md = journal.load_snapshot(durable)
    merger = Merger(md, "here")
    md.db.execute("ATTACH DATABASE ':memory:' AS truth")
    md.db.deserialize(durable, name="truth")
    merger.adopt_own(journal.KIND_SNAPSHOT, spooled)
    assert not _differences(md)
    assert any(md.dirty.values())
    md.db.execute("ATTACH DATABASE ':memory:' AS spooled")
    md.db.deserialize(spooled, name="spooled")
    for table in TABLE_KEYS:
        rows = md.db.execute(
            f"SELECT * FROM main.{table} EXCEPT SELECT * FROM spooled.{table} UNION ALL "
            f"SELECT * FROM spooled.{table} EXCEPT SELECT * FROM main.{table}"
        ).fetchall()
        assert not rows, table
    # What the next commit carries: exactly the rows where main differs from the base.
    for table, keys in md.dirty.items():
        assert all(merger._row("main", table, k) != merger._row("base", table, k) for k in keys)
