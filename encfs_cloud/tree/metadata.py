"""Inodes, directory entries, xattrs and chunk maps in an in-memory SQLite database."""

from __future__ import annotations

import secrets
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass

ROOT_INODE = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS {s}inodes(
    id INTEGER PRIMARY KEY, mode INT NOT NULL, uid INT NOT NULL, gid INT NOT NULL,
    nlink INT NOT NULL, size INT NOT NULL, atime_ns INT NOT NULL, mtime_ns INT NOT NULL,
    ctime_ns INT NOT NULL, rdev INT NOT NULL, target BLOB);
CREATE INDEX IF NOT EXISTS {s}inodes_unlinked ON inodes(id) WHERE nlink<=0;
CREATE TABLE IF NOT EXISTS {s}dentries(
    id INT NOT NULL, parent INT NOT NULL, name BLOB NOT NULL, inode INT NOT NULL,
    PRIMARY KEY(parent, id)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS {s}dentries_by_name ON dentries(parent, name);
CREATE TABLE IF NOT EXISTS {s}xattrs(
    inode INT NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY(inode, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {s}chunks(
    inode INT NOT NULL, idx INT NOT NULL, pack TEXT NOT NULL, off INT NOT NULL,
    len INT NOT NULL, plain_len INT NOT NULL, version INT NOT NULL, gen INT NOT NULL,
    digest BLOB NOT NULL, PRIMARY KEY(inode, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {s}chunks_by_pack ON chunks(pack, off);
CREATE TABLE IF NOT EXISTS {s}packs(id TEXT PRIMARY KEY, size INT NOT NULL, live INT NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {s}counters(name TEXT PRIMARY KEY, value INT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {s}history(seq INTEGER PRIMARY KEY, hash BLOB NOT NULL);
"""

# Per table: the key columns a delta records deletions by.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "inodes": ("id",),
    "dentries": ("parent", "name"),
    "xattrs": ("inode", "name"),
    "chunks": ("inode", "idx"),
    "packs": ("id",),
    "counters": ("name",),
    "history": ("seq",),
}


# Entries are keyed on (parent, id), which is also readdir's order: an entry id is unique
# within its directory (a readdir offset there). Trees of earlier versions: tree/upgrade.py.

# Identifiers are drawn at random from this many bits instead of counted: several devices
# allocate them at once without talking to each other, and 62 bits keep a readdir offset
# (entry id + 2) inside a signed 64-bit off_t. See design.md, "Several devices".
ID_BITS = 62

# How many past commits' hashes the tree remembers: a device that was away for fewer commits
# than this can still tell a genuine newer bucket from a forked or rolled-back one.
HISTORY_KEPT = 65536

# Directories whose entry (parent, name) parent_of remembers.
DIR_ENTRIES_KEPT = 65536


@dataclass
class Inode:
    id: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    target: bytes | None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass(frozen=True)
class ChunkRef:
    pack: str
    off: int
    len: int
    plain_len: int
    version: int
    gen: int
    digest: bytes  # chunk_digest of the plaintext: what the reader must find


INODE_FIELDS = tuple(Inode.__dataclass_fields__)
_UPDATE_INODE = (
    f"UPDATE inodes SET {','.join(f'{f}=?' for f in INODE_FIELDS[1:])} WHERE {INODE_FIELDS[0]}=?"
)
_INSERT_INODE = f"INSERT INTO inodes VALUES({','.join('?' * len(INODE_FIELDS))})"


class Metadata:
    """The whole filesystem tree, held in memory and tracked for delta commits.

    Every mutation records the keys it touched; `journal.py` turns those into a sealed delta.
    All calls happen on one thread (the trio thread), so no locking is needed here.
    """

    def __init__(self, conn: sqlite3.Connection | None = None) -> None:
        self.db = conn or sqlite3.connect(":memory:", check_same_thread=False)
        self.db.isolation_level = None  # autocommit: we never need SQL transactions
        # SQLite spills big sorts, indexes and attached temp databases to /var/tmp by default:
        # that would put plaintext names on disk. Everything stays in memory.
        self.db.execute("PRAGMA temp_store=MEMORY")
        # Set when the tree was rebuilt from an earlier version's schema (tree/upgrade.py):
        # the next commit is then a snapshot, so later mounts load the new schema as it is.
        self.upgraded = False
        self.db.executescript(SCHEMA.format(s=""))
        self.dirty: dict[str, set[tuple[object, ...]]] = {t: set() for t in TABLE_KEYS}
        # directory inode -> its entry as last seen; a hint, checked on every use (below)
        self.dir_entries: dict[int, tuple[int, bytes]] = {}

    # --- counters ---------------------------------------------------------------------

    def counter(self, name: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else default

    def set_counter(self, name: str, value: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO counters VALUES(?, ?)", (name, value))
        self.dirty["counters"].add((name,))

    def next_counter(self, name: str, start: int) -> int:
        value = self.counter(name, start)
        self.set_counter(name, value + 1)
        return value

    def new_id(self, table: str, column: str) -> int:
        """A random identifier unused in `table` (no other device can be asked)."""
        while True:
            candidate = secrets.randbits(ID_BITS)
            if candidate <= ROOT_INODE:
                continue
            taken = self.db.execute(
                f"SELECT 1 FROM {table} WHERE {column}=?", (candidate,)
            ).fetchone()
            if taken is None:
                return candidate

    def new_entry_id(self, parent: int) -> int:
        """A random entry id unused in directory `parent` (a key lookup, not a table scan)."""
        while True:
            candidate = secrets.randbits(ID_BITS)
            if candidate <= ROOT_INODE:
                continue
            if not self.entry_id_taken(parent, candidate):
                return candidate

    def entry_id_taken(self, parent: int, entry_id: int) -> bool:
        found = self.db.execute(
            "SELECT 1 FROM main.dentries WHERE parent=? AND id=?", (parent, entry_id)
        )
        return found.fetchone() is not None

    # --- commit history ---------------------------------------------------------------

    def record_commit(self, seq: int, digest: bytes) -> None:
        """Remember the hash of commit `seq` (the one the next commit chains to)."""
        self.db.execute("INSERT OR REPLACE INTO history VALUES(?, ?)", (seq, digest))
        self.dirty["history"].add((seq,))
        old = seq - HISTORY_KEPT
        if old > 0 and self.db.execute("DELETE FROM history WHERE seq=?", (old,)).rowcount:
            self.dirty["history"].add((old,))

    def commit_hash_of(self, seq: int) -> bytes | None:
        row = self.db.execute("SELECT hash FROM history WHERE seq=?", (seq,)).fetchone()
        return bytes(row[0]) if row else None

    # --- inodes -----------------------------------------------------------------------

    def get_inode(self, ino: int) -> Inode | None:
        row = self.db.execute(
            f"SELECT {','.join(INODE_FIELDS)} FROM inodes WHERE id=?", (ino,)
        ).fetchone()
        return Inode(*row) if row else None

    def create_inode(
        self,
        mode: int,
        uid: int,
        gid: int,
        now_ns: int,
        rdev: int = 0,
        target: bytes | None = None,
        ino: int | None = None,
    ) -> Inode:
        if ino is None:
            ino = self.new_id("inodes", "id")
        size = len(target) if target is not None else 0
        inode = Inode(ino, mode, uid, gid, 0, size, now_ns, now_ns, now_ns, rdev, target)
        self.put_inode(inode)
        return inode

    def put_inode(self, inode: Inode) -> None:
        values = tuple(getattr(inode, f) for f in INODE_FIELDS)
        # An UPDATE where the row exists (nearly every call): INSERT OR REPLACE deletes and
        # re-inserts it, firing the merge base's delete and insert triggers on each write,
        # setattr and release of an untar.
        changed = self.db.execute(_UPDATE_INODE, (*values[1:], values[0])).rowcount
        if not changed:
            self.db.execute(_INSERT_INODE, values)
        self.dirty["inodes"].add((inode.id,))

    def delete_inode(self, ino: int) -> list[ChunkRef]:
        """Remove an inode with its xattrs and chunk map; returns the chunks it dropped."""
        dropped = self.drop_chunks(ino, 0)
        for (name,) in self.db.execute("SELECT name FROM xattrs WHERE inode=?", (ino,)):
            self.dirty["xattrs"].add((ino, name))
        self.db.execute("DELETE FROM xattrs WHERE inode=?", (ino,))
        self.db.execute("DELETE FROM inodes WHERE id=?", (ino,))
        self.dirty["inodes"].add((ino,))
        return dropped

    def orphans(self) -> list[int]:
        """Inodes no entry points to (left by a crash while a deleted file was open).

        From a partial index that holds only those (almost always none): a scan of every
        inode took 0.14 s of each mount of a 1,000,000-file tree."""
        rows = self.db.execute("SELECT id FROM inodes WHERE nlink<=0 AND id<>?", (ROOT_INODE,))
        return [r[0] for r in rows]

    def size_bytes(self) -> int:
        """The live tree's database size (pages in use), about 2.5 times its sealed snapshot."""
        pages = self.db.execute("PRAGMA main.page_count").fetchone()[0]
        free = self.db.execute("PRAGMA main.freelist_count").fetchone()[0]
        return int(pages - free) * int(self.db.execute("PRAGMA main.page_size").fetchone()[0])

    def inode_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM inodes").fetchone()[0])

    # --- directory entries --------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self.db.execute(
            "SELECT inode FROM dentries WHERE parent=? AND name=?", (parent, name)
        ).fetchone()
        return int(row[0]) if row else None

    def add_entry(self, parent: int, name: bytes, ino: int) -> None:
        self.db.execute(
            "INSERT INTO dentries(id, parent, name, inode) VALUES(?,?,?,?)",
            (self.new_entry_id(parent), parent, name, ino),
        )
        self.dirty["dentries"].add((parent, name))

    def remove_entry(self, parent: int, name: bytes) -> None:
        self.db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
        self.dirty["dentries"].add((parent, name))

    def replace_entry(self, parent: int, name: bytes, ino: int) -> None:
        self.db.execute(
            "UPDATE dentries SET inode=? WHERE parent=? AND name=?", (ino, parent, name)
        )
        self.dirty["dentries"].add((parent, name))

    def has_entries(self, parent: int) -> bool:
        row = self.db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (parent,))
        return row.fetchone() is not None

    def count_subdirs(self, parent: int) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM dentries d JOIN inodes i ON i.id=d.inode "
            "WHERE d.parent=? AND (i.mode & ?)=?",
            (parent, 0o170000, stat.S_IFDIR),  # stat.S_IFMT is a function, not the mask
        ).fetchone()
        return int(row[0])

    def parent_of(self, ino: int) -> int | None:
        """A directory's parent (directories have exactly one entry).

        Nothing indexes entries by inode (an index would cost ~30 bytes a file), and the scan
        took 35 ms at 1,000,000 files, once per directory listed (its ".."). So the entry
        seen when the directory was looked up or listed is remembered and checked by key:
        a directory's only entry is where it is, whatever renames or merges did since.
        """
        known = self.dir_entries.get(ino)
        if known is not None and self.lookup(*known) == ino:
            return known[0]
        row = self.db.execute("SELECT parent, name FROM dentries WHERE inode=? LIMIT 1", (ino,))
        found = row.fetchone()
        if found is None:
            return None
        self.note_dir_entry(ino, int(found[0]), bytes(found[1]))
        return int(found[0])

    def note_dir_entry(self, ino: int, parent: int, name: bytes) -> None:
        if len(self.dir_entries) >= DIR_ENTRIES_KEPT:
            del self.dir_entries[next(iter(self.dir_entries))]  # the oldest noted
        self.dir_entries[ino] = (parent, name)

    def list_entries(
        self, parent: int, after: int, limit: int = 128
    ) -> list[tuple[int, bytes, Inode]]:
        """(entry id, name, inode) in a stable order; `after` is the last entry id seen.

        The table's key (parent, id) makes each page a range scan: listing a directory of
        100,000 entries a page at a time stays linear.
        """
        rows = self.db.execute(
            f"SELECT d.id, d.name, {','.join('i.' + f for f in INODE_FIELDS)} "
            "FROM dentries d JOIN inodes i ON i.id = d.inode "
            "WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?",
            (parent, after, limit),
        )
        found = [(entry_id, bytes(name), Inode(*fields)) for entry_id, name, *fields in rows]
        for _, name, node in found:
            if node.is_dir:
                self.note_dir_entry(node.id, parent, name)
        return found

    # --- xattrs -------------------------------------------------------------------------

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        row = self.db.execute(
            "SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, name)
        ).fetchone()
        return bytes(row[0]) if row else None

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO xattrs VALUES(?,?,?)", (ino, name, value))
        self.dirty["xattrs"].add((ino, name))

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        cur = self.db.execute("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name))
        self.dirty["xattrs"].add((ino, name))
        return cur.rowcount > 0

    def list_xattrs(self, ino: int) -> list[bytes]:
        rows = self.db.execute("SELECT name FROM xattrs WHERE inode=? ORDER BY name", (ino,))
        return [bytes(r[0]) for r in rows]

    # --- chunk maps and packs -------------------------------------------------------------

    def get_chunk(self, ino: int, idx: int) -> ChunkRef | None:
        row = self.db.execute(
            "SELECT pack, off, len, plain_len, version, gen, digest FROM chunks "
            "WHERE inode=? AND idx=?",
            (ino, idx),
        ).fetchone()
        return ChunkRef(*row) if row else None

    def set_chunk(self, ino: int, idx: int, ref: ChunkRef) -> ChunkRef | None:
        """Point chunk (ino, idx) at `ref`; returns the reference it replaced."""
        old = self.get_chunk(ino, idx)
        if old is not None:
            self._release(old)
        self.db.execute(
            "INSERT OR REPLACE INTO chunks VALUES(?,?,?,?,?,?,?,?,?)",
            (ino, idx, ref.pack, ref.off, ref.len, ref.plain_len, ref.version, ref.gen, ref.digest),
        )
        self.db.execute("UPDATE packs SET live=live+? WHERE id=?", (ref.len, ref.pack))
        self.dirty["chunks"].add((ino, idx))
        self.dirty["packs"].add((ref.pack,))
        return old

    def drop_chunks(self, ino: int, first_idx: int) -> list[ChunkRef]:
        """Forget chunks from `first_idx` on (truncate, unlink); returns what was dropped."""
        rows = self.db.execute(
            "SELECT idx, pack, off, len, plain_len, version, gen, digest FROM chunks "
            "WHERE inode=? AND idx>=?",
            (ino, first_idx),
        ).fetchall()
        dropped = []
        for idx, *ref in rows:
            chunk = ChunkRef(*ref)
            self._release(chunk)
            self.dirty["chunks"].add((ino, idx))
            dropped.append(chunk)
        self.db.execute("DELETE FROM chunks WHERE inode=? AND idx>=?", (ino, first_idx))
        return dropped

    def chunks_in_pack(self, pack: str, start: int, end: int) -> list[tuple[int, int, ChunkRef]]:
        """(inode, index, ref) of the chunks stored in `pack` at offsets [start, end)."""
        rows = self.db.execute(
            "SELECT inode, idx, pack, off, len, plain_len, version, gen, digest FROM chunks "
            "WHERE pack=? AND off>=? AND off<? ORDER BY off",
            (pack, start, end),
        )
        return [(ino, idx, ChunkRef(*ref)) for ino, idx, *ref in rows]

    def stored_blocks(self, inos: list[int], block: int) -> dict[int, int]:
        """Per inode with chunks, the blocks of `block` bytes they fill (each rounded up).

        One query for a whole readdir page: per entry, the call would cost as much as the
        rest of building its attributes.
        """
        marks = ",".join("?" * len(inos))
        rows = self.db.execute(
            f"SELECT inode, sum((plain_len + ?) / ?) FROM chunks WHERE inode IN ({marks}) "
            "GROUP BY inode",
            (block - 1, block, *inos),
        )
        return {int(ino): int(blocks) for ino, blocks in rows}

    def chunk_indices(self, ino: int) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT idx FROM chunks WHERE inode=?", (ino,))]

    def add_pack(self, pack_id: str, size: int) -> None:
        self.db.execute("INSERT INTO packs VALUES(?,?,0)", (pack_id, size))
        self.dirty["packs"].add((pack_id,))

    def set_pack_size(self, pack_id: str, size: int) -> None:
        """The pack's object size (its class), known once it is closed; 0 means unknown."""
        self.db.execute("UPDATE packs SET size=? WHERE id=?", (size, pack_id))
        self.dirty["packs"].add((pack_id,))

    def _release(self, ref: ChunkRef) -> None:
        self.db.execute("UPDATE packs SET live=live-? WHERE id=?", (ref.len, ref.pack))
        self.dirty["packs"].add((ref.pack,))

    def dead_packs(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM packs WHERE live<=0")]

    def forget_packs(self, pack_ids: list[str]) -> None:
        for pid in pack_ids:
            self.db.execute("DELETE FROM packs WHERE id=?", (pid,))
            self.dirty["packs"].add((pid,))

    def all_packs(self) -> Iterator[tuple[str, int, int]]:
        yield from self.db.execute("SELECT id, size, live FROM packs")

    def usage(self) -> tuple[int, int]:
        """(bytes of file data, number of inodes) for statfs."""
        size = self.db.execute("SELECT coalesce(sum(size),0) FROM inodes").fetchone()[0]
        return int(size), self.inode_count()
