"""Catching up with other writers: apply their commits, rebasing this mount's changes on top."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from encfs_cloud.data.filedata import FileData
from encfs_cloud.data.uploader import Uploader
from encfs_cloud.errors import StoreError
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree.follow import NextCommit, jump_commit, next_commit
from encfs_cloud.tree.journal import Head
from encfs_cloud.tree.merge import Merger
from encfs_cloud.tree.metadata import ChunkRef
from encfs_cloud.tree.rowsets import Outcome

log = logging.getLogger(__name__)

PLAN_ATTEMPTS = 8  # local writes racing a conflict copy make us plan again, this often


@dataclass
class Followed:
    """What catching up did: for the kernel's caches and for `status`."""

    commits: int = 0
    outcome: Outcome = field(default_factory=Outcome)


class Rebaser:
    """Reads the commits after the durable head and merges each into the live tree.

    Runs on the trio thread under the committer's lock (nothing commits meanwhile). Local
    changes never need a separate record: they are exactly where the live tree differs from
    the merge base, so the sealed commits still queued can simply be dropped and re-made.
    """

    def __init__(
        self,
        merger: Merger,
        uploader: Uploader,
        data: FileData,
        store: ObjectStore,
        sealer: Sealer,
        *,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.merger = merger
        self.uploader = uploader
        self.data = data
        self.store = store
        self.sealer = sealer
        self.on_outcome = on_outcome
        self.conflicts = 0  # conflict copies made since mount (for `status`)
        self.applied = 0  # other devices' commits applied since mount

    async def fetch(self, head: Head) -> NextCommit | None:
        up = self.uploader
        return await trio.to_thread.run_sync(
            next_commit, self.store, self.sealer, head, limiter=up.limiter
        )

    async def jump(self, head: Head) -> NextCommit | None:
        """Like fetch, but also notices commits already folded into a newer snapshot."""
        up = self.uploader
        return await trio.to_thread.run_sync(
            jump_commit, self.store, self.sealer, head, limiter=up.limiter
        )

    async def apply(self, commit: NextCommit, *, local_changes: bool = True) -> Outcome:
        """Merge one commit of another device into the live tree (base moves to it)."""
        merger, up = self.merger, self.uploader
        if not local_changes:
            # Nothing of ours to keep: apply it as replay would, in time linear in the delta.
            outcome = merger.fast_forward(commit.info.kind, commit.body)
            self._unpin_replaced()
            self.applied += 1
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            return outcome
        merger.stage_remote(commit.info.kind, commit.body)
        try:
            for _ in range(PLAN_ATTEMPTS):
                # Every local change goes into chunk rows first, so the merge sees it.
                up.flush_dirty()
                plan = merger.plan()
                contents = await self._local_contents(plan.copies)
                revived = await self._local_contents(plan.reseal)
                up.flush_dirty()
                # From here to the end nothing awaits: the merge and the copies are atomic
                # for FUSE requests.
                result = merger.merge(plan)
                if result is None:
                    continue
                outcome, copies = result
                for old, new in copies.items():
                    for idx, data in contents[old]:
                        self.data.cache.put_inflight((new, idx), data)
                        up.add_chunk((new, idx), data)
                for ino, chunks in revived.items():
                    for idx, data in chunks:
                        self.data.cache.put_inflight((ino, idx), data)
                        up.add_chunk((ino, idx), data)
                merger.finish_remote()
                self._unpin_replaced()
                break
            else:
                # Retried at the next poll or commit; never a crash of the mount.
                raise StoreError("local writes kept changing a file in conflict; retrying later")
        except BaseException:
            if merger.staged:
                merger.drop_remote()
            raise
        self.applied += 1
        self.conflicts += len(outcome.conflicts)
        for parent, _ in outcome.conflicts:
            log.warning(
                "conflict: a file in directory inode %d changed here and on another device; "
                "this device's version was kept as a conflict copy",
                parent,
            )
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    def _unpin_replaced(self) -> None:
        """In-flight chunks are served by (inode, index): those whose row the merge pointed
        at another version must not be served any more (they would be our older version)."""
        up = self.uploader
        packs = [*up.pending.values(), *([up.open_pack] if up.open_pack else [])]
        for pack in packs:
            for key, version, data in pack.entries:
                ref = self.merger.md.get_chunk(*key)
                if ref is None or ref.version != version:
                    self.data.cache.unpin(key, data)

    async def _local_contents(
        self, wanted: dict[int, list[tuple[int, ChunkRef]]]
    ) -> dict[int, list[tuple[int, bytes]]]:
        """The plaintext of this mount's version of the chunks listed."""
        found: dict[int, list[tuple[int, bytes]]] = {}
        for ino, chunks in wanted.items():
            found[ino] = []
            for idx, _ in chunks:
                data = await self.data.chunk(ino, idx)
                if data is not None:
                    found[ino].append((idx, bytes(data)))
        return found
