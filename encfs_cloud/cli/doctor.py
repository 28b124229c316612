"""`encfs-cloud doctor SOURCE`: probe the store, explain each finding and what to do about it."""

from __future__ import annotations

import argparse
import textwrap

from encfs_cloud.cli.args import EXIT_HELP, store_from_args
from encfs_cloud.errors import EncfsCloudError, NoFilesystemError, StoreUnfitError
from encfs_cloud.keys.connection import remember_connection
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.records import fs_id_of, read_header
from encfs_cloud.keys.storefit import remember_profile
from encfs_cloud.store import open_store
from encfs_cloud.store.base import ObjectStore, StoreOptions
from encfs_cloud.store.probe import PROBE_PREFIX, probe_store
from encfs_cloud.store.profile import StoreProfile, findings

DESCRIPTION = f"""\
Probe the store SOURCE names on scratch objects under its prefix ({PROBE_PREFIX}..., deleted
afterwards; nothing else is touched and no key is needed): whether it enforces conditional
writes (If-None-Match: * on an existing object and If-Match with a wrong ETag must both be
refused), whether ranged GETs return just the range, how it treats CRC32 checksums, whether
bucket versioning is on, and how far its clock (the Date header) is from this machine's.
Each finding is explained with what to do. If this device is enrolled in the filesystem
there, the profile is remembered (encfs-cloud status shows it) and so are the endpoint,
region and AWS profile used.

doctor exits 0 when the store is fit for encfs-cloud (warnings allowed) and
{StoreUnfitError.exit_code} when it is not."""


def _filesystem_note(
    store: ObjectStore, options: StoreOptions, source: str, p: StoreProfile
) -> str:
    try:
        fs_id = fs_id_of(read_header(store))
    except NoFilesystemError:
        return "none yet (encfs-cloud init SOURCE creates one)"
    except EncfsCloudError as exc:
        return f"unreadable header ({exc})"
    devices = DeviceStore()
    if not devices.has(fs_id):
        return f"{fs_id.hex()}; this device is not enrolled"
    remember_profile(devices, fs_id, p)
    remember_connection(devices, fs_id, source, options)
    return f"{fs_id.hex()}; this device is enrolled: the profile is remembered"


def cmd_doctor(args: argparse.Namespace) -> int:
    options = store_from_args(args)
    store = open_store(args.source, options)
    endpoint = getattr(store, "endpoint", None)
    print(f"store:      {store.url}" + (f" at {endpoint}" if endpoint else ""))
    profile = probe_store(store)
    print(f"filesystem: {_filesystem_note(store, options, args.source, profile)}")
    print()
    for finding in findings(profile):
        print(f"  {finding.level:<4}  {finding.check}: {finding.found}")
        for line in textwrap.wrap(finding.explain, 86, break_on_hyphens=False):
            print(f"        {line}")
    print()
    failed = [f for f in findings(profile) if f.level == "FAIL"]
    if failed:
        print("verdict: NOT FIT for encfs-cloud (writing commands refuse this store)")
        raise StoreUnfitError(
            f"{store.url} is not fit for encfs-cloud: "
            + "; ".join(f"{f.check} {f.found}" for f in failed)
        )
    print("verdict: fit for encfs-cloud")
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "doctor",
        parents=[common],
        help="probe a store: conditional writes, ranges, checksums, versioning, clock",
        description=DESCRIPTION,
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="s3://bucket[/prefix] or file:///abs/dir")
    p.set_defaults(func=cmd_doctor)
