"""Commands for devices and keys: device …, recover, recovery-key, passwd, wipe, umount --wipe."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from encfs_cloud.cli.args import ask_new_passphrase, open_source
from encfs_cloud.cli.progress import Progress
from encfs_cloud.daemon.options import read_secret_file
from encfs_cloud.errors import (
    AbortedError,
    DeviceKeyMissingError,
    Interrupted,
    UsageError,
)
from encfs_cloud.keys import enrollment
from encfs_cloud.keys import master as K
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.records import fs_id_of, read_header, record_name
from encfs_cloud.keys.storefit import check_writable
from encfs_cloud.keys.vault import Unlocked, unlock, unlock_with_recovery
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tools.reencrypt import exclusive, reencrypt
from encfs_cloud.tree.journal import commit_seqs

_FULL_ID = re.compile(r"[0-9a-f]{32}")


# --- helpers ----------------------------------------------------------------------------------


def _interactive() -> bool:
    return sys.stdin.isatty()


def _store(args: argparse.Namespace) -> ObjectStore:
    return open_source(args)


def _unlock_passphrase(
    args: argparse.Namespace, devices: DeviceStore, fs_id: bytes
) -> bytes | None:
    """This device's passphrase: from --passphrase-file, else asked on a terminal if needed."""
    if getattr(args, "passphrase_file", None):
        return read_secret_file(args.passphrase_file)
    if _interactive() and devices.has(fs_id) and devices.needs_passphrase(fs_id):
        return getpass.getpass("Passphrase for this device: ").encode()
    return None


def _check_writable(
    args: argparse.Namespace, store: ObjectStore, devices: DeviceStore, fs_id: bytes
) -> None:
    unsafe = getattr(args, "unsafe_no_conditional_writes", False)
    command = getattr(args, "command", None) or "wipe"  # umount --wipe leaves the keyring too
    what = command if command != "device" else f"device {args.device_command}"
    check_writable(store, devices, fs_id, unsafe=unsafe, doing=f"run {what}")


@contextlib.contextmanager
def _opened(
    args: argparse.Namespace, *, writes: bool = True
) -> Iterator[tuple[ObjectStore, DeviceStore, Unlocked]]:
    """The store, this machine's devices and the unlocked filesystem (wiped at the end).

    For a command that `writes`, the store must enforce conditional writes (keys/storefit.py).
    """
    store = _store(args)
    devices = DeviceStore()
    fs_id = fs_id_of(read_header(store))
    if not devices.has(fs_id):
        raise DeviceKeyMissingError(
            f"this device is not enrolled for filesystem {fs_id.hex()}; "
            "run encfs-cloud device request or encfs-cloud recover"
        )
    unlocked = unlock(store, devices, _unlock_passphrase(args, devices, fs_id))
    try:
        if writes:
            _check_writable(args, store, devices, fs_id)
        yield store, devices, unlocked
    finally:
        unlocked.wipe()


def _confirm(args: argparse.Namespace, question: str) -> None:
    """Ask on a terminal unless --yes; without a terminal the command itself is the consent."""
    if getattr(args, "yes", False) or not _interactive():
        return
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise AbortedError("not confirmed; nothing was changed")


def _run_reencrypt(store: ObjectStore, devices: DeviceStore, unlocked: Unlocked) -> None:
    bar = Progress("re-encrypting", "packs")
    try:
        report = reencrypt(store, unlocked, devices, bar.update)
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted: the data not yet rewritten stays readable as before; packs this run "
            "already wrote are not referenced yet (fsck lists them as garbage): run "
            "encfs-cloud device reencrypt SOURCE again to resume, and it deletes them"
        ) from None
    finally:
        bar.close()
    print(
        f"re-encrypted {report.chunks} chunks into {report.packs_written} packs under key "
        f"generation {report.generation}; removed {report.objects_deleted} old objects"
    )


# --- device … ---------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    with _opened(args, writes=False) as (store, _, unlocked):
        me = unlocked.device.device_id
        entries = enrollment.list_devices(store, unlocked)
        ring = unlocked.keyring
        print(f"filesystem id: {unlocked.fs_id.hex()}")
        fp = K.fingerprint(unlocked.keys, ring.generation)
        print(f"key generation: {ring.generation} (fingerprint {fp})")
        print("enrolled devices:")
        for d in sorted(entries, key=lambda e: (e.enrolled_at, e.device_id)):
            mark = "*" if d.device_id == me else " "
            this = "  (this device)" if d.device_id == me else ""
            print(
                f"{mark} {d.device_id}  {d.name}  enrolled {d.enrolled_at}  "
                f"key generation {d.generation}{this}"
            )
        print(f"recovery key: created {ring.recovery_created_at}")
        requests = enrollment.list_requests(store, unlocked.fs_id)
        if not requests:
            print("pending requests: none")
        else:
            print("pending requests (unverified until approved with their code):")
            for r in requests:
                print(f"  {r.device_id}  {r.name}  requested {r.requested_at}")
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    store = _store(args)
    devices = DeviceStore()
    fs_id = fs_id_of(read_header(store))
    _check_writable(args, store, devices, fs_id)
    if devices.has(fs_id):  # asking again shows the same code
        passphrase = _unlock_passphrase(args, devices, fs_id)
    else:
        passphrase = ask_new_passphrase(args)
    code = enrollment.request_enrollment(store, devices, passphrase, args.device_name)
    device_id = devices.device_id(fs_id)
    print(f"Enrollment requested for filesystem {fs_id.hex()}")
    print(f"request id: {device_id}")
    print(f"verification code: {code}")
    print(
        f"On an enrolled device run: encfs-cloud device approve {args.source} {device_id} "
        "and type the code; then mount here."
    )
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    with _opened(args) as (store, devices, unlocked):
        pending = enrollment.list_requests(store, unlocked.fs_id)
        request = enrollment.find_request(pending, args.request_id)
        print(f"request from {request.name!r} (id {request.device_id}) made {request.requested_at}")
        code = _verification_code(args)
        enrollment.verify_request(unlocked.fs_id, request, code)  # a typo enrolls nothing
        _confirm(args, f"Enroll device {request.name!r}?")
        entry = enrollment.approve(store, unlocked, devices, code, request.device_id)
        print(f"approved device {entry.name!r} with key generations up to {entry.generation}")
        print(f"device id: {entry.device_id}")
    return 0


def _verification_code(args: argparse.Namespace) -> str:
    """The code from --code-file (- for stdin) or typed on the terminal; never from argv,
    where every local user could read it in the process list while it is still valid."""
    if args.code is not None:
        raise UsageError(
            "--code would show the code to every local user; use --code-file FILE "
            "(- for stdin) or type it when asked"
        )
    if args.code_file == "-":
        return sys.stdin.readline().strip()
    if args.code_file:
        return read_secret_file(args.code_file).decode(errors="replace").strip()
    if not _interactive():
        raise UsageError("no terminal to type the verification code: use --code-file FILE")
    return input("Type the verification code shown on the new device: ")


def cmd_deny(args: argparse.Namespace) -> int:
    store = _store(args)
    pending = enrollment.list_requests(store, fs_id_of(read_header(store)))
    request = enrollment.find_request(pending, args.request_id)
    enrollment.deny(store, request.device_id)
    print(f"denied request {request.device_id}")
    return 0


def cmd_rename(args: argparse.Namespace) -> int:
    with _opened(args) as (store, devices, unlocked):
        entry = enrollment.find_device(unlocked.keyring, args.device_id)
        enrollment.rename_device(store, unlocked, devices, entry.device_id, args.name)
        print(f"renamed device {entry.device_id} to {args.name.strip()!r}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with _opened(args) as (store, devices, unlocked):
        if not args.reencrypt:
            _revoke(args, store, devices, unlocked)
            print(
                "existing data stays readable by old keys; to rewrite it run: "
                f"encfs-cloud device reencrypt {args.source}"
            )
            return 0
        # The lease first: a mounted filesystem is refused before anything changes.
        with exclusive(store, unlocked, args.source, takeover=args.takeover) as fenced:
            _revoke(args, fenced, devices, unlocked)
            _run_reencrypt(fenced, devices, unlocked)
    return 0


def _revoke(
    args: argparse.Namespace, store: ObjectStore, devices: DeviceStore, unlocked: Unlocked
) -> None:
    ring = enrollment.list_devices(store, unlocked)
    target = args.device_id.strip().lower()
    if (
        args.reencrypt
        and _FULL_ID.fullmatch(target)
        and not any(d.device_id == target for d in ring)
        and store.head(record_name(target)) is None
    ):  # a re-run after an interrupted re-encryption: finish the job
        print(f"device {target} is already revoked; finishing the re-encryption")
        return
    entry = enrollment.find_device(unlocked.keyring, args.device_id)
    _confirm(args, f"Revoke device {entry.name!r} ({entry.device_id})?")
    gen = enrollment.revoke_device(store, unlocked, devices, entry.device_id)
    print(f"revoked device {entry.name!r}")
    print(f"device id: {entry.device_id}")
    print(f"key generation {gen} now seals everything written from here on")


def cmd_reencrypt(args: argparse.Namespace) -> int:
    with (
        _opened(args) as (store, devices, unlocked),
        exclusive(store, unlocked, args.source, takeover=args.takeover) as fenced,
    ):
        _run_reencrypt(fenced, devices, unlocked)
    return 0


# --- recovery, passphrase, wiping ---------------------------------------------------------


def cmd_recover(args: argparse.Namespace) -> int:
    store = _store(args)
    _check_writable(args, store, DeviceStore(), fs_id_of(read_header(store)))
    if args.recovery_key_file:
        text = read_secret_file(args.recovery_key_file).decode(errors="replace")
    elif _interactive():
        text = getpass.getpass("Recovery key: ")
    else:
        raise UsageError("no terminal to type the recovery key: use --recovery-key-file FILE")
    # A recovered device has no history: whatever the bucket holds now becomes its starting
    # point, so a bucket rolled back before it cannot be told apart. Say what it will accept.
    seqs = commit_seqs(store)
    head = seqs[-1] if seqs else 0
    _confirm(
        args,
        f"The bucket's newest change is metadata commit {head}; this device will refuse "
        "anything older but cannot tell whether that is already rolled back. Continue?",
    )
    passphrase = ask_new_passphrase(args)
    unlocked = unlock_with_recovery(store, DeviceStore(), text, passphrase, args.device_name)
    try:
        print(f"enrolled this device in filesystem {unlocked.fs_id.hex()} with the recovery key")
        print(f"device id: {unlocked.device.device_id}")
        print(f"starting point: metadata commit {head}")
        print(
            f"If the recovery key may be known to others: encfs-cloud recovery-key "
            f"{args.source} --rotate"
        )
    finally:
        unlocked.wipe()
    return 0


def cmd_recovery_key(args: argparse.Namespace) -> int:
    with _opened(args, writes=args.rotate) as (store, devices, unlocked):
        if not args.rotate:
            created = unlocked.keyring.recovery_created_at
            print(f"recovery key created {created}; it is never stored, only shown once.")
            print("use --rotate to make a new one (the old one stops working)")
            return 0
        text = enrollment.rotate_recovery_key(store, unlocked, devices)
        print("NEW RECOVERY KEY (shown once; the old one no longer works):")
        print(f"  {text}")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    store = _store(args)
    devices = DeviceStore()
    fs_id = fs_id_of(read_header(store))
    old = _unlock_passphrase(args, devices, fs_id)
    devices.load(fs_id, old).wipe()  # check the old passphrase before asking for a new one
    if args.new_passphrase_file:
        new = read_secret_file(args.new_passphrase_file)
    elif args.no_passphrase:
        new = None
    elif _interactive():
        new = ask_new_passphrase(argparse.Namespace())
    else:
        raise UsageError(
            "no terminal to ask for the new passphrase: use --new-passphrase-file or "
            "--no-passphrase"
        )
    devices.change_passphrase(fs_id, old, new)
    print("passphrase " + ("changed" if new else "removed") + "; nothing in the bucket changed")
    return 0


# --- parsers ----------------------------------------------------------------------------------

_MUTEX = {"new-device": ("passphrase-file", "no-passphrase"), "new-passphrase": ("npf", "rm")}
_FLAGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "unlock": (("--passphrase-file",), {"metavar": "FILE", "help": "this device's passphrase"}),
    "passphrase-file": (("--passphrase-file",), {"metavar": "FILE", "help": "a new passphrase"}),
    "no-passphrase": (("--no-passphrase",), {"action": "store_true", "help": "machine-bound only"}),
    "npf": (("--new-passphrase-file",), {"metavar": "FILE", "help": "read the new passphrase"}),
    "rm": (("--no-passphrase",), {"action": "store_true", "help": "remove the passphrase"}),
    "device-name": (("--device-name",), {"default": os.uname().nodename, "help": "a device name"}),
    "request_id": (("request_id",), {"metavar": "REQUEST_ID"}),
    "device_id": (("device_id",), {"metavar": "DEVICE_ID"}),
    "name": (("name",), {"metavar": "NAME"}),
    "code": (("--code",), {"help": argparse.SUPPRESS}),  # refused: argv is public
    "code-file": (("--code-file",), {"metavar": "FILE", "help": "read the code (- for stdin)"}),
    "yes": (("--yes", "-y"), {"action": "store_true", "help": "do not ask for confirmation"}),
    "reencrypt": (("--reencrypt",), {"action": "store_true", "help": "also rewrite old data"}),
    "takeover": (("--takeover",), {"action": "store_true", "help": "after a crash: lease, mounts"}),
    "recovery-key-file": (("--recovery-key-file",), {"metavar": "FILE", "help": "read it"}),
    "rotate": (("--rotate",), {"action": "store_true", "help": "print a new recovery key"}),
    "force": (("--force",), {"action": "store_true", "help": "even if it is the last key left"}),
}  # fmt: skip


def _add(p: argparse.ArgumentParser, extra: str) -> None:
    if extra in _MUTEX:  # a passphrase, or explicitly none
        group = p.add_mutually_exclusive_group()
        for name in _MUTEX[extra]:
            group.add_argument(*_FLAGS[name][0], **_FLAGS[name][1])
        if extra == "new-device":
            _add(p, "device-name")
        return
    p.add_argument(*_FLAGS[extra][0], **_FLAGS[extra][1])


# name ("device X" goes under `device`), handler, help, the arguments after SOURCE
_COMMANDS: list[tuple[str, Callable[[argparse.Namespace], int], str, str]] = [
    ("device list", cmd_list, "enrolled devices and pending requests", "unlock"),
    ("device request", cmd_request, "ask to enroll this device (shows a code)", "new-device"),
    ("device approve", cmd_approve, "enroll a device if its code matches",
     "request_id code code-file unlock yes"),
    ("device deny", cmd_deny, "delete a pending enrollment request", "request_id"),
    ("device rename", cmd_rename, "rename an enrolled device", "device_id name unlock"),
    ("device revoke", cmd_revoke, "remove a device; new data uses a key it never had",
     "device_id reencrypt takeover unlock yes"),
    ("device reencrypt", cmd_reencrypt, "rewrite all data under the newest key", "takeover unlock"),
    ("recover", cmd_recover, "enroll this device with the recovery key",
     "recovery-key-file new-device yes"),
    ("recovery-key", cmd_recovery_key, "make a new recovery key (--rotate)", "rotate unlock"),
    ("passwd", cmd_passwd, "change, add or remove this device's passphrase",
     "unlock new-passphrase"),
]  # fmt: skip


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    from encfs_cloud.cli.args import EXIT_HELP

    dev = sub.add_parser("device", help="list, enroll, rename and revoke devices", epilog=EXIT_HELP)
    dsub = dev.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    for name, func, text, extras in _COMMANDS:
        parent = dsub if name.startswith("device ") else sub
        p = parent.add_parser(
            name.removeprefix("device "),
            parents=[common],
            help=text,
            description=text,
            epilog=EXIT_HELP,
        )
        p.add_argument("source", metavar="SOURCE", help="file:///abs/dir or s3://bucket[/prefix]")
        for extra in extras.split():
            _add(p, extra)
        p.set_defaults(func=func)
