"""After a merge the tree stays a tree: one name per directory, all reachable, true counts."""

from __future__ import annotations

import stat
import time

from encfs_cloud.tree.metadata import INODE_FIELDS, ROOT_INODE
from encfs_cloud.tree.rowsets import Key, Outcome, RowSets, _int

_NLINK = INODE_FIELDS.index("nlink")
_MODE = INODE_FIELDS.index("mode")


class TreeFixer(RowSets):
    """The repairs a row-level merge needs; `_local_names` is set by the merge beforehand."""

    _local_names: dict[int, tuple[int, bytes] | None]
    _recounted: set[str] = set()  # packs whose accounting the last merge recomputed

    def _fix_tree(
        self, local: dict[str, set[Key]], remote: dict[str, set[Key]], out: Outcome
    ) -> None:
        db = self.md.db
        # Names of things that no longer exist go.
        for parent, name in db.execute(
            "SELECT parent, name FROM main.dentries WHERE inode NOT IN (SELECT id FROM main.inodes)"
            " OR parent NOT IN (SELECT id FROM main.inodes)"
        ).fetchall():
            db.execute("DELETE FROM main.dentries WHERE parent=? AND name=?", (parent, name))
            out.entries.add((int(parent), bytes(name)))
        # A directory has one name: the first committer's (the remote one) is kept.
        dirs = "SELECT id FROM main.inodes WHERE (mode & 61440) = 16384"
        for (ino,) in db.execute(
            f"SELECT inode FROM main.dentries WHERE inode IN ({dirs}) "
            "GROUP BY inode HAVING count(*) > 1"
        ).fetchall():
            names = db.execute(
                "SELECT parent, name FROM main.dentries WHERE inode=? ORDER BY parent, name",
                (ino,),
            ).fetchall()
            keep = next(
                (n for n in names if self._row("remote", "dentries", tuple(n)) is not None),
                names[0],
            )
            for parent, name in names:
                if (parent, name) != tuple(keep):
                    db.execute(
                        "DELETE FROM main.dentries WHERE parent=? AND name=?", (parent, name)
                    )
                    out.entries.add((int(parent), bytes(name)))
        self._restore_nameless(local, remote, out)
        self._break_cycles(out)

    def _restore_nameless(
        self, local: dict[str, set[Key]], remote: dict[str, set[Key]], out: Outcome
    ) -> None:
        """Something one side deleted and the other changed comes back (modification wins)."""
        db = self.md.db
        touched = {
            "main": self._inodes_touched(local) | self._entry_targets("main", local),
            "remote": self._inodes_touched(remote) | self._entry_targets("remote", remote),
        }
        now = time.time()
        nameless = db.execute(
            "SELECT id FROM main.inodes "
            "WHERE id<>? AND id NOT IN (SELECT inode FROM main.dentries)",
            (ROOT_INODE,),
        ).fetchall()
        for (ino,) in nameless:
            for side in ("remote", "main"):
                if ino not in touched[side]:
                    continue
                # Only a side that still names it and changed it brings it back: a plain
                # delete against no change elsewhere stays a delete.
                row = (
                    self._local_names.get(ino)
                    if side == "main"
                    else self._first_name("remote", ino)
                )
                if row is None:
                    continue
                parent, name = row
                target = self.md.get_inode(parent)
                if target is not None and target.is_dir and self.md.lookup(parent, name) is None:
                    db.execute(
                        "INSERT INTO main.dentries VALUES(?,?,?,?)",
                        (self.md.new_entry_id(parent), parent, name, ino),
                    )
                    out.entries.add((parent, name))
                else:
                    self._place(ino, parent, name, now, out)
                out.inodes.add(ino)
                break

    def _break_cycles(self, out: Outcome) -> None:
        """Directories that two renames put inside each other are hung under the root."""
        db = self.md.db
        while True:
            reachable = {
                r[0]
                for r in db.execute(
                    "WITH RECURSIVE up(id) AS (SELECT ? UNION SELECT d.inode FROM main.dentries d "
                    "JOIN up ON d.parent = up.id) SELECT id FROM up",
                    (ROOT_INODE,),
                )
            }
            lost = db.execute(
                "SELECT d.parent, d.name, d.inode FROM main.dentries d "
                "JOIN main.inodes i ON i.id = d.inode WHERE (i.mode & 61440) = 16384 "
                "ORDER BY d.inode"
            ).fetchall()
            stray = [r for r in lost if r[2] not in reachable and r[0] not in reachable]
            if not stray:
                return
            parent, name, ino = self._cycle_member(stray[0], reachable)
            db.execute("DELETE FROM main.dentries WHERE parent=? AND name=?", (parent, name))
            out.entries.add((parent, name))
            if self.md.lookup(ROOT_INODE, name) is None:
                db.execute(
                    "INSERT INTO main.dentries VALUES(?,?,?,?)",
                    (self.md.new_entry_id(ROOT_INODE), ROOT_INODE, name, ino),
                )
                out.entries.add((ROOT_INODE, name))
            else:
                self._place(ino, ROOT_INODE, name, time.time(), out)

    def _cycle_member(
        self, start: tuple[int, bytes, int], reachable: set[int]
    ) -> tuple[int, bytes, int]:
        """Walk up from an unreachable directory to the entry to move: one on the cycle, or
        the topmost one under a directory that has no name."""
        chain: list[tuple[int, bytes, int]] = []
        entry = (int(start[0]), bytes(start[1]), int(start[2]))
        while True:
            if any(e[2] == entry[2] for e in chain):
                return entry  # came round: this directory is on the cycle
            chain.append(entry)
            up = self.md.db.execute(
                "SELECT parent, name, inode FROM main.dentries WHERE inode=? ORDER BY parent, name",
                (entry[0],),
            ).fetchone()
            if up is None or int(up[2]) in reachable:
                return entry
            entry = (int(up[0]), bytes(up[1]), int(up[2]))

    def _recount(
        self, local: dict[str, set[Key]], remote: dict[str, set[Key]], out: Outcome
    ) -> None:
        """Link counts and pack accounting follow from the merged rows, not from either side."""
        db = self.md.db
        inodes = out.inodes | self._inodes_touched(local) | self._inodes_touched(remote)
        for changed in (local, remote):
            inodes |= {_int(key[0]) for key in changed["dentries"]}
        inodes |= self._entry_targets("main", local) | self._entry_targets("remote", remote)
        inodes |= {p for p, _ in out.entries}
        for ino in inodes:
            row = self._row("main", "inodes", (ino,))
            if row is None:
                continue
            names = db.execute("SELECT count(*) FROM main.dentries WHERE inode=?", (ino,))
            count = int(names.fetchone()[0])
            if stat.S_ISDIR(_int(row[_MODE])):
                named = count > 0 or ino == ROOT_INODE
                count = 2 + self.md.count_subdirs(ino) if named else 0
            if count != row[_NLINK]:
                db.execute("UPDATE main.inodes SET nlink=? WHERE id=?", (count, ino))
                out.inodes.add(ino)
        packs = {k[0] for k in local["packs"] | remote["packs"]}
        for table_rows in (local["chunks"], remote["chunks"]):
            for key in table_rows:
                for side in ("main", "remote", "base"):
                    row = self._row(side, "chunks", key)
                    if row is not None:
                        packs.add(row[2])
        self._recounted = {str(p) for p in packs}
        for pack in packs:
            if self._row("main", "packs", (pack,)) is None:
                theirs = self._row("remote", "packs", (pack,))
                if theirs is None:
                    continue
                self._put("packs", (pack,), theirs)
            db.execute(
                "UPDATE main.packs SET live=(SELECT coalesce(sum(len), 0) FROM main.chunks "
                "WHERE pack=?) WHERE id=?",
                (pack, pack),
            )
