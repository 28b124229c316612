"""Argument helpers every command module shares: exit-code help, store options, passphrases."""

from __future__ import annotations

import argparse
import getpass
import sys

from encfs_cloud.daemon.health import WatchedStore
from encfs_cloud.daemon.options import check_endpoint_url, read_secret_file
from encfs_cloud.errors import EXIT_CODES, UsageError
from encfs_cloud.keys.connection import with_remembered
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.store import StoreOptions, open_store
from encfs_cloud.store.base import ObjectStore

EXIT_HELP = "exit codes: 0 ok; " + ", ".join(
    f"{code} {name.removesuffix('Error')}"
    for name, code in sorted(EXIT_CODES.items(), key=lambda kv: kv[1])
)


def ask_new_passphrase(args: argparse.Namespace) -> bytes | None:
    """The passphrase for a new device key: from a file, none, or asked twice on a terminal."""
    if getattr(args, "passphrase_file", None):
        return read_secret_file(args.passphrase_file)
    if getattr(args, "no_passphrase", False):
        return None
    if not sys.stdin.isatty():
        raise UsageError(
            "no terminal to ask for a passphrase: use --passphrase-file or --no-passphrase"
        )
    first = getpass.getpass("New passphrase for this device (empty for none): ")
    if not first:
        return None
    if getpass.getpass("Repeat the passphrase: ") != first:
        raise UsageError("the two passphrases differ; nothing was changed")
    return first.encode()


def open_source(args: argparse.Namespace, source: str | None = None) -> ObjectStore:
    """The store of SOURCE, watched so that a store that does not answer is noticed."""
    source = source or args.source
    return WatchedStore(open_store(source, store_from_args(args, source)))


def store_from_args(args: argparse.Namespace, source: str | None = None) -> StoreOptions:
    """The options given, completed by what this device remembered for SOURCE."""
    options = StoreOptions(
        endpoint_url=check_endpoint_url(getattr(args, "endpoint_url", None)),
        region=getattr(args, "region", None),
        profile=getattr(args, "profile", None),
    )
    source = source or getattr(args, "source", None)
    return with_remembered(DeviceStore(), source, options) if source else options
