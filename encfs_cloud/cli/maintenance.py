"""`encfs-cloud fsck` and `encfs-cloud salvage`: check, repair and rescue a filesystem."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from encfs_cloud.cli.args import EXIT_HELP, open_source
from encfs_cloud.cli.progress import Progress
from encfs_cloud.daemon.options import read_secret_file
from encfs_cloud.errors import (
    EXIT_ALL_SAVED,
    EXIT_CLEAN,
    EXIT_DAMAGED,
    EXIT_REPAIRED,
    EXIT_SOME_LOST,
    Interrupted,
)
from encfs_cloud.keys.device import DeviceState, DeviceStore
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.keys.storefit import check_writable
from encfs_cloud.keys.vault import Unlocked, read_header, unlock
from encfs_cloud.store.base import ObjectStore

if TYPE_CHECKING:  # the tools and the lease are imported by the commands that run them:
    # building the parser for any command (umount included) must not pull in trio and the
    # data layer (0.15 s of every command's start)
    from encfs_cloud.daemon.lease import Lease
    from encfs_cloud.tools.fsck import Report
    from encfs_cloud.tree.journal import Head

OTHER_CODES = EXIT_HELP.replace("0 ok; ", "")
FSCK_EPILOG = f"""\
fsck reads every metadata commit from the newest snapshot on and every sealed chunk, and
lists what is damaged (files whose data fails authentication or is missing, broken commits,
entries without inodes, wrong link counts) and what is garbage (objects nothing references,
commits older than the snapshot, inodes without a name). Without --repair it changes nothing
and may run while the filesystem is mounted (then what may be in flight is not counted).

--repair takes the exclusive lease (any live mount of the filesystem makes it refuse, exit 12),
says what it will do and asks first on a terminal (--yes: do not ask). It REMOVES files whose
data is damaged (they are listed: run salvage first to copy out what is still readable),
deletes garbage, fixes link counts, and writes the result as a new metadata snapshot.

fsck exit codes: 0 clean; {EXIT_REPAIRED} problems found and all repaired; \
{EXIT_DAMAGED} problems found and not (all) repaired.
other {OTHER_CODES}"""

SALVAGE_EPILOG = f"""\
salvage copies every file whose data authenticates (with modes, owners, times, symlinks, hard
links and extended attributes) into DEST, which must be missing or empty (or left by an
interrupted salvage, which the same command then resumes). If the newest
metadata commit is damaged, it uses the newest state that still replays and says so. Each
thing it could not save is one line on stdout: "lost: PATH: why".

salvage exit codes: {EXIT_ALL_SAVED} everything saved; {EXIT_SOME_LOST} something was not saved.
other {OTHER_CODES}"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "fsck",
        parents=[common],
        help="check every object and reference (--repair to fix)",
        epilog=FSCK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--repair", action="store_true", help="fix what is found (asks first)")
    p.add_argument("-y", "--yes", action="store_true", help="with --repair: do not ask")
    p.add_argument(
        "--takeover",
        action="store_true",
        help="with --repair: take an expired lease, ignore advertisements of crashed mounts",
    )
    p.add_argument("--passphrase-file", metavar="FILE", help="read this device's passphrase")
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser(
        "salvage",
        parents=[common],
        help="copy every intact file out of a damaged filesystem",
        epilog=SALVAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("dest", metavar="DEST", help="a local directory, missing or empty")
    p.add_argument(
        "--partial",
        action="store_true",
        help="also keep damaged files, with unreadable chunks as zeros, as NAME.salvage-partial",
    )
    p.add_argument("--passphrase-file", metavar="FILE", help="read this device's passphrase")
    p.set_defaults(func=cmd_salvage)


def _open(args: argparse.Namespace) -> tuple[ObjectStore, DeviceStore, Unlocked]:
    store = open_source(args)
    devices = DeviceStore()
    passphrase = None
    if args.passphrase_file:
        passphrase = read_secret_file(args.passphrase_file)
    elif sys.stdin.isatty():
        fs_id = bytes.fromhex(str(read_header(store)["fs_id"]))
        if devices.has(fs_id) and devices.needs_passphrase(fs_id):
            passphrase = getpass.getpass("Passphrase for this device: ").encode()
    return store, devices, unlock(store, devices, passphrase)


def _writer_active(lease: Lease) -> bool:
    """A mount may be writing: one advertises itself, or the lease is live (or unreadable)."""
    from encfs_cloud.daemon import exclusive

    if exclusive.live_mounts(lease.store, lease.sealer):
        return True
    info, etag = lease.read()
    if etag is None:
        return False
    if info is None:
        return True
    return not (info.expired(time.time()) or info.gone_from_here())


def cmd_fsck(args: argparse.Namespace) -> int:
    from encfs_cloud.daemon import exclusive
    from encfs_cloud.daemon.lease import Lease

    store, devices, unlocked = _open(args)
    try:
        sealer = Sealer(unlocked.fs_id, unlocked.keys)
        lease = Lease(store, sealer, unlocked.device.device_id, unlocked.device.name)
        if args.repair:
            unsafe = args.unsafe_no_conditional_writes
            check_writable(store, devices, unlocked.fs_id, unsafe=unsafe, doing="fsck --repair")
            lease.acquire(takeover=args.takeover, how="--takeover")
        try:
            if args.repair:
                exclusive.refuse_if_mounted(store, sealer, takeover=args.takeover)
            renewing = lease.renewed_in_background() if lease.held else contextlib.nullcontext()
            with renewing:
                return _fsck(args, store, sealer, lease, devices, unlocked.fs_id)
        finally:
            lease.release()
    finally:
        unlocked.wipe()


def _fsck(
    args: argparse.Namespace,
    store: ObjectStore,
    sealer: Sealer,
    lease: Lease,
    devices: DeviceStore,
    fs_id: bytes,
) -> int:
    from encfs_cloud.tools.fsck import check

    bar = Progress("fsck:", "")
    try:
        report = check(
            store,
            sealer,
            writer_active=not lease.held and _writer_active(lease),
            seen_seq=devices.load_state(fs_id).commit_seq,
            progress=lambda stage, done, total: bar.update(done, total, label=f"fsck: {stage}"),
        )
    finally:
        bar.close()
    try:
        return _conclude(args, store, sealer, lease, devices, fs_id, report)
    finally:
        report.state.md.db.close()


def _conclude(
    args: argparse.Namespace,
    store: ObjectStore,
    sealer: Sealer,
    lease: Lease,
    devices: DeviceStore,
    fs_id: bytes,
    report: Report,
) -> int:
    from encfs_cloud.daemon.lease import FencedStore
    from encfs_cloud.tools.fsck import repair

    for finding in report.findings:
        print(finding.line())
    for note in report.notes:
        print(f"note: {note}")
    seq = report.state.head.seq
    if not report.findings and not (args.repair and report.plan.compact):
        print(
            f"clean: {report.files} files, {report.chunks} chunks in {report.packs} data "
            f"objects verified (metadata commit {seq})"
        )
        return EXIT_CLEAN
    if report.findings:
        print(f"{len(report.findings)} problems found")
    if not args.repair:
        print("run fsck --repair to fix them (salvage first to copy out damaged files' data)")
        return EXIT_DAMAGED
    if not report.repairable:
        print("not repairing: some problems cannot be repaired (see above)")
        return EXIT_DAMAGED
    for line in _plan_lines(report):
        print(f"will {line}")
    if not args.yes:
        if not sys.stdin.isatty():
            print("not repairing without confirmation: no terminal to ask on; add --yes")
            return EXIT_DAMAGED
        if input("Repair now? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing was changed")
            return EXIT_DAMAGED
    head = repair(FencedStore(store, lease), sealer, report)
    if head is not None:
        _remember(devices, fs_id, head)
        print(f"repaired: wrote metadata snapshot {head.seq}")
    else:
        print("repaired")
    return EXIT_REPAIRED if report.findings else EXIT_CLEAN  # compaction alone: was clean


def _plan_lines(report: Report) -> list[str]:
    plan, state = report.plan, report.state
    damaged = sum(1 for f in report.findings if f.kind == "damaged")
    lines = []
    if not state.complete:
        lines.append(
            f"drop metadata commits after {state.head.seq} (they do not open or chain) and "
            "continue from that state"
        )
    if damaged:
        lines.append(f"remove {damaged} damaged files (listed above)")
    if plan.remove_inodes and len(plan.remove_inodes) > damaged:
        lines.append(f"delete {len(plan.remove_inodes) - damaged} inodes without a name")
    if plan.remove_entries:
        lines.append(f"remove {len(plan.remove_entries)} broken directory entries")
    if plan.nlink:
        lines.append(f"fix the link counts of {len(plan.nlink)} inodes")
    if plan.stray_chunks or plan.add_packs or plan.recount:
        lines.append("rebuild the data accounting")
    if plan.delete_objects:
        lines.append(f"delete {len(plan.delete_objects)} objects that nothing references")
    if plan.compact:
        lines.append(
            f"compact {len(plan.compact)} data objects (copy their live sealed chunks into new "
            f"ones, then delete them: {plan.reclaim / (1 << 20):.1f} MiB freed)"
        )
    if plan.changes_metadata() or not state.complete:
        lines.append("write the result as a new metadata snapshot")
    return lines


def _remember(devices: DeviceStore, fs_id: bytes, head: Head) -> None:
    def change(state: DeviceState) -> None:
        state.commit_seq = head.seq
        state.commit_hash = head.hash

    devices.update_state(fs_id, change)


def _written(dest: str) -> tuple[int, int]:
    """How many files and bytes an interrupted salvage left in DEST."""
    files = size = 0
    for folder, _, names in os.walk(dest):
        for name in names:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(folder, name)).st_size
                files += 1
    return files, size


def cmd_salvage(args: argparse.Namespace) -> int:
    from encfs_cloud.tools.salvage import salvage

    store, _, unlocked = _open(args)
    bar = Progress("salvage: copied")
    try:
        sealer = Sealer(unlocked.fs_id, unlocked.keys)
        state, result = salvage(store, sealer, args.dest, partial=args.partial, progress=bar.update)
    except KeyboardInterrupt:
        files, size = _written(args.dest)
        raise Interrupted(
            f"interrupted: {files} files ({size / (1 << 20):.1f} MiB) were written into "
            f"{args.dest}, which is incomplete; the bucket was not changed. Run the same "
            "salvage command again to resume: it writes everything again over what is there"
        ) from None
    finally:
        bar.close()
        unlocked.wipe()
    if not state.complete:
        print(
            f"encfs-cloud salvage: the newest metadata commit ({state.newest_seq}) cannot be "
            f"used ({state.problems[0]}); salvaged the state of commit {state.head.seq}",
            file=sys.stderr,
        )
    for path, why in result.lost:
        print(f"lost: {path}: {why}")
    print(
        f"encfs-cloud salvage: saved {result.files} files, {result.dirs} directories, "
        f"{result.symlinks} symlinks, {result.others} other nodes "
        f"({result.bytes / (1 << 20):.1f} MiB) into {args.dest}; "
        f"{len(result.lost)} not saved",
        file=sys.stderr,
    )
    return result.exit_code
