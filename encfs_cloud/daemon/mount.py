"""Mount lifecycle: unlock, daemonize, serve FUSE, flush on unmount, wipe keys."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import time
from pathlib import Path

import pyfuse3
import trio

from encfs_cloud import layout
from encfs_cloud.daemon import control, exclusive, logs, runtime
from encfs_cloud.daemon.health import WatchedStore
from encfs_cloud.daemon.options import MountRequest
from encfs_cloud.daemon.volume import Volume
from encfs_cloud.data import spool
from encfs_cloud.errors import (
    ChangesSpooledError,
    EncfsCloudError,
    MountpointError,
    StoreError,
)
from encfs_cloud.keys.connection import remember_connection
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.keys.storefit import OPT_OUT_MOUNT, check_writable
from encfs_cloud.keys.vault import unlock
from encfs_cloud.store import open_store
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.budget import abort_in_flight, operation_budget, set_wait_reporter

log = logging.getLogger(__name__)

# The kernel reads ahead 128 KiB on a FUSE mount, so a sequential read arrives as one FUSE
# request per 128 KiB, and pyfuse3's dispatch costs more than our handler. One chunk per
# request cuts the requests eightfold (measured: 997 -> 97 reads for 128 MiB).
READ_AHEAD_KB = layout.CHUNK_SIZE >> 10


def check_mountpoint(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise MountpointError(f"mount point {path} does not exist; create it with mkdir") from None
    if not stat.S_ISDIR(info.st_mode):
        raise MountpointError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise MountpointError(f"{path} is already a mount point; unmount it first")
    if any(path.iterdir()):
        raise MountpointError(f"mount point {path} is not empty; use an empty directory")


def prepare(request: MountRequest) -> Volume:
    """Open the store, unlock the keys, check no exclusive operation runs, replay (blocking)."""
    # Watched from the start: `status` then tells whether the store answers.
    store: ObjectStore = WatchedStore(open_store(request.source, request.store_options))
    devices = DeviceStore()
    unlocked = unlock(store, devices, request.passphrase)
    try:
        remember_connection(devices, unlocked.fs_id, request.source, request.store_options)
        sealer = Sealer(unlocked.fs_id, unlocked.keys)
        if not request.volume_options.read_only:
            # Probed at this device's first read-write mount, then remembered.
            check_writable(
                store,
                devices,
                unlocked.fs_id,
                unsafe=request.unsafe_no_conditional_writes,
                doing="mount read-write",
                opt_out=OPT_OUT_MOUNT,
            )
            # Several mounts write at once (they merge); only an exclusive operation
            # (fsck --repair, re-encryption) holding the lease keeps a writer out.
            exclusive.refuse_if_held(store, sealer, takeover=request.volume_options.takeover)
        return Volume(store, unlocked, devices, request.volume_options)
    except BaseException:
        unlocked.wipe()
        raise


def fuse_options(request: MountRequest) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={request.source}", "subtype=encfs-cloud", "noatime"}
    if request.volume_options.read_only:
        opts.add("ro")
    if request.allow_other:
        opts.add("allow_other")
    opts.update(request.fuse_options)
    return opts


def _mountinfo_path(path: Path) -> str:
    """A path as /proc/self/mountinfo writes it (octal escapes for space, tab, newline, \\)."""
    out = str(path)
    for char in "\\ \t\n":
        out = out.replace(char, f"\\{ord(char):03o}")
    return out


def bdi_of(mountpoint: Path, mountinfo: str) -> str | None:
    """The backing device ("major:minor") of the mount at mountpoint, from mountinfo text.

    Read from mountinfo rather than stat(): a stat of our own mount point before the FUSE
    loop runs would wait for ourselves.
    """
    wanted = _mountinfo_path(mountpoint)
    found = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == wanted:
            found = fields[2]  # the last one: a mount stacked on the same path wins
    return found


def raise_read_ahead(mountpoint: Path) -> None:
    """Let the kernel send whole-chunk reads (see READ_AHEAD_KB); needs root, else skipped."""
    # The kernel names the mount by its real path; resolving the mount point itself would
    # stat our own, not yet served, mount: resolve its parent only.
    real = Path(os.path.realpath(mountpoint.parent)) / mountpoint.name
    try:
        bdi = bdi_of(real, Path("/proc/self/mountinfo").read_text())
        if bdi is not None:
            Path(f"/sys/class/bdi/{bdi}/read_ahead_kb").write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.debug("read-ahead left at the kernel's default: %s", exc)


async def serve(
    volume: Volume, request: MountRequest, ready: trio.Event, outcome: dict[str, object]
) -> None:
    """Run the FUSE loop until the kernel unmounts us, then flush everything.

    `outcome` receives the final flush's verdict, which the waiting `umount` reports.
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(volume.run)
        nursery.start_soon(_watch_signals, request.mountpoint)
        nursery.start_soon(control.serve, volume, request.mountpoint)
        ready.set()
        try:
            await pyfuse3.main()
        finally:
            with trio.CancelScope(shield=True):
                runtime.sd_notify("STOPPING=1")
                async with trio.open_nursery() as reporting:
                    reporting.start_soon(_report_flush, volume)
                    outcome.update(await _final_flush(volume))
                    reporting.cancel_scope.cancel()
                # The verdict is in: store calls still running (a poll for other devices'
                # commits, an upload abandoned to the spool) must not hold the exit while
                # the mount's tasks are cancelled.
                abort_in_flight()
                runtime.sd_notify(f"STATUS={_verdict_line(outcome)}")
            nursery.cancel_scope.cancel()


# systemd's stop timeout is pushed this far ahead on every report while the final upload runs,
# so a long upload is never killed half-way while it makes progress reports.
EXTEND_USEC = 60_000_000
REPORT_EVERY = 10.0
_SEAL_MARGIN = 5.0


async def _report_flush(volume: Volume) -> None:
    """Tell systemd what the final flush is doing, and that it needs more time."""
    while True:
        pending = volume.cache.dirty_bytes + volume.cache.inflight_bytes
        queued = len(volume.committer.queue)
        runtime.sd_notify(
            f"STATUS=unmounting: uploading {pending / (1 << 20):.1f} MiB and "
            f"{queued} queued commits\nEXTEND_TIMEOUT_USEC={EXTEND_USEC}"
        )
        await trio.sleep(REPORT_EVERY)


def _verdict_line(outcome: dict[str, object]) -> str:
    result = outcome.get("result")
    if result == "ok":
        return "unmounted: every change is in the bucket"
    if result == "spooled":
        return f"unmounted: {outcome.get('bytes')} bytes kept in the local spool"
    return f"unmounted: {outcome.get('error', 'the last changes may be lost')}"


# What a foreground mount (systemd's main process) exits with after the final flush.
_VERDICT_CODES = {
    "ok": 0,
    "spooled": ChangesSpooledError.exit_code,
}


async def _final_flush(volume: Volume) -> dict[str, object]:
    """Put every change in the bucket; if the store cannot take it, spool it sealed locally.

    Returns the verdict for `umount`: result ok, spooled (with bytes and spool) or failed
    (with the error).
    """
    timeout = volume.options.sync_timeout
    # Whatever path the unmount takes, removing the advertisement keeps to the same budget.
    volume.stop_deadline = time.monotonic() + timeout
    with trio.move_on_after(timeout):  # a compaction pass lands nothing after the final commit
        await volume.compactor.stop()
    if volume.committer.stopped:
        if not (volume.committer.has_changes() or volume.committer.queue):
            return {"result": "ok"}  # it lost the right to write, but every change had landed
        # Another writer took the lease (perhaps on a replayed old one): nothing of ours may
        # reach the bucket now, but acknowledged changes must not vanish either. The spool
        # keeps them, and its upload at the next mount never overwrites another's commit.
        with trio.move_on_after(timeout):
            await volume.committer.seal_for_spool()
        return _spool(volume, "this mount lost the lease to another writer")
    try:
        # One budget for everything the unmount does: the store calls inside it end by then
        # too, so the retry loops of committer and store cannot multiply what unmount waits
        # for. The flush's waits end a little later, so that changes are sealed into the
        # commit queue (and so into the spool) even when a store call used the whole budget.
        with operation_budget(timeout) as deadline:
            with trio.move_on_after(timeout + _SEAL_MARGIN) as scope:
                await volume.flush()
            if not scope.cancelled_caught:
                if not volume.options.read_only:
                    log.info("unmount: every change is in the bucket")
                    await _tidy(volume, deadline)
                return {"result": "ok"}
        error = f"the store did not take the last changes within {timeout:g} s"
        log.error("unmount: %s", error)
    except EncfsCloudError as exc:
        log.error("unmount: could not write the last changes to the bucket: %s", exc)
        error = str(exc)
    return _spool(volume, error)


async def _tidy(volume: Volume, deadline: float) -> None:
    """What the last commits freed goes now, in what is left of the unmount's budget.

    Deletions other mounts may still need wait for them (data/presence.py); when this mount
    is the only one live it deletes them itself, since nobody remembers them once it exits.
    """
    left = deadline - time.monotonic()
    waiting = -1  # unknown: the budget ran out first
    with trio.move_on_after(max(0.0, left)):
        if await volume.committer.cleanups_done(max(0.0, left)):
            waiting = await volume.committer.reap_leaving()
            await _forget_deleted(volume)
    if waiting < 0:
        log.warning(
            "unmount: some freed objects are not deleted yet (no time left); the next commit "
            "of any mount schedules them again, and fsck --repair deletes them"
        )
    elif waiting:
        log.info(
            "unmount: %d freed objects stay for the other live mounts, whose next commits "
            "delete them once all are past it",
            waiting,
        )


async def _forget_deleted(volume: Volume) -> None:
    """Commit the removal of the packs just deleted from the pack table.

    Without it the tree went on naming them until the next mount's first commit, and that
    mount's `status` counted gigabytes no longer in the bucket as stored. One small delta,
    only when something was deleted; if it cannot land, the next commit carries it.
    """
    if not volume.committer.has_changes():
        return
    try:
        await volume.flush()
    except EncfsCloudError as exc:
        log.warning("unmount: the deleted packs stay named until the next commit (%s)", exc)


def _spool(volume: Volume, error: str) -> dict[str, object]:
    try:
        size = volume.spool()
    except OSError as exc:
        log.error("unmount: could not write the local spool: %s", exc)
        return {"result": "failed", "error": f"{error}; the local spool failed too: {exc}"}
    if not size:
        return {"result": "failed", "error": error}
    folder = volume.devices.folder(volume.unlocked.fs_id) / spool.SPOOL_DIR
    log.warning(
        "unmount: %d bytes kept sealed in the local spool %s; the next mount uploads them",
        size,
        folder,
    )
    return {"result": "spooled", "bytes": size, "spool": str(folder)}


async def _watch_signals(mountpoint: Path) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                continue
            log.info("signal %d: unmounting", signum)
            abort_in_flight()  # a read hung on a slow store must not hold the unmount
            runtime.lazy_unmount(mountpoint)
            return


def run_mounted(volume: Volume, request: MountRequest, notify_fd: int | None) -> int:
    """Mount, serve until unmounted, tear down. Returns the exit code."""
    try:
        pyfuse3.init(volume.ops, str(request.mountpoint), fuse_options(request))
    except Exception as exc:
        volume.wipe()
        error = MountpointError(f"cannot mount on {request.mountpoint}: {exc}")
        if notify_fd is not None:
            runtime.notify_error(notify_fd, error.exit_code, str(error))
            return error.exit_code
        raise error from None
    # INIT's reply caps read-ahead at the kernel's 128 KiB default: raise it after INIT.
    volume.ops.after_init = lambda: raise_read_ahead(request.mountpoint)
    runtime.register(request.mountpoint, os.getpid(), request.source, volume.unlocked.fs_id)
    code = 0
    outcome: dict[str, object] = {}
    try:
        ready = trio.Event()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, volume, request, ready, outcome)
                await ready.wait()
                runtime.notify_ready(notify_fd)

        trio.run(main)
    except BaseException as exc:
        log.exception("the mount stopped on an error")
        code = 1
        if not outcome:
            outcome.update(result="failed", error=f"the daemon stopped on an error: {exc}")
    finally:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        runtime.report_outcome(request.mountpoint, outcome or {"result": "failed"})
        runtime.unregister(request.mountpoint)
        volume.wipe()
    return code or _VERDICT_CODES.get(str(outcome.get("result")), StoreError.exit_code)


def mount(request: MountRequest) -> int:
    """The whole `mount.encfs-cloud` job; returns once mounted unless in the foreground.

    Unlocking and replaying happen before the fork, so a wrong passphrase or a missing
    bucket is reported by the command itself with its own exit code.
    """
    check_mountpoint(request.mountpoint)
    runtime.tame_malloc()
    runtime.keep_secrets_off_disk()
    # In the foreground of the command until the fork: a bad log=FILE fails here, not later.
    # Until the fork only warnings reach the terminal (a mount that works prints nothing);
    # -f and -o debug show everything, as the daemon's log does.
    quiet = not (request.foreground or request.debug)
    logs.setup_logging(
        request.log_file,
        request.debug,
        foreground=True,
        stderr_level=logging.WARNING if quiet else logging.NOTSET,
    )
    volume = prepare(request)
    if request.foreground:
        return run_mounted(volume, request, None)
    try:
        return runtime.daemonize(lambda fd: _daemon_main(volume, request, fd))
    finally:
        volume.wipe()  # the parent's copy of the keys and plaintext


def _daemon_main(volume: Volume, request: MountRequest, notify_fd: int) -> int:
    set_wait_reporter(None)  # the terminal the command waited on is not the daemon's
    logs.setup_logging(
        request.log_file,
        request.debug,
        foreground=False,
        state_folder=volume.devices.folder(volume.unlocked.fs_id),
    )
    return run_mounted(volume, request, notify_fd)
