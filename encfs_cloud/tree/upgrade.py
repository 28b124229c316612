"""Trees written by earlier versions rebuilt in today's schema when they are loaded."""

from __future__ import annotations

import sqlite3

from encfs_cloud.tree.metadata import SCHEMA


def upgrade_schema(db: sqlite3.Connection) -> bool:
    """Rebuild a tree of an earlier version in today's schema; True if it had to.

    Until 2026-12-03 entries were a rowid table (id INTEGER PRIMARY KEY) with a second index
    on (parent, id) for readdir; keyed on (parent, id) the table is that index (design.md,
    "What several writers cost at scale"). Deltas need nothing: their rows are read by
    column order, which did not change.
    """
    found = db.execute("SELECT sql FROM main.sqlite_master WHERE name='dentries'").fetchone()
    if found is None or "WITHOUT ROWID" in str(found[0]).upper():
        return False
    (table,) = (
        s for s in SCHEMA.format(s="main.").split(";") if "TABLE IF NOT EXISTS main.dentries(" in s
    )
    db.execute(table.replace("dentries(", "dentries_new(", 1))
    # In key order through the old (parent, id) index: the new table is appended to, not
    # split at random places, so its pages end full.
    db.execute(
        "INSERT INTO main.dentries_new SELECT id, parent, name, inode FROM main.dentries "
        "ORDER BY parent, id"
    )
    db.execute("DROP TABLE main.dentries")  # with both of its indexes
    # Legacy mode renames the table only: the merge base's temp views name main.dentries
    # already, and the modern rename would refuse them while that table is missing.
    db.execute("PRAGMA legacy_alter_table=ON")
    try:
        db.execute("ALTER TABLE main.dentries_new RENAME TO dentries")
    finally:
        db.execute("PRAGMA legacy_alter_table=OFF")
    db.executescript(SCHEMA.format(s="main."))
    return True
