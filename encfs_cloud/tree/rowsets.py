"""Row-level set queries over the live tree, the merge base and another device's state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from encfs_cloud.tree.mergebase import MergeBase
from encfs_cloud.tree.metadata import ROOT_INODE, TABLE_KEYS, Metadata
from encfs_cloud.tree.namespace import NAME_MAX

Key = tuple[object, ...]
_PER_INODE = {"inodes": "id", "chunks": "inode", "xattrs": "inode"}


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _bytes(value: object) -> bytes:
    assert isinstance(value, bytes)
    return value


def conflict_name(name: bytes, device: str, when: float) -> bytes:
    """`report.odt` → `report (conflict from laptop 2026-12-03 10.41).odt`, within NAME_MAX."""
    stem, dot, ext = name.rpartition(b".")
    if not stem:  # no extension, or a dot file such as `.bashrc`
        stem, dot, ext = name, b"", b""
    stamp = time.strftime("%Y-%m-%d %H.%M", time.localtime(when))
    tag = f" (conflict from {device} {stamp})".encode()
    room = NAME_MAX - len(tag) - len(dot) - len(ext)
    return stem[: max(room, 1)] + tag + dot + ext


@dataclass
class Outcome:
    """What changed for the kernel, and the conflict copies made."""

    inodes: set[int] = field(default_factory=set)
    entries: set[tuple[int, bytes]] = field(default_factory=set)
    conflicts: list[tuple[int, bytes]] = field(default_factory=list)


class RowSets:
    """Queries on three trees: `main` (live), `base` (durable head), `remote` (attached)."""

    def __init__(self, md: Metadata, device: str) -> None:
        self.md = md
        self.device = device
        self.base = MergeBase(md.db)

    def _src(self, side: str, table: str) -> str:
        return self.base.source(table) if side == "base" else f"{side}.{table}"

    def _changed(self, table: str, side: str, against: str = "base") -> set[Key]:
        """Keys whose row differs between `side` and `against` (added, changed or gone)."""
        if {side, against} == {"main", "base"}:  # only where the undo log has a row
            return self._differing(table, side, against, self.base.keys(table))
        cols = ",".join(TABLE_KEYS[table])
        one, other = self._src(side, table), self._src(against, table)
        rows = self.md.db.execute(
            f"SELECT {cols} FROM (SELECT * FROM {one} EXCEPT "
            f"SELECT * FROM {other}) UNION SELECT {cols} FROM "
            f"(SELECT * FROM {other} EXCEPT SELECT * FROM {one})"
        )
        return {tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows}

    def _differing(
        self, table: str, side: str, against: str, candidates: set[Key] | None
    ) -> set[Key]:
        """Like `_changed`, but only among `candidates` (None: the whole table)."""
        if candidates is None:
            return self._changed(table, side, against)
        return {k for k in candidates if self._row(side, table, k) != self._row(against, table, k)}

    def _row(self, side: str, table: str, key: Key) -> tuple[object, ...] | None:
        if side == "base":
            return self.base.row(table, key)
        where = " AND ".join(f"{k}=?" for k in TABLE_KEYS[table])
        row = self.md.db.execute(f"SELECT * FROM {side}.{table} WHERE {where}", key).fetchone()
        return tuple(row) if row else None

    def _put(self, table: str, key: Key, row: tuple[object, ...] | None) -> None:
        where = " AND ".join(f"{k}=?" for k in TABLE_KEYS[table])
        self.md.db.execute(f"DELETE FROM main.{table} WHERE {where}", key)
        if row is None:
            return
        if table == "dentries" and self.md.entry_id_taken(_int(row[1]), _int(row[0])):
            parent = _int(row[1])
            row = (self.md.new_entry_id(parent), *row[1:])
        self.md.db.execute(f"INSERT INTO main.{table} VALUES({','.join('?' * len(row))})", row)

    def _inodes_touched(self, changed: dict[str, set[Key]]) -> set[int]:
        found: set[int] = set()
        for table in _PER_INODE:
            found |= {_int(k[0]) for k in changed[table]}
        return found

    def _first_name(self, side: str, ino: int) -> tuple[int, bytes] | None:
        row = self.md.db.execute(
            f"SELECT parent, name FROM {self._src(side, 'dentries')} "
            "WHERE inode=? ORDER BY parent, name",
            (ino,),
        ).fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    def _entry_targets(self, side: str, changed: dict[str, set[Key]]) -> set[int]:
        found: set[int] = set()
        for key in changed["dentries"]:
            for schema in (side, "base"):
                row = self._row(schema, "dentries", key)
                if row is not None:
                    found.add(_int(row[3]))
        return found

    def _place(self, ino: int, parent: int, name: bytes, now: float, out: Outcome) -> None:
        """Give `ino` a conflict name next to `name` in `parent` (root if that is gone)."""
        target = self.md.get_inode(parent)
        if target is None or not target.is_dir:
            parent = ROOT_INODE
        candidate = conflict_name(name, self.device, now)
        n = 2
        while self.md.lookup(parent, candidate) is not None:
            candidate = conflict_name(name, f"{self.device} {n}", now)
            n += 1
        self.md.db.execute(
            "INSERT INTO main.dentries VALUES(?,?,?,?)",
            (self.md.new_entry_id(parent), parent, candidate, ino),
        )
        out.entries.add((parent, candidate))
        out.inodes.add(ino)
        out.conflicts.append((parent, candidate))
