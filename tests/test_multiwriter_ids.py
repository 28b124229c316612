"""Identifiers allocated by two devices from the same state never collide."""

from __future__ import annotations

import stat

from encfs_cloud.tree import journal
from encfs_cloud.tree.metadata import ID_BITS, ROOT_INODE, Metadata
from encfs_cloud.tree.namespace import Namespace


def _device_copy(md: Metadata) -> Metadata:
    return journal.load_snapshot(journal.export_snapshot(md))


def test_two_devices_from_one_state_pick_disjoint_inodes_and_entry_ids() -> None:
    base = Metadata()
    Namespace(base).ensure_root(0, 0)
    laptop, desktop = _device_copy(base), _device_copy(base)
    made: list[set[int]] = []
    entries: list[set[int]] = []
    for md in (laptop, desktop):
        ns = Namespace(md)
        for n in range(500):
            ns.create(ROOT_INODE, f"f{n}".encode(), stat.S_IFREG | 0o644, 0, 0)
        made.append({r[0] for r in md.db.execute("SELECT id FROM inodes WHERE id<>1")})
        entries.append({r[0] for r in md.db.execute("SELECT id FROM dentries")})
    assert len(made[0]) == len(made[1]) == 500
    assert not made[0] & made[1]
    assert not entries[0] & entries[1]
    # readdir offsets are entry id + 2 and must fit a signed 64-bit off_t.
    assert max(entries[0] | entries[1]) + 2 < 1 << 63
    assert max(made[0] | made[1]) < 1 << ID_BITS
    assert min(made[0] | made[1]) > ROOT_INODE
