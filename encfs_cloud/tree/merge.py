"""Three-way merge of this mount's uncommitted tree over commits other devices made meanwhile."""

from __future__ import annotations

import logging
import stat
import time
from dataclasses import dataclass

from encfs_cloud.tree import journal
from encfs_cloud.tree.metadata import INODE_FIELDS, ROOT_INODE, TABLE_KEYS, ChunkRef, Metadata
from encfs_cloud.tree.rowsets import Key, Outcome, _bytes, _int
from encfs_cloud.tree.treefix import TreeFixer

log = logging.getLogger(__name__)

_SIZE = INODE_FIELDS.index("size")
_MODE = INODE_FIELDS.index("mode")


@dataclass
class Plan:
    """What a merge will do that needs file contents: local versions to copy aside."""

    copies: dict[int, list[tuple[int, ChunkRef]]]  # inode → its local chunks (index, where)
    # Files this side keeps although the other deleted them: chunks in packs the other side
    # freed must be sealed again (into our packs) before that side deletes the old ones.
    reseal: dict[int, list[tuple[int, ChunkRef]]]


class Merger(TreeFixer):
    """Keeps the state of the newest durable commit (`base`, an undo log over the live tree
    `main`: see mergebase.py) and merges other devices' commits into the live tree.

    Everything lives in one SQLite connection (in memory, never on disk), so a merge is a
    handful of set queries: what this mount changed (main vs base), what the other devices
    changed (remote vs base), and rules where both touched the same thing.
    """

    def __init__(self, md: Metadata, device: str) -> None:
        super().__init__(md, device)
        self._remote = False
        # Keys changed here since base that md.dirty no longer shows (exported into commits
        # not yet durable): with md.dirty, a superset of where main differs from base, so a
        # merge compares those rows only instead of whole tables.
        self.local_keys: dict[str, set[Key]] = {t: set() for t in TABLE_KEYS}
        self._remote_keys: dict[str, set[Key]] | None = None

    def note_local(self) -> None:
        """Called before each export (which clears md.dirty)."""
        for table, keys in self.md.dirty.items():
            self.local_keys[table] |= keys

    def all_local_durable(self) -> None:
        """Every export is in the bucket: base holds it, md.dirty holds what came after."""
        for keys in self.local_keys.values():
            keys.clear()

    def _delta_keys(self, body: bytes) -> dict[str, set[Key]]:
        """The keys a delta writes or deletes, per table."""
        db = self.md.db
        found: dict[str, set[Key]] = {}
        with journal.attached(self.md, body, "incoming"):
            for table, keys in TABLE_KEYS.items():
                cols = ",".join(keys)
                rows = db.execute(
                    f"SELECT {cols} FROM incoming.{table} "
                    f"UNION SELECT {cols} FROM incoming.del_{table}"
                )
                found[table] = {
                    tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows
                }
        return found

    # --- keeping base at the durable head -------------------------------------------------

    def own_commit_durable(self, kind: str, body: bytes) -> None:
        """Our commit is in the bucket: base moves to it."""
        with journal.attached(self.md, body, "incoming"):
            if kind == journal.KIND_SNAPSHOT:
                # The snapshot is main as it was exported: they differ only where main
                # changed since, which the dirty and local keys name.
                self.base.advance_to("incoming", self._local_candidates())
            else:
                self.base.advance_by_delta("incoming")

    def _local_candidates(self) -> dict[str, set[Key]]:
        return {t: self.local_keys[t] | self.md.dirty[t] for t in TABLE_KEYS}

    def fast_forward(self, kind: str, body: bytes) -> Outcome:
        """Another device's commit when nothing here is uncommitted: both move to it.

        Returns what it changed (for a snapshot: every inode and entry, as far as known)."""
        out = Outcome()
        if kind == journal.KIND_SNAPSHOT:
            self.base.load_main(body)
            out.inodes = {r[0] for r in self.md.db.execute("SELECT id FROM main.inodes")}
            out.entries = {
                (int(p), bytes(n))
                for p, n in self.md.db.execute("SELECT parent, name FROM main.dentries")
            }
        else:
            keys = self._delta_keys(body)
            out.inodes = {_int(k[0]) for t in ("inodes", "chunks", "xattrs") for k in keys[t]}
            out.entries = {(_int(k[0]), _bytes(k[1])) for k in keys["dentries"]}
            journal.apply_delta(self.md, body)
            self.base.reset()  # nothing was uncommitted: base is main again
        for touched in self.md.dirty.values():
            touched.clear()
        return out

    def adopt_own(self, kind: str, body: bytes) -> None:
        """A commit of ours that never reached the bucket (the spool of an unmount while
        offline) becomes uncommitted changes again: main moves, base stays."""
        if kind == journal.KIND_SNAPSHOT:
            self.base.replace_main(body)
        else:
            journal.apply_delta(self.md, body)
        for table in TABLE_KEYS:
            self.md.dirty[table] = self._changed(table, "main")

    def stage_remote(self, kind: str, body: bytes) -> None:
        """Build `remote` = base + another device's commit, ready for plan() and merge()."""
        db = self.md.db
        if not self._remote:
            db.execute("ATTACH DATABASE ':memory:' AS remote")
            self._remote = True
        if kind == journal.KIND_SNAPSHOT:
            db.deserialize(body, name="remote")
            self._remote_keys = None  # compare whole tables
        else:
            self.base.materialize("remote")
            journal.apply_delta(self.md, body, schema="remote")
            self._remote_keys = self._delta_keys(body)

    @property
    def staged(self) -> bool:
        return self._remote

    def drop_remote(self) -> None:
        """Abandon a staged commit (base and main stay as they were)."""
        self.md.db.execute("DETACH DATABASE remote")
        self._remote = False

    def finish_remote(self) -> None:
        """base := remote, and the remote copy goes."""
        # After a merge, main differs from remote only where md.dirty says (the next commit
        # carries exactly those rows).
        self.base.advance_to("remote", self._local_candidates())
        self.md.db.execute("DETACH DATABASE remote")
        self._remote = False

    # --- set queries ----------------------------------------------------------------------

    def _content_changed(self, side: str, ino: int, chunks: set[Key]) -> bool:
        if any(k[0] == ino for k in chunks):
            return True
        mine, before = self._row(side, "inodes", (ino,)), self._row("base", "inodes", (ino,))
        return mine is not None and before is not None and mine[_SIZE] != before[_SIZE]

    # --- planning and merging -------------------------------------------------------------

    def _sides(self) -> tuple[dict[str, set[Key]], dict[str, set[Key]]]:
        local = {
            t: self._differing(t, "main", "base", self.local_keys[t] | self.md.dirty[t])
            for t in TABLE_KEYS
        }
        theirs = self._remote_keys
        remote = {
            t: self._differing(t, "remote", "base", None if theirs is None else theirs[t])
            for t in TABLE_KEYS
        }
        return local, remote

    def plan(self) -> Plan:
        """Files whose contents both sides changed: their local chunks must be copied aside."""
        local, remote = self._sides()
        return Plan(self._content_conflicts(local, remote), self._revived(local, remote))

    def _revived(
        self, local: dict[str, set[Key]], remote: dict[str, set[Key]]
    ) -> dict[int, list[tuple[int, ChunkRef]]]:
        found: dict[int, list[tuple[int, ChunkRef]]] = {}
        for ino in self._inodes_touched(local) & self._inodes_touched(remote):
            if self._row("remote", "inodes", (ino,)) is not None:
                continue
            rows = self.md.db.execute(
                "SELECT c.idx, c.pack, c.off, c.len, c.plain_len, c.version, c.gen, c.digest "
                f"FROM main.chunks c JOIN {self._src('base', 'packs')} b ON b.id = c.pack "
                "WHERE c.inode=? AND c.pack NOT IN (SELECT id FROM remote.packs WHERE live>0) "
                "ORDER BY c.idx",
                (ino,),
            )
            chunks = [(idx, ChunkRef(*ref)) for idx, *ref in rows]
            if chunks:
                found[ino] = chunks
        return found

    def _content_conflicts(
        self, local: dict[str, set[Key]], remote: dict[str, set[Key]]
    ) -> dict[int, list[tuple[int, ChunkRef]]]:
        found: dict[int, list[tuple[int, ChunkRef]]] = {}
        for ino in self._inodes_touched(local) & self._inodes_touched(remote):
            mine, theirs = (
                self._row("main", "inodes", (ino,)),
                self._row("remote", "inodes", (ino,)),
            )
            if mine is None or theirs is None or not stat.S_ISREG(_int(mine[_MODE])):
                continue
            if self._content_changed("main", ino, local["chunks"]) and self._content_changed(
                "remote", ino, remote["chunks"]
            ):
                rows = self.md.db.execute(
                    "SELECT idx, pack, off, len, plain_len, version, gen, digest FROM main.chunks "
                    "WHERE inode=? ORDER BY idx",
                    (ino,),
                )
                found[ino] = [(idx, ChunkRef(*ref)) for idx, *ref in rows]
        return found

    def merge(self, plan: Plan) -> tuple[Outcome, dict[int, int]] | None:
        """Rewrite main as the merge of remote and the local changes; None if `plan` is stale.

        Returns what changed and, for each file in the plan, the new inode that takes its
        local contents (the caller seals them under that inode at once: no await between).
        """
        local, remote = self._sides()
        if (self._content_conflicts(local, remote), self._revived(local, remote)) != (
            plan.copies,
            plan.reseal,
        ):
            return None  # local writes landed meanwhile: plan again
        out = Outcome()
        copies = {ino: self.md.new_id("inodes", "id") for ino in plan.copies}
        self._ours, self._theirs = self._inodes_touched(local), self._inodes_touched(remote)
        # This side's names, read before the merge rewrites them (to bring things back).
        self._local_names = {
            ino: self._first_name("main", ino)
            for ino in self._ours | self._entry_targets("main", local)
        }
        for ino in self._ours | self._theirs:
            self._merge_inode(ino, remote, copies, out)
        self._merge_dentries(local, remote, copies, out)
        for key in remote["packs"]:
            if key not in local["packs"] or self._row("main", "packs", key) is None:
                self._put("packs", key, self._row("remote", "packs", key))
        for table in ("counters", "history"):
            for key in remote[table]:
                if key not in local[table] or table == "history":
                    self._put(table, key, self._row("remote", table, key))
        self._fix_tree(local, remote, out)
        self._recount(local, remote, out)
        # What the next commit must carry: every row where main now differs from remote,
        # looked for among everything the merge or either side touched.
        inodes = self._ours | self._theirs | out.inodes | set(copies.values())
        candidates = {t: local[t] | remote[t] for t in TABLE_KEYS}
        candidates["inodes"] |= {(i,) for i in inodes}
        candidates["dentries"] |= set(out.entries)
        candidates["packs"] |= {(p,) for p in self._recounted}
        for table, column in (("chunks", "inode"), ("xattrs", "inode")):
            cols = ",".join(TABLE_KEYS[table])
            for side in ("main", "remote"):
                for ino in inodes:
                    candidates[table] |= {
                        tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                        for r in self.md.db.execute(
                            f"SELECT {cols} FROM {side}.{table} WHERE {column}=?", (ino,)
                        )
                    }
        for table in TABLE_KEYS:
            self.md.dirty[table] = self._differing(table, "main", "remote", candidates[table])
        self.all_local_durable()  # md.dirty holds all of it now
        return out, copies

    def _take_all(self, side: str, ino: int) -> None:
        """Every row of `ino` (inode, chunks, xattrs) as `side` has it."""
        db = self.md.db
        db.execute("DELETE FROM main.inodes WHERE id=?", (ino,))
        db.execute("DELETE FROM main.chunks WHERE inode=?", (ino,))
        db.execute("DELETE FROM main.xattrs WHERE inode=?", (ino,))
        if side != "main":
            db.execute(f"INSERT INTO main.inodes SELECT * FROM {side}.inodes WHERE id=?", (ino,))
            db.execute(f"INSERT INTO main.chunks SELECT * FROM {side}.chunks WHERE inode=?", (ino,))
            db.execute(f"INSERT INTO main.xattrs SELECT * FROM {side}.xattrs WHERE inode=?", (ino,))

    def _merge_inode(
        self,
        ino: int,
        remote: dict[str, set[Key]],
        copies: dict[int, int],
        out: Outcome,
    ) -> None:
        in_local, in_remote = ino in self._ours, ino in self._theirs
        if in_remote:
            out.inodes.add(ino)
        if not in_local:
            self._take_all("remote", ino)
            return
        if not in_remote:
            return  # only ours changed: main already has it
        mine = self._row("main", "inodes", (ino,))
        theirs = self._row("remote", "inodes", (ino,))
        before = self._row("base", "inodes", (ino,))
        if mine is None:
            if theirs is not None:  # deleted here, modified there: the modification wins
                self._take_all("remote", ino)
            return
        if theirs is None:
            return  # deleted there, modified here: ours wins, main has it
        if ino in copies:
            self._copy_aside(ino, copies[ino], mine)
            self._take_all("remote", ino)
            return
        # Metadata on both sides: the last commit (ours) wins per field it changed.
        merged = tuple(
            m if before is None or m != b else t
            for m, t, b in zip(mine, theirs, before or mine, strict=True)
        )
        self._put("inodes", (ino,), merged)
        if self._content_changed("remote", ino, remote["chunks"]):
            db = self.md.db
            db.execute("DELETE FROM main.chunks WHERE inode=?", (ino,))
            db.execute("INSERT INTO main.chunks SELECT * FROM remote.chunks WHERE inode=?", (ino,))
        for key in remote["xattrs"]:
            if key[0] == ino and self._row("main", "xattrs", key) == self._row(
                "base", "xattrs", key
            ):
                self._put("xattrs", key, self._row("remote", "xattrs", key))

    def _copy_aside(self, ino: int, copy: int, mine: tuple[object, ...]) -> None:
        """The local version of a file both sides rewrote becomes inode `copy` (no chunks
        yet: the caller seals the local contents under it right after the merge)."""
        self._put("inodes", (copy,), (copy, *mine[1:]))
        self.md.db.execute(
            "INSERT INTO main.xattrs SELECT ?, name, value FROM main.xattrs WHERE inode=?",
            (copy, ino),
        )

    def _merge_dentries(
        self,
        local: dict[str, set[Key]],
        remote: dict[str, set[Key]],
        copies: dict[int, int],
        out: Outcome,
    ) -> None:
        now = time.time()
        for key in sorted(remote["dentries"], key=repr):
            out.entries.add((_int(key[0]), _bytes(key[1])))
            theirs = self._row("remote", "dentries", key)
            if key not in local["dentries"]:
                self._put("dentries", key, theirs)
                continue
            mine = self._row("main", "dentries", key)
            if theirs is None or (mine is not None and mine[3] == theirs[3]):
                continue  # removed there, changed here (or the same change): ours
            if mine is not None:  # the same name given to two things: the first keeps it
                self._place(_int(mine[3]), _int(key[0]), _bytes(key[1]), now, out)
            self._put("dentries", key, theirs)
        for ino, copy in copies.items():
            row = self.md.db.execute(
                "SELECT parent, name FROM main.dentries WHERE inode=? ORDER BY parent, name",
                (ino,),
            ).fetchone()
            parent, name = (int(row[0]), bytes(row[1])) if row else (ROOT_INODE, b"file")
            self._place(copy, parent, name, now, out)
            log.warning("a file changed on this device and another: kept both (conflict copy)")
