"""What other devices changed that the kernel may still hold in its caches, until told."""

from __future__ import annotations

import trio

from encfs_cloud.tree.metadata import Metadata

Entry = tuple[int, bytes]


class StaleCaches:
    """Collects inodes and names to invalidate; `operations` tells the kernel in batches."""

    def __init__(self, md: Metadata) -> None:
        self.md = md
        self._inodes: set[int] = set()
        self._entries: set[Entry] = set()
        self._ready = trio.Event()

    def note(self, inodes: set[int], entries: set[Entry], known: set[int]) -> None:
        """Queue what may be stale among what the kernel knows (`known`: it holds a lookup).

        Directories whose entries changed are invalidated too, so a cached listing goes.
        """
        entries = set(entries)
        for ino in inodes & known:
            # With the writeback cache the kernel never takes a regular file's size from us
            # while it holds the inode: dropping every name of it lets the kernel evict the
            # inode (unless open), so the next lookup sees the new size.
            entries |= {
                (int(p), bytes(n))
                for p, n in self.md.db.execute(
                    "SELECT parent, name FROM main.dentries WHERE inode=?", (ino,)
                )
            }
        self._entries |= {(p, n) for p, n in entries if p in known}
        self._inodes |= {i for i in inodes if i in known}
        self._inodes |= {p for p, _ in entries if p in known}
        self._ready.set()

    async def next_batch(self) -> tuple[set[int], set[Entry]]:
        await self._ready.wait()
        self._ready = trio.Event()
        inodes, self._inodes = self._inodes, set()
        entries, self._entries = self._entries, set()
        return inodes, entries
