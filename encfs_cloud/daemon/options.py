"""Parse mount(8)-style `-o` options into a MountRequest."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from encfs_cloud.errors import UsageError
from encfs_cloud.store import StoreOptions

DEFAULT_CACHE_SIZE = 256 << 20


@dataclass
class VolumeOptions:
    cache_size: int = DEFAULT_CACHE_SIZE
    read_only: bool = False
    commit_interval: float = 5.0
    allow_rollback: bool = False
    sync_timeout: float = 120.0
    cache_dir: Path | None = None  # the sealed disk cache; None: under $XDG_CACHE_HOME
    disk_cache_size: int | None = None  # None: the default (see diskcache); 0: no disk cache
    poll_interval: float = 5.0  # how often other devices' commits are looked for
    takeover: bool = False  # ignore a lease object that does not open (see exclusive.holder)


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
    unsafe_no_conditional_writes: bool = False
    fuse_options: list[str] = field(default_factory=list)


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
    "_rnetdev",
}
# Only what mount(8), fstab and systemd define; any other "_name" is a typo to report.
GENERIC_PREFIXES = ("x-", "comment=")
# Flags the kernel enforces on the mount itself: handed to FUSE's mount(2), never dropped.
# Without them libfuse mounts nosuid,nodev (and exec): a forged set-id file or device node
# in the bucket stays harmless unless the user asks for `suid` or `dev`.
KERNEL_FLAGS = ("exec", "noexec", "suid", "nosuid", "dev", "nodev")
VALUE_OPTIONS = (
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
    "cache_dir",
    "disk_cache_size",
)

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


def check_endpoint_url(url: str | None) -> str | None:
    """An endpoint URL botocore will take, or a one-line error (it would raise a traceback)."""
    if url is None:
        return None
    hint = "write it like https://s3.example.net or http://127.0.0.1:9000"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise UsageError(f"endpoint URL {url!r} is malformed ({exc}); {hint}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"endpoint URL {url!r} is malformed; {hint}")
    return url


def store_options_from(pairs: dict[str, str]) -> StoreOptions:
    options = StoreOptions(
        endpoint_url=check_endpoint_url(pairs.get("endpoint_url")),
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


_EXAMPLE = {
    "cache_size": "512M",
    "passphrase_file": "/etc/encfs-cloud/home.pass",
    "endpoint_url": "https://s3.example.net",
    "log": "/var/log/encfs-cloud.log",
    "region": "eu-west-1",
    "profile": "backup",
    "commit_interval": "5",
    "poll_interval": "5",
    "sync_timeout": "120",
    "read_timeout": "30",
    "connect_timeout": "5",
    "cache_dir": "/var/cache/encfs-cloud",
    "disk_cache_size": "1G",
}


def _max_read(value: str) -> int:
    """Checked here: libfuse would only say "fuse_session_new() failed"."""
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"mount option max_read takes a number of bytes, not {value!r}") from None
    if number <= 0:
        raise UsageError(f"mount option max_read={value} must be positive")
    return number


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
            "unsafe_no_conditional_writes",
            "debug",
            "foreground",
            "allow_root",
        ):
            flags.add(key)
        elif key in VALUE_OPTIONS:
            if not sep or not value:
                raise UsageError(f"mount option {key} needs a value, like {key}={_EXAMPLE[key]}")
            pairs[key] = value
        elif item in GENERIC or item.startswith(GENERIC_PREFIXES):
            continue
        elif item in KERNEL_FLAGS:
            # FUSE gets its options as a set: the last of a pair (exec,noexec) must win here.
            opposite = item[2:] if item.startswith("no") else "no" + item
            fuse_extra = [o for o in fuse_extra if o not in (item, opposite)] + [item]
        elif key == "max_read":
            fuse_extra.append(f"max_read={_max_read(value)}")
        elif key in ("uid", "gid", "umask"):
            # Options of libfuse's high-level API; pyfuse3 uses the low-level one, where the
            # kernel would refuse them with only "fuse_session_new() failed".
            raise UsageError(
                f"mount option {key}= is not supported: files show the owners and modes stored "
                "in the filesystem (change them with chown/chmod; allow_other shares the mount)"
            )
        else:
            raise UsageError(f"unknown mount option {item!r}; see mount.encfs-cloud --help")
    volume = VolumeOptions(
        read_only="ro" in flags,
        allow_rollback="allow_rollback" in flags,
        takeover="takeover" in flags,
    )
    if "cache_size" in pairs:
        volume.cache_size = parse_size(pairs["cache_size"])
        if volume.cache_size < 16 << 20:
            raise UsageError("cache_size must be at least 16M")
    if "disk_cache_size" in pairs:
        volume.disk_cache_size = parse_size(pairs["disk_cache_size"])
        if 0 < volume.disk_cache_size < 16 << 20:
            raise UsageError("disk_cache_size must be 0 (no disk cache) or at least 16M")
    if "cache_dir" in pairs:
        # The daemon changes to "/": a relative folder means relative to the caller.
        volume.cache_dir = Path(os.path.abspath(pairs["cache_dir"]))
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
        unsafe_no_conditional_writes="unsafe_no_conditional_writes" in flags,
    )
    return request
