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
from encfs_cloud.daemon.options import parse_mount_options
from encfs_cloud.daemon.unmount import unmount
from encfs_cloud.errors import EncfsCloudError
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.store import StoreOptions, open_store
from encfs_cloud.store.budget import set_wait_reporter

log = logging.getLogger(__name__)

# Modules that add subcommands; each has `register(subparsers, common_parent_parser)`.
COMMAND_MODULES = (
    "encfs_cloud.cli.devices",
    "encfs_cloud.cli.maintenance",
    "encfs_cloud.cli.status",
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
    from encfs_cloud.keys.vault import init_filesystem

    store = open_store(args.source, store_from_args(args))
    passphrase = ask_new_passphrase(args)
    unlocked, recovery = init_filesystem(store, DeviceStore(), passphrase, args.device_name)
    try:
        print(f"Created an encfs-cloud filesystem at {args.source}")
        print(f"filesystem id: {unlocked.fs_id.hex()}")
        print(f"device id: {unlocked.device.device_id}")
        print()
        print("RECOVERY KEY (shown once; print it or write it down and keep it safe):")
        print(f"  {recovery}")
        print()
        print(f"Mount it with: mount.encfs-cloud {args.source} MOUNTPOINT")
    finally:
        unlocked.wipe()
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from encfs_cloud.daemon.mount import mount

    # Absolute now: the daemon changes to "/" before it mounts.
    mountpoint = Path(os.path.abspath(args.mountpoint))
    request = parse_mount_options(args.source, mountpoint, args.options or [])
    request.foreground = request.foreground or args.foreground
    if args.endpoint_url:
        request.store_options = dataclasses.replace(
            request.store_options, endpoint_url=args.endpoint_url
        )
    if request.passphrase is None:
        request.passphrase = _ask_unlock_passphrase(request.source, request.store_options)
    return mount(request)


def _ask_unlock_passphrase(source: str, options: StoreOptions) -> bytes | None:
    """Ask for the device passphrase on a terminal if the device key needs one."""
    from encfs_cloud.keys.vault import read_header

    if not sys.stdin.isatty():
        return None
    header = read_header(open_store(source, options))
    devices = DeviceStore()
    fs_id = bytes.fromhex(str(header["fs_id"]))
    if not devices.has(fs_id) or not devices.needs_passphrase(fs_id):
        return None
    return getpass.getpass("Passphrase for this device: ").encode()


def cmd_umount(args: argparse.Namespace) -> int:
    if getattr(args, "wipe", False):
        from encfs_cloud.cli.devices import umount_and_wipe

        return umount_and_wipe(args)
    unmount(Path(args.mountpoint))
    return 0


# --- parsers --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--endpoint-url", help="S3 endpoint (default: the boto3 chain)")
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
        help="ro, cache_size=SIZE, passphrase_file=FILE, endpoint_url=URL, region=NAME, "
        "profile=NAME, allow_other, allow_root, uid=N, gid=N, umask=M, max_read=N, log=FILE, "
        "commit_interval=SECONDS, sync_timeout=SECONDS, read_timeout=SECONDS, "
        "connect_timeout=SECONDS, takeover, allow_rollback, debug",
    )
    # mount(8) passes these; they mean nothing to us.
    p.add_argument("-s", "-n", dest="_ignored", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-t", dest="_type", help=argparse.SUPPRESS)
    p.add_argument("-N", dest="_namespace", help=argparse.SUPPRESS)


def run(argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s: %(message)s",
    )
    if sys.stderr.isatty():  # say what a silent store is keeping us waiting for
        set_wait_reporter(lambda line: print(f"{parser.prog}: {line}", file=sys.stderr, flush=True))
    try:
        result: int = args.func(args)
        return result
    except EncfsCloudError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing was changed", file=sys.stderr)
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
