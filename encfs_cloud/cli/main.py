"""Command line: `encfs-cloud` subcommands and the `mount.encfs-cloud` mount(8) helper."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from encfs_cloud import __version__
from encfs_cloud.cli.args import EXIT_HELP, ask_new_passphrase, store_from_args
from encfs_cloud.cli.progress import FlushView
from encfs_cloud.daemon.health import WatchedStore
from encfs_cloud.daemon.logs import setup_command_logging
from encfs_cloud.daemon.options import check_endpoint_url, parse_mount_options
from encfs_cloud.daemon.runtime import keep_secrets_off_disk
from encfs_cloud.daemon.unmount import unmount
from encfs_cloud.errors import EncfsCloudError, NotEmptyError, UsageError
from encfs_cloud.keys.connection import with_remembered
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.store import StoreOptions, open_store
from encfs_cloud.store.budget import set_wait_reporter

log = logging.getLogger(__name__)

# Modules that add subcommands; each has `register(subparsers, common_parent_parser)`.
COMMAND_MODULES = (
    "encfs_cloud.cli.devices",
    "encfs_cloud.cli.doctor",
    "encfs_cloud.cli.maintenance",
    "encfs_cloud.cli.status",
    "encfs_cloud.cli.wipe",
)


def _command_modules() -> list[ModuleType]:
    found = []
    for name in COMMAND_MODULES:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return found


# --- commands -------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from encfs_cloud.keys.connection import remember_connection, told
    from encfs_cloud.keys.storefit import remember_profile, require_conditional_writes
    from encfs_cloud.keys.vault import init_filesystem
    from encfs_cloud.store.probe import probe_store

    options = store_from_args(args)
    store = WatchedStore(open_store(args.source, options))
    # The store is checked before the passphrase is asked for: a bad store wastes no typing.
    # Emptiness first: a refused init must leave a non-empty store exactly as it was.
    if next(iter(store.list("")), None) is not None:
        raise NotEmptyError(f"{store.url} is not empty; init needs an empty bucket or prefix")
    profile = probe_store(store)
    require_conditional_writes(
        profile, unsafe=args.unsafe_no_conditional_writes, doing=f"init {args.source}"
    )
    passphrase = ask_new_passphrase(args)
    devices = DeviceStore()
    unlocked, recovery = init_filesystem(store, devices, passphrase, args.device_name)
    try:
        remember_profile(devices, unlocked.fs_id, profile)
        remember_connection(devices, unlocked.fs_id, args.source, options)
        settings = ",".join(f"{k}={v}" for k, v in told(options).items())
        how = f"-o {settings} " if settings and args.source.startswith("s3://") else ""
        print(f"Created an encfs-cloud filesystem at {args.source}")
        print(f"filesystem id: {unlocked.fs_id.hex()}")
        print(f"device id: {unlocked.device.device_id}")
        print()
        print("RECOVERY KEY (shown once; print it or write it down and keep it safe):")
        print(f"  {recovery}")
        print()
        print(f"Mount it with: mount.encfs-cloud {how}{args.source} MOUNTPOINT")
    finally:
        unlocked.wipe()
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from encfs_cloud.daemon.mount import mount

    if "://" in args.mountpoint and "://" not in args.source:
        raise UsageError(
            f"SOURCE comes first, then MOUNTPOINT: {Path(sys.argv[0]).name} "
            f"{args.mountpoint} {args.source}"
        )
    # Absolute now: the daemon changes to "/" before it mounts.
    mountpoint = Path(os.path.abspath(args.mountpoint))
    request = parse_mount_options(args.source, mountpoint, args.options or [])
    request.foreground = request.foreground or args.foreground
    given = {k: getattr(args, k, None) for k in ("endpoint_url", "region", "profile")}
    given["endpoint_url"] = check_endpoint_url(given["endpoint_url"])
    request.store_options = dataclasses.replace(
        request.store_options, **{k: v for k, v in given.items() if v}
    )
    request.store_options = with_remembered(DeviceStore(), request.source, request.store_options)
    if getattr(args, "unsafe_no_conditional_writes", False):
        request.unsafe_no_conditional_writes = True
    if request.passphrase is None:
        request.passphrase = _ask_unlock_passphrase(request.source, request.store_options)
    return mount(request)


def _ask_unlock_passphrase(source: str, options: StoreOptions) -> bytes | None:
    """Ask for the device passphrase on a terminal if the device key needs one."""
    from encfs_cloud.keys.vault import read_header

    if not sys.stdin.isatty():
        return None
    header = read_header(WatchedStore(open_store(source, options)))
    devices = DeviceStore()
    fs_id = bytes.fromhex(str(header["fs_id"]))
    if not devices.has(fs_id) or not devices.needs_passphrase(fs_id):
        return None
    return getpass.getpass("Passphrase for this device: ").encode()


def cmd_umount(args: argparse.Namespace) -> int:
    if getattr(args, "wipe", False):
        from encfs_cloud.cli.wipe import umount_and_wipe

        return umount_and_wipe(args)
    view = FlushView(Path(os.path.abspath(args.mountpoint)))
    try:
        unmount(Path(args.mountpoint), on_wait=view.tick)  # raises unless all is in the bucket
    finally:
        view.close()
    return 0


# --- parsers --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--endpoint-url", help="S3 endpoint (default: the boto3 chain)")
    common.add_argument("--region", help="S3 region (default: the boto3 chain)")
    common.add_argument("--profile", help="AWS profile in ~/.aws/config (default: AWS_PROFILE)")
    common.add_argument(
        "--unsafe-no-conditional-writes",
        action="store_true",
        help="write even where the store ignores If-None-Match/If-Match (one device only)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser = argparse.ArgumentParser(
        prog="encfs-cloud",
        description="End-to-end encrypted filesystem in an S3-compatible bucket.",
        epilog=EXIT_HELP,
    )
    parser.add_argument("--version", action="version", version=f"encfs-cloud {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "init",
        parents=[common],
        help="create a filesystem and enroll this device",
        epilog=EXIT_HELP,
    )
    p.add_argument("source", metavar="SOURCE", help="file:///abs/dir or s3://bucket[/prefix]")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--passphrase-file", metavar="FILE", help="read this device's passphrase")
    group.add_argument(
        "--no-passphrase",
        action="store_true",
        help="protect the device key only by machine binding",
    )
    p.add_argument("--device-name", default=os.uname().nodename, help="a name for this device")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "mount", parents=[common], help="mount (same as mount.encfs-cloud)", epilog=EXIT_HELP
    )
    _mount_arguments(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser(
        "umount",
        parents=[common],
        help="unmount once every change is in the bucket",
        epilog=EXIT_HELP,
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--wipe", action="store_true", help="also destroy this device's key")
    p.add_argument("-y", "--yes", action="store_true", help="with --wipe: do not ask")
    p.set_defaults(func=cmd_umount)

    for module in _command_modules():
        module.register(sub, common)
    return parser


def _mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPTION[,OPTION...]",
        help="ro, cache_size=SIZE, cache_dir=DIR, disk_cache_size=SIZE, passphrase_file=FILE, "
        "endpoint_url=URL, region=NAME, profile=NAME, allow_other, allow_root, max_read=N, "
        "log=FILE, "
        "commit_interval=SECONDS, sync_timeout=SECONDS, read_timeout=SECONDS, "
        "connect_timeout=SECONDS, takeover, allow_rollback, unsafe_no_conditional_writes, "
        "debug, exec, noexec, suid, nosuid, dev, nodev",
    )
    # mount(8) passes these; they mean nothing to us.
    p.add_argument("-s", "-n", dest="_ignored", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-t", dest="_type", help=argparse.SUPPRESS)
    p.add_argument("-N", dest="_namespace", help=argparse.SUPPRESS)


def run(argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    setup_command_logging(getattr(args, "verbose", False))
    # Before any command can unlock a key: a crash must not write keys, passphrases or
    # names into a core file, and other processes of this user must not ptrace us.
    keep_secrets_off_disk()
    if sys.stderr.isatty():  # say what a silent store is keeping us waiting for
        set_wait_reporter(lambda line: print(f"{parser.prog}: {line}", file=sys.stderr, flush=True))
    try:
        result: int = args.func(args)
        return result
    except EncfsCloudError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # Commands that change things say what they did themselves (Interrupted above).
        print(f"{parser.prog}: interrupted before it finished", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv, build_parser()))


def mount_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mount.encfs-cloud",
        description="Mount an encfs-cloud filesystem (the mount(8) helper).",
        epilog=EXIT_HELP,
    )
    _mount_arguments(parser)
    parser.add_argument("--endpoint-url", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(func=cmd_mount)
    sys.exit(run(sys.argv[1:] if argv is None else argv, parser))
