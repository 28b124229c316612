"""An unlocked filesystem in memory: replayed metadata, cache, uploader and FUSE operations."""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext

import trio

from encfs_cloud import layout
from encfs_cloud.daemon import exclusive
from encfs_cloud.daemon.operations import Operations
from encfs_cloud.daemon.options import VolumeOptions
from encfs_cloud.data import spool
from encfs_cloud.data.cache import ChunkCache
from encfs_cloud.data.cachefolders import default_folder, default_size, remember
from encfs_cloud.data.committer import Committer
from encfs_cloud.data.compactor import Compactor
from encfs_cloud.data.diskcache import DiskCache
from encfs_cloud.data.filedata import FileData
from encfs_cloud.data.presence import STALE_AFTER, Presence, Reaper
from encfs_cloud.data.rebase import Rebaser
from encfs_cloud.data.uploader import Uploader
from encfs_cloud.errors import (
    AbortedError,
    DeviceRevokedError,
    EncfsCloudError,
    IntegrityError,
    LeaseHeldError,
    RollbackError,
    StoreError,
)
from encfs_cloud.keys.device import DeviceState, DeviceStore
from encfs_cloud.keys.generations import settle_start
from encfs_cloud.keys.sealed import Sealer, object_generation
from encfs_cloud.keys.vault import Unlocked, refresh
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.budget import budget_left, operation_budget
from encfs_cloud.tree.journal import (
    CommitInfo,
    Head,
    commit_seqs,
    decode_commit,
    replay,
    rollback_problem,
)
from encfs_cloud.tree.merge import Merger
from encfs_cloud.tree.metadata import Metadata
from encfs_cloud.tree.namespace import Namespace
from encfs_cloud.tree.rowsets import Outcome

log = logging.getLogger(__name__)

IO_THREADS = 8
KEY_REFRESH_INTERVAL = 30.0
EXCLUSIVE_CHECK = 30.0
# The unmount's advertisement removal gets at least this long, even when the final flush
# used the whole budget: one small DELETE that saves other mounts the STALE_AFTER wait.
WITHDRAW_FLOOR = 5.0
# An unmount's key check may use this share of what is left of its budget: it is optional
# (a failure is only logged), and the uploads after it must still get time.
KEY_CHECK_SHARE = 0.25
THOROUGH_EVERY = 12  # polls: one in this many also LISTs the commits (a head deleted meanwhile)


class Volume:
    """Everything a mount needs except the kernel: build, run, flush and wipe."""

    def __init__(
        self,
        store: ObjectStore,
        unlocked: Unlocked,
        devices: DeviceStore,
        options: VolumeOptions | None = None,
    ) -> None:
        self.store = store
        self.unlocked = unlocked
        self.devices = devices
        self.options = options or VolumeOptions()
        self.sealer = Sealer(unlocked.fs_id, unlocked.keys)
        self.limiter = trio.CapacityLimiter(IO_THREADS)
        md, head = self._replay()
        self.md = md
        # The merge base is the replayed state: the root made below is a change of ours.
        self.merger = Merger(md, unlocked.device.name)
        for info, body in self._spooled:
            self.merger.adopt_own(info.kind, body)
        Namespace(md).ensure_root(os.getuid(), os.getgid())
        # Dirty and in-flight data also exist sealed in pack buffers while uploading: keep
        # them small enough that RSS stays within cache_size + ~150 MiB.
        dirty_limit = max(8 << 20, min(48 << 20, self.options.cache_size // 4))
        # cache_size bounds all plaintext and ciphertext buffers: clean chunks, dirty and
        # in-flight chunks, and their sealed copies in pack buffers while they upload.
        clean = max(self.options.cache_size - 2 * dirty_limit, 16 << 20)
        self.cache = ChunkCache(clean, dirty_limit)
        self.disk = self._disk_cache()
        self.uploader = Uploader(
            md, self.cache, self.sealer, store, limiter=self.limiter, disk=self.disk
        )
        self.data = FileData(
            md, self.cache, self.sealer, store, self.uploader, self.limiter, self.disk
        )
        self.rebaser = Rebaser(
            self.merger, self.uploader, self.data, store, self.sealer, on_outcome=self._changed
        )
        self.presence = Presence(store, self.sealer)
        self.committer = Committer(
            md,
            self.uploader,
            head,
            on_commit=self._remember_head,
            before_commit=self._refresh_keys,
            sync_timeout=self.options.sync_timeout,
            rebaser=self.rebaser,
            reaper=Reaper(self.presence),
            may_put=None if self.options.read_only else self._may_put,
        )
        self.ops = Operations(md, self.data, self.committer, read_only=self.options.read_only)
        self.data.refresh = self._refresh_for_read
        self.compactor = Compactor(
            md,
            store,
            self.sealer,
            self.limiter,
            uploader=self.uploader,
            stopped=lambda: self.committer.stopped or self.ops.read_only,
            disk=self.disk,
        )
        self._keys_checked = 0.0
        self._unsettled: tuple[int, int] | None = None  # (old generation, newest seq under it)
        self._keys_lock = trio.Lock()  # the commit path and the idle watch both check
        self._exclusive_checked = -EXCLUSIVE_CHECK
        self.stop_deadline: float | None = None  # time.monotonic(): when unmount must end
        self._purge_orphans()

    def _disk_cache(self) -> DiskCache | None:
        opts = self.options
        fs_id = self.unlocked.fs_id
        # Always a folder of our own inside cache_dir, so `wipe` never deletes what the user
        # named (cache_dir=$HOME would otherwise be one typo away).
        folder = opts.cache_dir / fs_id.hex() if opts.cache_dir else default_folder(fs_id)
        if opts.disk_cache_size is None and self.store.url.startswith("file://"):
            # The bucket is a local folder already: a copy of it on local disk only costs a
            # second write of every byte read (a cold read ran at 0.64x; design.md).
            return None
        size = default_size(folder) if opts.disk_cache_size is None else opts.disk_cache_size
        if size <= 0:
            return None
        # Other mounts of this filesystem on this device may share the folder: see SpillFolder.
        disk = DiskCache(folder, size)
        if opts.cache_dir is not None:
            remember(self.devices.folder(fs_id), folder)
        return disk

    def _replay(self) -> tuple[Metadata, Head]:
        """Load the newest state and refuse one older than this device has seen."""
        fs_id = self.unlocked.fs_id
        state = self.devices.load_state(fs_id)
        self._spooled: list[tuple[CommitInfo, bytes]] = []
        if not self.options.read_only:  # a read-only mount writes nothing to the bucket
            folder = self.devices.folder(fs_id)
            mine = spool.commits(folder)
            later = spool.upload(folder, self.store)  # those another writer's commits preceded
            merged = {name for name, _ in later}
            self._settle_spooled([(n, d) for n, d in mine if n not in merged])
            self._spooled = [
                decode_commit(name, self.sealer.open_object(name, "commit", data))
                for name, data in later
            ]
        seqs = commit_seqs(self.store)
        newest = seqs[-1] if seqs else 0
        if self._spooled:  # load the state they build on; they are merged like late commits
            seqs = [s for s in seqs if s < self._spooled[0][0].seq]
        if not seqs:
            if state.commit_seq and not self.options.allow_rollback:
                raise RollbackError(
                    "the bucket holds no metadata but this device has seen commit "
                    f"{state.commit_seq}: "
                    "it was emptied or rolled back; mount with -o allow_rollback to accept"
                )
            return Metadata(), Head(0, b"", 0, 0, 0)
        md, head, hashes = replay(self.store, self.sealer, seqs=seqs)
        if self._spooled and head.hash != self._spooled[0][0].prev_hash:
            raise StoreError(
                f"the spooled commits build on commit {head.seq}, which the bucket no "
                f"longer holds as it was; the spool stays in {self.devices.folder(fs_id)}"
            )
        # With a spool the state loaded is older than the bucket's newest on purpose; the
        # commits after it are applied (chain-checked) by the first catch-up.
        checked = head if not self._spooled else Head(newest, head.hash, 0, 0, 0)
        problem = rollback_problem(checked, hashes, md, state.commit_seq or 0, state.commit_hash)
        if problem and not self.options.allow_rollback:
            raise RollbackError(
                f"{problem}: the bucket was rolled back or forked; mount with "
                "-o allow_rollback to accept its state"
            )
        if not self._spooled:  # the spool's parent is older than what this device has seen
            self._remember_head(head)
        return md, head

    def _settle_spooled(self, mine: list[tuple[str, bytes]]) -> None:
        """Commits this device sealed before a revocation it had not seen, uploaded only now
        from its spool, fall past the new generation's start: move it past them (only a
        holder of the new generation can)."""
        keys = self.unlocked.keys
        late = [
            (seq, gen)
            for seq, gen in ((layout.commit_seq(n), object_generation(d)) for n, d in mine)
            if seq is not None and gen < keys.required_generation(seq)
        ]
        if late:
            old = min(g for _, g in late)
            settle_start(self.store, self.devices, self.unlocked, old, max(s for s, _ in late))

    def _remember_head(self, head: Head) -> None:
        def seen(state: DeviceState) -> None:
            state.commit_seq = head.seq
            state.commit_hash = head.hash

        self.devices.update_state(self.unlocked.fs_id, seen)
        committer = getattr(self, "committer", None)
        if self._spooled and committer is not None and committer.commits:
            # Our first commit after merging the spooled ones is durable: they are in it.
            spool.forget(self.devices.folder(self.unlocked.fs_id))
            self._spooled = []

    async def _refresh_keys(self) -> None:
        """Adopt a key generation another device created (a revocation) before committing.

        Checked at most every KEY_REFRESH_INTERVAL seconds: one small GET. A revoked device
        stops writing.
        """
        async with self._keys_lock:
            await self._refresh_keys_locked()

    async def _refresh_keys_locked(self) -> None:
        now = trio.current_time()
        if now - self._keys_checked < KEY_REFRESH_INTERVAL:
            return
        self._keys_checked = now
        old_gen = self.unlocked.keys.current
        left = budget_left()
        bounded = nullcontext() if left is None else operation_budget(KEY_CHECK_SHARE * left)
        try:
            with bounded:
                changed = await trio.to_thread.run_sync(
                    refresh, self.store, self.devices, self.unlocked, limiter=self.limiter
                )
        except DeviceRevokedError:
            log.error("this device was revoked: the mount is now read-only")
            self.committer.stopped = True
            self.ops.read_only = True
            return
        except StoreError as exc:
            log.warning("could not check for new key generations: %s", exc)
            return
        if changed:
            log.info("now sealing under key generation %d", self.unlocked.keys.current)
            if not self.options.read_only:
                c = self.committer
                self._unsettled = (old_gen, c.queue[-1].seq if c.queue else c.head.seq)
        if self._unsettled is not None:
            await self._settle(*self._unsettled)

    async def _settle(self, old_gen: int, written_seq: int) -> None:
        """Move the new generation's start past what this mount sealed before adopting it."""
        try:
            await trio.to_thread.run_sync(
                settle_start,
                self.store,
                self.devices,
                self.unlocked,
                old_gen,
                written_seq,
                limiter=self.limiter,
            )
            self._unsettled = None
        except (StoreError, AbortedError, LeaseHeldError, IntegrityError) as exc:
            self._keys_checked = 0.0  # retry at the next commit or check
            log.warning("could not record where the new key generation starts: %s", exc)

    async def _watch_keys(self) -> None:
        """Check for a new generation even while idle, so a start point is settled promptly
        and a revoked mount stops writing."""
        while not self.committer.stopped:
            await trio.sleep(KEY_REFRESH_INTERVAL)
            try:
                await self._refresh_keys()
            except (IntegrityError, RollbackError) as exc:  # the next commit refuses too
                log.error("key check failed: %s", exc)

    def _purge_orphans(self) -> None:
        """Inodes left with no name by a crash while they were open are deleted now."""
        if self.options.read_only:
            return
        try:
            if self.presence.live():  # another mount may still have such a file open
                return
        except StoreError as exc:
            log.warning("could not list live mounts (%s); orphans are kept for now", exc)
            return
        for ino in self.md.orphans():
            self.md.delete_inode(ino)

    async def _refresh_for_read(self) -> None:
        """A read found its object gone: catch up (unless a commit or merge runs now: then
        the reader gets EIO rather than waiting on, or re-entering, the committer)."""
        if not self.committer.busy:
            await self.committer.follow(thorough=True)

    def _may_put(self) -> None:
        # An exclusive operation refuses to start while mounts advertise themselves, so
        # only a mount silent for minutes (suspended) can meet one: checking at most every
        # EXCLUSIVE_CHECK seconds catches that case at its first commit after waking.
        now = time.monotonic()
        if now - self._exclusive_checked >= EXCLUSIVE_CHECK:
            exclusive.check_before_commit(self.store, self.sealer, takeover=self.options.takeover)
            self._exclusive_checked = now

    def _changed(self, outcome: Outcome) -> None:
        self.ops.changed_elsewhere(outcome.inodes, outcome.entries)

    async def _publish(self) -> None:
        seq = self.committer.head.seq
        if self.presence.due(seq):
            await trio.to_thread.run_sync(self.presence.publish, seq, limiter=self.limiter)

    async def follow(self) -> None:
        """Apply other devices' commits every poll_interval: one GET of the next commit per
        poll (a LIST too every THOROUGH_EVERY polls), and keep our `mounts/` object fresh."""
        polls = 0
        while True:
            await trio.sleep(self.options.poll_interval)
            polls += 1
            try:
                await self.committer.follow(thorough=polls % THOROUGH_EVERY == 0)
            except StoreError as exc:
                log.warning("could not look for other devices' commits: %s", exc)
            except EncfsCloudError as exc:  # a commit that does not authenticate or chain
                log.error("another device's commit was refused: %s", exc)
            except Exception:  # a bug: logged with its traceback, the mount stays up
                log.exception("applying other devices' commits failed")
            try:
                await self._publish()
            except StoreError as exc:  # e.g. read-only credentials: say it once a while
                if polls % (THOROUGH_EVERY * 10) == 1:
                    log.warning("could not advertise this mount in the bucket: %s", exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._publish()
        except StoreError as exc:
            log.warning("could not advertise this mount in the bucket: %s", exc)
        try:
            async with trio.open_nursery() as nursery:
                self.data.nursery = nursery
                await nursery.start(self.uploader.run)
                nursery.start_soon(self.committer.run, self.options.commit_interval)
                nursery.start_soon(self.follow)
                nursery.start_soon(self.ops.run_invalidations)
                if not self.options.read_only:
                    nursery.start_soon(self._watch_keys)
                    nursery.start_soon(self.compactor.run)
                task_status.started()
        finally:
            # Stopped (after the final flush): nothing of ours needs the bucket's old objects.
            # Blocking on purpose: we may be cancelled, and this is one small DELETE.
            self.withdraw()
            if self.disk is not None:  # queued entries and the use order survive the remount
                with trio.CancelScope(shield=True):  # we are being cancelled: finish this
                    await trio.to_thread.run_sync(self.disk.close)

    async def flush(self) -> None:
        """Everything into the bucket (fsync of the whole filesystem)."""
        if not self.options.read_only:
            await self.committer.sync()

    def spool(self) -> int:
        """Keep what could not be uploaded, sealed, in this device's spool; returns its size."""
        objects = self.committer.spool_contents()
        if objects:
            spool.save(self.devices.folder(self.unlocked.fs_id), objects)
        return sum(len(data) for _, data in objects)

    def withdraw(self) -> None:
        """Remove this mount's `mounts/` object (at unmount): it needs nothing any more.

        Within what is left of the unmount's budget (at least WITHDRAW_FLOOR): in an outage
        the object stays, and other mounts take it for gone once it is STALE_AFTER old.
        """
        if self.presence.published < 0:
            return
        end = self.stop_deadline
        left = self.options.sync_timeout if end is None else end - time.monotonic()
        try:
            with operation_budget(max(left, WITHDRAW_FLOOR)):
                self.presence.withdraw()
        except StoreError as exc:
            log.warning(
                "could not remove this mount's advertisement %s (%s); other mounts take it "
                "for gone %d minutes after its last renewal (fsck --repair and re-encryption "
                "wait as long, or take --takeover)",
                self.presence.name,
                exc,
                STALE_AFTER // 60,
            )

    def wipe(self) -> None:
        """Drop all plaintext and key material held in memory."""
        self.cache.clear()
        self.unlocked.wipe()
        self.md.db.close()
