"""`wipe` and `umount --wipe`: leave the keyring, then destroy this device's local files."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from encfs_cloud.cli.args import open_source
from encfs_cloud.cli.devices import _add, _confirm, _opened, _store
from encfs_cloud.cli.progress import FlushView
from encfs_cloud.daemon import runtime
from encfs_cloud.daemon.unmount import unmount
from encfs_cloud.data import cachefolders
from encfs_cloud.errors import (
    AbortedError,
    DeviceKeyMissingError,
    DeviceRevokedError,
    EncfsCloudError,
    MountpointError,
)
from encfs_cloud.keys import enrollment
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.records import fs_id_of, read_header
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tools.reencrypt import mounted_here


def _own_id(devices: DeviceStore, fs_id: bytes) -> str | None:
    try:
        return devices.device_id(fs_id)
    except EncfsCloudError:  # an unreadable key file is wiped all the same
        return None


def _wipe_local(devices: DeviceStore, fs_id: bytes, left: bool) -> None:
    device_id = _own_id(devices, fs_id)
    caches = cachefolders.remove_all(devices.folder(fs_id), fs_id)
    devices.wipe(fs_id)
    print(f"wiped this device's key and state for filesystem {fs_id.hex()}")
    for folder in caches:
        print(f"removed the disk cache {folder}")
    if device_id:
        print(f"device id: {device_id}")
        if not left:
            print(
                f"(its key record stays listed until another device runs "
                f"encfs-cloud device revoke SOURCE {device_id})"
            )


def _leave_keyring(args: argparse.Namespace, store: ObjectStore, own: str | None) -> bool:
    """Remove this device from the keyring with a new generation; True if done.

    A copy of the device folder (a backup, a disk image) must not read what is written after
    the wipe. Without unlocking that cannot be done here: refused unless --force.
    """
    try:
        with _opened(args) as (_, devices, unlocked):
            gen = enrollment.remove_self(store, unlocked, devices)
    except DeviceRevokedError:
        return True  # already out of the keyring
    except EncfsCloudError as exc:
        if getattr(args, "force", False):
            print(f"warning: could not remove this device from the keyring: {exc}", file=sys.stderr)
            return False
        raise AbortedError(
            f"cannot unlock to remove this device from the keyring ({exc}); another device "
            f"must revoke it (encfs-cloud device revoke SOURCE {own or 'DEVICE'}), or add "
            "--force to wipe only the local key"
        ) from None
    print(f"removed this device from the keyring; the others now use key generation {gen}")
    return True


def cmd_wipe(args: argparse.Namespace) -> int:
    store = _store(args)
    devices = DeviceStore()
    fs_id = fs_id_of(read_header(store))
    if not devices.folder(fs_id).exists():
        raise DeviceKeyMissingError(f"nothing to wipe: no device key for {fs_id.hex()} here")
    where = mounted_here(args.source, fs_id)
    if where is not None:
        raise MountpointError(
            f"the filesystem is mounted at {where}; use encfs-cloud umount --wipe {where}"
        )
    if not args.force:
        enrollment.check_not_last(store, _own_id(devices, fs_id))
    _confirm(args, f"Destroy this device's key for filesystem {fs_id.hex()}?")
    own = _own_id(devices, fs_id)
    left = _leave_keyring(args, store, own)
    _wipe_local(devices, fs_id, left)
    if own:  # a request of the destroyed key would only confuse whoever approves it
        enrollment.deny(store, own)
    return 0


def umount_and_wipe(args: argparse.Namespace) -> int:
    """`umount --wipe`: unmount (everything reaches the bucket), then wipe the device key."""
    mountpoint = Path(os.path.abspath(args.mountpoint))
    entry = runtime.registered(mountpoint) or {}
    fs_hex, source = entry.get("fs_id"), entry.get("source")
    if not isinstance(source, str):
        raise MountpointError(f"{mountpoint} is not an encfs-cloud mount of this machine")
    store = open_source(args, source)
    fs_id = bytes.fromhex(fs_hex) if isinstance(fs_hex, str) else fs_id_of(read_header(store))
    devices = DeviceStore()
    enrollment.check_not_last(store, _own_id(devices, fs_id))  # a refusal leaves it mounted
    _confirm(args, f"Unmount {mountpoint} and destroy this device's key for {fs_id.hex()}?")
    view = FlushView(mountpoint)
    try:
        unmount(mountpoint, on_wait=view.tick)
    except EncfsCloudError as exc:  # not all in the bucket: the key is still needed
        exc.args = (f"{exc}; this device's key was NOT wiped",)
        raise
    finally:
        view.close()
    left = _leave_keyring(
        argparse.Namespace(source=source, force=True), store, _own_id(devices, fs_id)
    )
    _wipe_local(devices, fs_id, left)
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    from encfs_cloud.cli.args import EXIT_HELP

    text = "leave the keyring, destroy this device's key and local files"
    p = sub.add_parser("wipe", parents=[common], help=text, description=text, epilog=EXIT_HELP)
    p.add_argument("source", metavar="SOURCE", help="file:///abs/dir or s3://bucket[/prefix]")
    for extra in ("force", "unlock", "yes"):
        _add(p, extra)
    p.set_defaults(func=cmd_wipe)
