"""Parse mount(8)-style `-o` options into a MountRequest."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from encfs_cloud.daemon.mount import MountRequest
from encfs_cloud.daemon.volume import VolumeOptions
from encfs_cloud.errors import UsageError
from encfs_cloud.store import StoreOptions

# Options mount(8), fstab and systemd pass that only matter to them.
GENERIC = {
    "defaults",
    "rw",
    "auto",
    "noauto",
    "_netdev",
    "nofail",
    "user",
    "users",
    "nouser",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "async",
    "sync",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "owner",
    "group",
    "loop",
}
GENERIC_PREFIXES = ("x-", "comment=", "_")

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' → bytes (binary units)."""
    found = _SIZE.match(text.strip())
    if not found:
        raise UsageError(f"cannot read size {text!r}; write it like 512M or 2G")
    number, unit, _ = found.groups()
    return int(float(number) * _UNITS[unit.lower()])


def read_secret_file(path: str) -> bytes:
    """A passphrase or key from a file, without its trailing newline."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return data.rstrip(b"\r\n")


def split_options(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _seconds(pairs: dict[str, str], name: str) -> float | None:
    if name not in pairs:
        return None
    try:
        seconds = float(pairs[name])
    except ValueError:
        raise UsageError(f"{name} takes seconds, not {pairs[name]!r}") from None
    if seconds <= 0:
        raise UsageError(f"{name} must be positive")
    return seconds


def store_options_from(pairs: dict[str, str]) -> StoreOptions:
    options = StoreOptions(
        endpoint_url=pairs.get("endpoint_url"),
        region=pairs.get("region"),
        profile=pairs.get("profile"),
    )
    read_timeout = _seconds(pairs, "read_timeout")
    if read_timeout is not None:
        options = dataclasses.replace(options, read_timeout=read_timeout)
    connect_timeout = _seconds(pairs, "connect_timeout")
    if connect_timeout is not None:
        options = dataclasses.replace(options, connect_timeout=connect_timeout)
    return options


def parse_mount_options(source: str, mountpoint: Path, values: list[str]) -> MountRequest:
    flags: set[str] = set()
    pairs: dict[str, str] = {}
    fuse_extra: list[str] = []
    for item in split_options(values):
        key, sep, value = item.partition("=")
        if key in (
            "ro",
            "allow_other",
            "takeover",
            "allow_rollback",
            "debug",
            "foreground",
            "allow_root",
        ):
            flags.add(key)
        elif (
            key
            in (
                "cache_size",
                "passphrase_file",
                "endpoint_url",
                "log",
                "region",
                "profile",
                "commit_interval",
                "poll_interval",
                "sync_timeout",
                "read_timeout",
                "connect_timeout",
            )
            and sep
        ):
            pairs[key] = value
        elif item in GENERIC or item.startswith(GENERIC_PREFIXES):
            continue
        elif key in ("uid", "gid", "umask", "max_read"):
            fuse_extra.append(item)
        else:
            raise UsageError(f"unknown mount option {item!r}; see mount.encfs-cloud --help")
    volume = VolumeOptions(read_only="ro" in flags, allow_rollback="allow_rollback" in flags)
    if "cache_size" in pairs:
        volume.cache_size = parse_size(pairs["cache_size"])
        if volume.cache_size < 16 << 20:
            raise UsageError("cache_size must be at least 16M")
    for name in ("commit_interval", "sync_timeout", "poll_interval"):
        seconds = _seconds(pairs, name)
        if seconds is not None:
            setattr(volume, name, seconds)
    passphrase = None
    if "passphrase_file" in pairs:
        passphrase = read_secret_file(pairs["passphrase_file"])
    request = MountRequest(
        source=source,
        mountpoint=mountpoint,
        store_options=store_options_from(pairs),
        volume_options=volume,
        passphrase=passphrase,
        foreground="foreground" in flags,
        allow_other="allow_other" in flags,
        # The daemon changes to "/": a relative log path means relative to the caller.
        log_file=os.path.abspath(pairs["log"]) if "log" in pairs else None,
        debug="debug" in flags,
        fuse_options=fuse_extra + (["allow_root"] if "allow_root" in flags else []),
        takeover="takeover" in flags,
    )
    return request
