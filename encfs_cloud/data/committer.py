"""Ordered metadata commits: group commit, a queue that survives store outages, the spool."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio

from encfs_cloud import layout
from encfs_cloud.data.presence import Reaper
from encfs_cloud.data.rebase import Rebaser
from encfs_cloud.data.uploader import Pack, Uploader
from encfs_cloud.errors import PreconditionFailedError, StoreError
from encfs_cloud.tree.journal import (
    KIND_DELTA,
    KIND_SNAPSHOT,
    CommitInfo,
    Head,
    commit_hash,
    export_delta,
    export_snapshot,
    seal_commit,
)
from encfs_cloud.tree.metadata import Metadata

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_DELTAS = 256
SNAPSHOT_MIN_DELTA_BYTES = 8 << 20
# Deltas may add up to this fraction of the tree's in-memory size before a snapshot replaces
# them: a fixed 8 MiB made a 10,000,000-file mount upload its 480 MiB snapshot after every
# 8 MiB of changes (design.md, "10,000,000 files").
SNAPSHOT_DELTA_FRACTION = 1 / 16


def snapshot_due(tail: Head, tree_bytes: int) -> bool:
    """Is the next commit a snapshot? (Replay at mount stays bounded either way.)"""
    return (
        tail.seq == 0
        or tail.deltas_since_snapshot >= SNAPSHOT_EVERY_DELTAS
        or tail.delta_bytes_since_snapshot
        > max(SNAPSHOT_MIN_DELTA_BYTES, int(tree_bytes * SNAPSHOT_DELTA_FRACTION))
    )


LIST_EVERY = 60.0  # seconds: a commit LISTs meta/ at most this often (see _catch_up)
# A sync gives up (the changes stay queued for the next try) only after losing this many commit
# races in a row AND sync_timeout: a fixed count alone starved the slowest of three writers
# committing in a loop (make bench, two-writer column).
REBASE_ATTEMPTS = 16
REBASE_BACKOFF_CAP = 1.0  # seconds: the random pause after a lost race grows to at most this


@dataclass
class SealedCommit:
    """A commit sealed but maybe not yet in the bucket, with what it waits for."""

    seq: int
    sealed: bytes
    waiting: list[Pack]  # packs it references that were still uploading when it was made
    dead: list[str]  # packs it no longer references: deletable once it is durable
    head: Head  # the head once it is durable
    time_ns: int
    kind: str
    body: bytes  # the plaintext delta or snapshot: the merge base moves by it once durable


class Committer:
    """Turns metadata changes into a hash chain of sealed commits, in order.

    A commit is exported and sealed at once (so it describes one instant), then queued; the
    queue is written in order once the packs each commit references have landed. If the
    store is down, the queue just grows and is retried: an exported change is never lost,
    and at unmount the queue can go to the local spool.
    """

    def __init__(
        self,
        md: Metadata,
        uploader: Uploader,
        head: Head,
        *,
        on_commit: Callable[[Head], None],
        before_commit: Callable[[], Awaitable[None]] | None = None,
        sync_timeout: float = 120.0,
        rebaser: Rebaser | None = None,
        reaper: Reaper | None = None,
        may_put: Callable[[], None] | None = None,
    ) -> None:
        self.md = md
        self.rebaser = rebaser  # set when other writers may commit too: lost races rebase
        self.reaper = reaper  # set when other mounts may still read what our commits free
        # Raises a StoreError while an exclusive operation holds the filesystem (blocking).
        self.may_put = may_put
        self.uploader = uploader
        self.head = head  # the newest commit known to be in the bucket
        self.on_commit = on_commit
        self.before_commit = before_commit
        self.sync_timeout = sync_timeout
        self.queue: list[SealedCommit] = []
        self._lock = trio.Lock()
        self._started = 0
        self._done_index = 0
        self.commits = 0
        self.last_commit_ns = 0
        self.errors = 0
        self.stopped = False  # set when writing must stop (lease lost, device revoked)
        self._cleanups = 0  # background deletions of freed packs and old commits running
        self._cleanups_idle = trio.Event()
        self._listed = -LIST_EVERY  # when meta/ was last listed (trio clock)

    def has_changes(self) -> bool:
        up = self.uploader
        return bool(up.cache.dirty) or any(self.md.dirty.values()) or up.open_pack is not None

    async def sync(self) -> None:
        """Return once everything changed before this call is in the bucket (group commit)."""
        ticket = self._started
        async with self._lock:
            if self._done_index > ticket:
                return  # a commit that began after our call has finished
            self._started += 1
            index = self._started
            if self.before_commit is not None:
                await self.before_commit()
            if self.stopped:
                raise StoreError("this mount may no longer write to the bucket")
            if self.rebaser is not None and self.has_changes():
                # Catch up first: fewer lost races, and never a commit after a deleted head.
                # Unreachable: seal anyway, so the queue (and the spool) keep the changes.
                with contextlib.suppress(StoreError):
                    await self._catch_up(thorough=trio.current_time() > self._listed + LIST_EVERY)
            if self.has_changes():
                self.queue.append(await self._seal_next())
            await self._drain_rebasing()
            await self.uploader.wait_packs(list(self.uploader.pending.values()), self.sync_timeout)
            await self._reap()
            self._done_index = index

    async def seal_for_spool(self) -> None:
        """Seal what changed since the last commit into the queue, uploading nothing.

        For the unmount of a mount that may no longer write (its lease was taken, maybe on a
        replayed old lease): acknowledged changes go to the spool instead of vanishing.
        """
        async with self._lock:
            if self.has_changes():
                self.queue.append(await self._seal_next())

    async def _seal_next(self) -> SealedCommit:
        up = self.uploader
        # From here to the export nothing awaits, so the exported rows describe one instant
        # and reference only packs that are in the bucket or uploading.
        up.flush_dirty()
        up.close_pack()
        waiting = list(up.pending.values())
        tail = self.queue[-1].head if self.queue else self.head
        if tail.seq:
            # The chain's history travels inside the tree, so a device can check the commit
            # it saw last even after snapshots deleted that commit object.
            self.md.record_commit(tail.seq, tail.hash)
        # A tree rebuilt from an earlier version's schema is written whole at once, so
        # later mounts need not rebuild it again (tree/upgrade.py).
        snapshot = snapshot_due(tail, self.md.size_bytes()) or self.md.upgraded
        seq = tail.seq + 1
        if self.rebaser is not None:  # the export clears md.dirty; the merger keeps the keys
            self.rebaser.merger.note_local()
        body = export_snapshot(self.md) if snapshot else export_delta(self.md)
        info = CommitInfo(
            seq=seq,
            kind=KIND_SNAPSHOT if snapshot else KIND_DELTA,
            prev_hash=tail.hash,
            snapshot_seq=seq if snapshot else tail.snapshot_seq,
            time_ns=time.time_ns(),
        )
        # Packs dead at this instant are unreferenced by this commit; once it is durable
        # their objects can go. (A dead pack never comes back: only the open pack gains chunks.)
        dead = up.dead_packs()
        sealed = await trio.to_thread.run_sync(
            seal_commit, up.sealer, info, body, limiter=up.limiter
        )
        digest = commit_hash(sealed)
        if snapshot:
            head = Head(seq, digest, seq, 0, 0)
        else:
            head = Head(
                seq,
                digest,
                tail.snapshot_seq,
                tail.deltas_since_snapshot + 1,
                tail.delta_bytes_since_snapshot + len(sealed),
            )
        return SealedCommit(seq, sealed, waiting, dead, head, info.time_ns, info.kind, body)

    async def _drain_rebasing(self) -> None:
        """Drain; each time another writer took our sequence number, catch up and re-seal.

        After a lost race it waits a random while that grows with each loss (as optimistic
        commits on object stores do): writers that collided spread out instead of colliding
        again, and the one that keeps losing still gets its turn."""
        deadline = trio.current_time() + self.sync_timeout
        lost = 0
        while True:
            try:
                await self._drain()
                return
            except PreconditionFailedError:
                if self.rebaser is None:
                    raise
            lost += 1
            if lost >= REBASE_ATTEMPTS and trio.current_time() >= deadline:
                raise StoreError("other writers kept committing first; changes stay queued")
            await trio.sleep(random.uniform(0, min(REBASE_BACKOFF_CAP, 0.01 * 2 ** min(lost, 7))))
            await self._catch_up(thorough=True)
            if self.has_changes():
                self.queue.append(await self._seal_next())

    async def reap_leaving(self) -> int:
        """At unmount, after the final commit: delete what waits if no other mount is live
        (it would wait for the grace, and this mount forgets it when it exits). Returns how
        many objects still wait (for other live mounts)."""
        async with self._lock:
            await self._reap(leaving=True)
        return len(self.reaper.waiting) if self.reaper is not None else 0

    async def _reap(self, *, leaving: bool = False) -> None:
        """Delete freed packs every live mount is past; the next commit forgets them."""
        if self.reaper is None or not self.reaper.waiting:
            return
        dead = {layout.pack_name(p) for p in self.uploader.dead_packs()}

        def still_dead(name: str) -> bool:  # commits are always; packs unless revived
            return name in dead or not name.startswith(layout.DATA_PREFIX)

        names = await trio.to_thread.run_sync(
            partial(self.reaper.ready, still_dead, leaving=leaving), limiter=self.uploader.limiter
        )
        if names:
            await self.uploader.delete_objects(names)
            self.md.forget_packs(
                [n[len(layout.DATA_PREFIX) :] for n in names if n.startswith(layout.DATA_PREFIX)]
            )

    @property
    def busy(self) -> bool:
        """A commit or a catch-up is under way."""
        return self._lock.locked()

    async def follow(self, *, thorough: bool = False) -> int:
        """Apply the commits other writers made since our head; returns how many."""
        async with self._lock:
            return await self._catch_up(thorough=thorough)

    async def _catch_up(self, *, thorough: bool = False) -> int:
        """One GET per step; `thorough` adds a LIST, which notices a head already deleted."""
        assert self.rebaser is not None
        applied = 0
        while True:
            found = await self.rebaser.fetch(self.head)
            if found is None and thorough:
                # Only a mount silent for longer than others wait (10 min) can find its next
                # commit deleted, so this LIST is needed rarely, not before every commit.
                self._listed = trio.current_time()
                found = await self.rebaser.jump(self.head)
            if found is None:
                return applied
            if self.queue and found.sealed == self.queue[0].sealed:
                self._landed(self.queue.pop(0))  # ours: the reply to its PUT was lost
                continue
            # Queued commits are re-made after the merge: what they carried is still where
            # the live tree differs from the merge base.
            local = bool(self.queue) or self.has_changes()
            self.queue.clear()
            await self.rebaser.apply(found, local_changes=local)
            self.head = found.head
            self.on_commit(found.head)
            applied += 1

    async def _drain(self) -> None:
        """Write queued commits in order; stops (raising) at the first that cannot go."""
        while self.queue:
            commit = self.queue[0]
            await self.uploader.wait_packs(commit.waiting, self.sync_timeout)
            await self._put(commit)
            self._landed(self.queue.pop(0))

    def _landed(self, commit: SealedCommit) -> None:
        """`commit` is in the bucket: the head, the merge base and pack clean-up follow."""
        self.head = commit.head
        if self.rebaser is not None:
            self.rebaser.merger.own_commit_durable(commit.kind, commit.body)
            if not self.queue:
                self.rebaser.merger.all_local_durable()
        self.commits += 1
        self.last_commit_ns = commit.time_ns
        self.on_commit(commit.head)
        if commit.dead and self.reaper is not None:
            self.reaper.schedule(commit.seq, [layout.pack_name(p) for p in commit.dead])
        elif commit.dead:
            self.md.forget_packs(commit.dead)
            names = [layout.pack_name(p) for p in commit.dead]
            self._start(self.uploader.delete_objects, names)
        if commit.head.snapshot_seq == commit.seq:
            self._start(self._drop_commits_before, commit.seq)

    async def _put(self, commit: SealedCommit) -> None:
        name = layout.commit_name(commit.seq)
        deadline = trio.current_time() + self.sync_timeout
        delay = 0.5
        up = self.uploader
        while True:
            try:
                if self.may_put is not None:
                    await trio.to_thread.run_sync(self.may_put, limiter=up.limiter)
                await trio.to_thread.run_sync(
                    lambda: up.store.put(name, commit.sealed, if_none_match=True),
                    limiter=up.limiter,
                    # On cancel (unmount) the commit stays queued and is spooled; should
                    # it land anyway, its upload from the spool meets its own bytes.
                    abandon_on_cancel=True,
                )
                return
            except PreconditionFailedError:
                # Someone else wrote this seq: never overwrite it. With a rebaser we catch up
                # and commit again; without one (a lost lease) this mount stops writing.
                if self.rebaser is None:
                    self.stopped = True
                    log.error("commit %s exists: another writer; this mount stops writing", name)
                raise
            except StoreError as exc:
                self.errors += 1
                if trio.current_time() + delay > deadline:
                    raise
                log.warning("commit %s failed (%s); retrying", name, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _start(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        if self.uploader.nursery is not None:
            self._cleanups += 1
            self.uploader.nursery.start_soon(self._tracked, fn, *args)

    async def _tracked(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await fn(*args)
        finally:
            self._cleanups -= 1
            if not self._cleanups:
                self._cleanups_idle.set()
                self._cleanups_idle = trio.Event()

    async def cleanups_done(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) for the deletions commits started; True if all ended.

        The unmount waits here before it releases the lease: deletions go through the
        lease's fence, so after the release they would fail and the packs would linger.
        """
        with trio.move_on_after(timeout):
            while self._cleanups:
                await self._cleanups_idle.wait()
        return not self._cleanups

    async def _drop_commits_before(self, seq: int) -> None:
        up = self.uploader
        try:
            names = await trio.to_thread.run_sync(
                lambda: [o.name for o in up.store.list(layout.META_PREFIX)], limiter=up.limiter
            )
        except StoreError as exc:  # clean-up only: fsck or the next snapshot collects them
            log.warning("could not list old commits to delete (%s)", exc)
            return
        old = [n for n in names if (layout.commit_seq(n) or seq) < seq]
        if self.reaper is not None:  # other mounts may not have read them yet
            self.reaper.schedule(seq, old)
            return
        await up.delete_objects(old)

    def spool_contents(self) -> list[tuple[str, bytes | bytearray]]:
        """Everything not yet in the bucket, sealed, in upload order: packs, then commits."""
        objects: list[tuple[str, bytes | bytearray]] = list(self.uploader.spool_packs())
        objects += [(layout.commit_name(c.seq), c.sealed) for c in self.queue]
        return objects

    async def run(self, interval: float) -> None:
        """Commit every `interval` seconds while anything changed."""
        while True:
            await trio.sleep(interval)
            if self.stopped or not (self.has_changes() or self.queue):
                if not self.stopped and self.reaper is not None and self.reaper.due():
                    # Idle, yet freed objects are ready: a mount that compacted and then saw
                    # no change would otherwise keep the emptied packs until its next commit.
                    async with self._lock:
                        await self._reap()
                continue
            try:
                await self.sync()
            except StoreError as exc:
                log.warning("periodic commit failed: %s", exc)
