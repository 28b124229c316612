"""The merge base as an undo log: the durable head's rows only where the live tree differs."""

from __future__ import annotations

import sqlite3

from encfs_cloud.tree.metadata import TABLE_KEYS
from encfs_cloud.tree.upgrade import upgrade_schema

Key = tuple[object, ...]


class MergeBase:
    """`base` (the newest durable commit's tree) = the live tree `main`, except for the rows
    changed since: for those, their before-images.

    A full second copy of the tree doubled the daemon's memory and its mount time on a large
    tree (1,000,000 files: 150 → 390 MiB). Temp triggers on the live tables record a row's
    before-image the first time it changes (INSERT OR IGNORE keeps the oldest), so between
    commits this costs the changed rows only. A full copy is made only while another device's
    commit is being merged (`materialize`). Everything lives in the connection's temp schema,
    which the metadata keeps in memory (never on disk).
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        # An INSERT OR REPLACE that removes a row through another unique index (a dentry's id)
        # fires the delete trigger only with recursive triggers on.
        db.execute("PRAGMA recursive_triggers=ON")
        self.columns = {
            t: [str(r[1]) for r in db.execute(f"PRAGMA main.table_info({t})")] for t in TABLE_KEYS
        }
        for table, keys in TABLE_KEYS.items():
            cols = self.columns[table]
            db.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS undo_{table}(present INT NOT NULL, "
                f"{','.join(cols)}, PRIMARY KEY({','.join(keys)})) WITHOUT ROWID"
            )
            match = " AND ".join(f"u.{k}=m.{k}" for k in keys)
            db.execute(
                f"CREATE TEMP VIEW IF NOT EXISTS base_{table} AS "
                f"SELECT {','.join(cols)} FROM main.{table} m WHERE NOT EXISTS "
                f"(SELECT 1 FROM temp.undo_{table} u WHERE {match}) "
                f"UNION ALL SELECT {','.join(cols)} FROM temp.undo_{table} WHERE present=1"
            )
        self.arm()

    @staticmethod
    def source(table: str) -> str:
        """What to write in SQL for the base's `table` (a view: main with the undo applied)."""
        return f"temp.base_{table}"

    def load_main(self, body: bytes) -> None:
        """main := the snapshot `body`, base := main."""
        # Temp triggers on tables that a deserialize replaces crash SQLite (3.40) when next
        # touched, so they go first and come back after.
        self._disarm()
        self.db.deserialize(body)
        upgrade_schema(self.db)  # another device's snapshot may be of an earlier version
        self.arm()
        self.reset()

    def _disarm(self) -> None:
        for table in TABLE_KEYS:
            for event in ("insert", "update", "update_key", "delete"):
                self.db.execute(f"DROP TRIGGER IF EXISTS temp.undo_{table}_{event}")

    def arm(self) -> None:
        """Create the triggers that record before-images."""
        for table, keys in TABLE_KEYS.items():
            for name, (when, body) in _trigger_bodies(table, keys, self.columns[table]).items():
                event = name.split("_")[0]
                self.db.execute(
                    f"CREATE TEMP TRIGGER undo_{table}_{name.lower()} "
                    f"BEFORE {event} ON main.{table} {when} BEGIN {body} END"
                )

    # --- reading ----------------------------------------------------------------------------

    def row(self, table: str, key: Key) -> tuple[object, ...] | None:
        where = " AND ".join(f"{k}=?" for k in TABLE_KEYS[table])
        cols = ",".join(self.columns[table])
        found = self.db.execute(
            f"SELECT present,{cols} FROM temp.undo_{table} WHERE {where}", key
        ).fetchone()
        if found is None:
            found = self.db.execute(f"SELECT 1,{cols} FROM main.{table} WHERE {where}", key)
            found = found.fetchone()
            if found is None:
                return None
        return tuple(found[1:]) if found[0] else None

    def keys(self, table: str) -> set[Key]:
        """Every key where main may differ from base."""
        cols = ",".join(TABLE_KEYS[table])
        return {tuple(r) for r in self.db.execute(f"SELECT {cols} FROM temp.undo_{table}")}

    def materialize(self, schema: str) -> None:
        """Copy base whole into the attached database `schema` (for a merge)."""
        db = self.db
        db.deserialize(db.serialize(), name=schema)
        for table, keys in TABLE_KEYS.items():
            cols, kcols = ",".join(self.columns[table]), ",".join(keys)
            db.execute(
                f"DELETE FROM {schema}.{table} WHERE ({kcols}) IN "
                f"(SELECT {kcols} FROM temp.undo_{table})"
            )
            db.execute(
                f"INSERT INTO {schema}.{table}({cols}) "
                f"SELECT {cols} FROM temp.undo_{table} WHERE present=1"
            )

    # --- moving base ------------------------------------------------------------------------

    def reset(self) -> None:
        """base := main."""
        for table in TABLE_KEYS:
            self.db.execute(f"DELETE FROM temp.undo_{table}")

    def advance_by_delta(self, schema: str) -> None:
        """base := base + the delta attached as `schema` (written rows and deletions)."""
        db = self.db
        for table, keys in TABLE_KEYS.items():
            cols, kcols = ",".join(self.columns[table]), ",".join(keys)
            db.execute(
                f"INSERT OR REPLACE INTO temp.undo_{table}(present,{cols}) "
                f"SELECT 1,{cols} FROM {schema}.{table}"
            )
            db.execute(
                f"INSERT OR REPLACE INTO temp.undo_{table}(present,{kcols}) "
                f"SELECT 0,{kcols} FROM {schema}.del_{table}"
            )
        self._normalize()

    def advance_to(self, schema: str, candidates: dict[str, set[Key]]) -> None:
        """base := the tree attached as `schema`, which equals main outside `candidates`."""
        db = self.db
        for table, keys in TABLE_KEYS.items():
            cols = self.columns[table]
            where = " AND ".join(f"{k}=?" for k in keys)
            for key in candidates[table] | self.keys(table):
                found = db.execute(
                    f"SELECT 1,{','.join(cols)} FROM {schema}.{table} WHERE {where}", key
                ).fetchone()
                if found is None:
                    found = (0, *(key[keys.index(c)] if c in keys else None for c in cols))
                db.execute(
                    f"INSERT OR REPLACE INTO temp.undo_{table} "
                    f"VALUES({','.join('?' * (len(cols) + 1))})",
                    tuple(found),
                )
        self._normalize()

    def replace_main(self, body: bytes) -> None:
        """main := the snapshot `body`; base stays where it was."""
        db = self.db
        db.execute("ATTACH DATABASE ':memory:' AS before")
        try:
            self.materialize("before")
            self.load_main(body)
            for table, keys in TABLE_KEYS.items():
                cols, kcols = ",".join(self.columns[table]), ",".join(keys)
                db.execute(
                    f"INSERT INTO temp.undo_{table}(present,{cols}) SELECT 1,* FROM "
                    f"(SELECT {cols} FROM before.{table} EXCEPT SELECT {cols} FROM main.{table})"
                )
                db.execute(
                    f"INSERT OR IGNORE INTO temp.undo_{table}(present,{kcols}) "
                    f"SELECT 0,{kcols} FROM main.{table} WHERE ({kcols}) NOT IN "
                    f"(SELECT {kcols} FROM before.{table})"
                )
        finally:
            db.execute("DETACH DATABASE before")

    def _normalize(self) -> None:
        """Drop undo rows that say what main already holds."""
        for table, keys in TABLE_KEYS.items():
            same = " AND ".join(
                f"m.{c}=u.{c}" if c in keys else f"m.{c} IS u.{c}" for c in self.columns[table]
            )
            at = " AND ".join(f"m.{k}=u.{k}" for k in keys)
            self.db.execute(
                f"DELETE FROM temp.undo_{table} AS u WHERE "
                f"(present=1 AND EXISTS (SELECT 1 FROM main.{table} m WHERE {same})) OR "
                f"(present=0 AND NOT EXISTS (SELECT 1 FROM main.{table} m WHERE {at}))"
            )


def _trigger_bodies(
    table: str, keys: tuple[str, ...], cols: list[str]
) -> dict[str, tuple[str, str]]:
    """Per trigger (named by event), its WHEN clause and the statements that record what a
    key held before its first change."""

    # A guard, not INSERT OR IGNORE: inside a trigger the outer statement's conflict clause
    # wins, and an outer INSERT OR REPLACE would overwrite the oldest image.
    def unseen(side: str) -> str:
        at = " AND ".join(f"{k}={side}.{k}" for k in keys)
        return f"NOT EXISTS (SELECT 1 FROM undo_{table} WHERE {at})"

    names = ",".join(cols)
    record_old = (
        f"INSERT INTO undo_{table}(present,{names}) "
        f"SELECT 1,{','.join(f'OLD.{c}' for c in cols)} WHERE {unseen('OLD')};"
    )
    # Where an insert or update puts a row: the row that key held, or that it held none.
    at_new = " AND ".join(f"m.{k}=NEW.{k}" for k in keys)
    record_new = (
        f"INSERT INTO undo_{table}(present,{names}) "
        f"SELECT 1,{','.join(f'm.{c}' for c in cols)} FROM main.{table} m "
        f"WHERE {at_new} AND {unseen('NEW')}; "
        f"INSERT INTO undo_{table}(present,{','.join(keys)}) "
        f"SELECT 0,{','.join(f'NEW.{k}' for k in keys)} WHERE {unseen('NEW')};"
    )
    # An update that keeps the key (nearly all: keys change only in a rename's dentry) has
    # recorded everything with record_old; record_new runs only when the key moves. Running
    # both on every update cost a third of an untar's metadata time (design.md).
    moved = " OR ".join(f"NEW.{k} IS NOT OLD.{k}" for k in keys)
    return {
        "INSERT": ("", record_new),
        "UPDATE": ("", record_old),
        "UPDATE_KEY": (f"WHEN {moved}", record_new),
        "DELETE": ("", record_old),
    }
