"""Mount lifecycle: unlock, daemonize, serve FUSE, flush on unmount, wipe keys."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from encfs_cloud.daemon import control, exclusive, runtime
from encfs_cloud.daemon.lease import Lease, LeaseKeeper
from encfs_cloud.daemon.volume import Volume, VolumeOptions
from encfs_cloud.errors import EncfsCloudError, MountpointError
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.keys.vault import unlock
from encfs_cloud.store import StoreOptions, open_store

log = logging.getLogger(__name__)


@dataclass
class MountRequest:
    source: str
    mountpoint: Path
    store_options: StoreOptions
    volume_options: VolumeOptions
    passphrase: bytes | None
    foreground: bool = False
    allow_other: bool = False
    log_file: str | None = None
    debug: bool = False
    takeover: bool = False
    fuse_options: list[str] = field(default_factory=list)


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
    store = open_store(request.source, request.store_options)
    devices = DeviceStore()
    unlocked = unlock(store, devices, request.passphrase)
    lease: Lease | None = None
    try:
        sealer = Sealer(unlocked.fs_id, unlocked.keys)
        if not request.volume_options.read_only:
            # Several mounts write at once (they merge); only an exclusive operation
            # (fsck --repair, re-encryption) holding the lease keeps a writer out.
            exclusive.refuse_if_held(store, sealer)
        return Volume(store, unlocked, devices, request.volume_options, lease=lease)
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


async def serve(volume: Volume, request: MountRequest, ready: trio.Event) -> None:
    """Run the FUSE loop until the kernel unmounts us, then flush everything."""
    keeper: LeaseKeeper | None = None
    if volume.lease is not None:

        def lease_lost(holder: str) -> None:
            # The new holder may already have committed on top of our last commit: from now
            # on nothing of ours may reach the bucket (the fence refuses it anyway).
            volume.ops.read_only = True
            volume.options.read_only = True
            volume.committer.stopped = True
            log.error(
                "lost the single-writer lease to %s: the filesystem is read-only now and "
                "changes not yet committed are discarded",
                holder,
            )

        keeper = LeaseKeeper(volume.lease, lease_lost)
        volume.keeper = keeper
    async with trio.open_nursery() as nursery:
        await nursery.start(volume.run)
        if keeper is not None:
            await nursery.start(keeper.run)  # first renewal records the daemon's pid
        nursery.start_soon(_watch_signals, request.mountpoint)
        nursery.start_soon(control.serve, volume, request.mountpoint)
        ready.set()
        try:
            await pyfuse3.main()
        finally:
            with trio.CancelScope(shield=True):
                await _final_flush(volume)
                if keeper is not None:  # renewed during the flush; released only after it
                    await keeper.stop_and_release()
            nursery.cancel_scope.cancel()


async def _final_flush(volume: Volume) -> None:
    """Put every change in the bucket; if the store cannot take it, spool it sealed locally."""
    if volume.committer.stopped:
        log.error("unmount: this mount lost the right to write; uncommitted changes are dropped")
        return
    try:
        await volume.flush()
        if not volume.options.read_only:
            log.info("unmount: every change is in the bucket")
        return
    except EncfsCloudError as exc:
        log.error("unmount: could not write the last changes to the bucket: %s", exc)
    if volume.committer.stopped:
        return  # another writer owns the filesystem now: our changes must not land
    try:
        size = volume.spool()
        if size:
            log.warning(
                "unmount: %d bytes kept sealed in the local spool; the next mount uploads them",
                size,
            )
    except OSError as exc:
        log.error("unmount: could not write the local spool: %s", exc)


async def _watch_signals(mountpoint: Path) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                continue
            log.info("signal %d: unmounting", signum)
            runtime.lazy_unmount(mountpoint)
            return


def run_mounted(volume: Volume, request: MountRequest, notify_fd: int | None) -> int:
    """Mount, serve until unmounted, tear down. Returns the exit code."""
    try:
        pyfuse3.init(volume.ops, str(request.mountpoint), fuse_options(request))
    except Exception as exc:
        if volume.lease is not None:
            with contextlib.suppress(EncfsCloudError):
                volume.lease.release()
        volume.wipe()
        error = MountpointError(f"cannot mount on {request.mountpoint}: {exc}")
        if notify_fd is not None:
            runtime.notify_error(notify_fd, error.exit_code, str(error))
            return error.exit_code
        raise error from None
    runtime.register(request.mountpoint, os.getpid(), request.source, volume.unlocked.fs_id)
    code = 0
    try:
        ready = trio.Event()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, volume, request, ready)
                await ready.wait()
                runtime.notify_ready(notify_fd)

        trio.run(main)
    except BaseException:
        log.exception("the mount stopped on an error")
        code = 1
    finally:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        runtime.unregister(request.mountpoint)
        volume.wipe()
    return code


def mount(request: MountRequest) -> int:
    """The whole `mount.encfs-cloud` job; returns once mounted unless in the foreground.

    Unlocking and replaying happen before the fork, so a wrong passphrase or a missing
    bucket is reported by the command itself with its own exit code.
    """
    check_mountpoint(request.mountpoint)
    runtime.tame_malloc()
    runtime.keep_secrets_off_disk()
    runtime.setup_logging(request.log_file, request.debug, foreground=True)
    volume = prepare(request)
    if request.foreground:
        return run_mounted(volume, request, None)
    try:
        return runtime.daemonize(lambda fd: _daemon_main(volume, request, fd))
    finally:
        volume.wipe()  # the parent's copy of the keys and plaintext


def _daemon_main(volume: Volume, request: MountRequest, notify_fd: int) -> int:
    runtime.setup_logging(request.log_file, request.debug, foreground=False)
    return run_mounted(volume, request, notify_fd)
