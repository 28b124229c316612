"""POSIX ACLs in Linux's xattr form: parse, keep in step with the mode, inherit on create."""

from __future__ import annotations

import errno
import stat
import struct
from dataclasses import dataclass, replace

from encfs_cloud.errors import FsError

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
MAX_ENTRIES = 8191  # what fits the kernel's 64 KiB xattr value


@dataclass(frozen=True)
class Entry:
    tag: int
    perm: int
    id: int = UNDEFINED_ID


def parse(value: bytes) -> list[Entry]:
    """Decode and check an ACL as the kernel sends it (sorted by tag, then id)."""
    body = len(value) - _HEADER.size
    if body < 0 or body % _ENTRY.size or _HEADER.unpack_from(value)[0] != VERSION:
        raise FsError(errno.EINVAL)
    entries = [
        Entry(*_ENTRY.unpack_from(value, _HEADER.size + i * _ENTRY.size))
        for i in range(body // _ENTRY.size)
    ]
    _check(entries)
    return entries


def _check(entries: list[Entry]) -> None:
    if not 3 <= len(entries) <= MAX_ENTRIES:
        raise FsError(errno.EINVAL)
    keys = [(e.tag, e.id if e.tag in (USER, GROUP) else 0) for e in entries]
    if keys != sorted(set(keys)) or any(e.perm & ~0o7 for e in entries):
        raise FsError(errno.EINVAL)  # out of order, a duplicate, or unknown permission bits
    tags = [e.tag for e in entries]
    if any(t not in (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER) for t in tags):
        raise FsError(errno.EINVAL)
    if tags.count(USER_OBJ) != 1 or tags.count(GROUP_OBJ) != 1 or tags.count(OTHER) != 1:
        raise FsError(errno.EINVAL)
    named = USER in tags or GROUP in tags
    if named and MASK not in tags:
        raise FsError(errno.EINVAL)  # named entries need a mask (acl(5))


def serialize(entries: list[Entry]) -> bytes:
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(e.tag, e.perm, e.id) for e in entries)


def is_minimal(entries: list[Entry]) -> bool:
    """Only owner, group and other: the mode says all of it, so no ACL is kept."""
    return all(e.tag in (USER_OBJ, GROUP_OBJ, OTHER) for e in entries)


def _group_class(entries: list[Entry]) -> Entry:
    """The entry the mode's group bits stand for: the mask if there is one."""
    for tag in (MASK, GROUP_OBJ):
        for entry in entries:
            if entry.tag == tag:
                return entry
    raise FsError(errno.EINVAL)


def mode_of(entries: list[Entry], mode: int) -> int:
    """`mode` with its permission bits taken from an access ACL (what setfacl changes)."""
    perms = {e.tag: e.perm for e in entries if e.tag in (USER_OBJ, OTHER)}
    group = _group_class(entries).perm
    bits = perms[USER_OBJ] << 6 | group << 3 | perms[OTHER]
    return (mode & ~0o777) | bits


def chmod(entries: list[Entry], mode: int) -> list[Entry]:
    """An access ACL after chmod: owner, mask (else group) and other follow the mode."""
    group_class = _group_class(entries).tag
    new = {USER_OBJ: (mode >> 6) & 7, group_class: (mode >> 3) & 7, OTHER: mode & 7}
    return [replace(e, perm=new[e.tag]) if e.tag in new else e for e in entries]


def inherit(default: list[Entry], mode: int) -> tuple[list[Entry], int]:
    """The access ACL and mode of a new inode in a directory with a default ACL.

    As the kernel's posix_acl_create_masq: owner, mask (else group) and other of the
    default are cut down to the create mode, and the mode to what remains.
    """
    group_class = _group_class(default).tag
    shifts = {USER_OBJ: 6, group_class: 3, OTHER: 0}
    access = [
        replace(e, perm=e.perm & (mode >> shifts[e.tag]) & 7) if e.tag in shifts else e
        for e in default
    ]
    return access, mode_of(access, mode)


def inherits_default(mode: int) -> bool:
    """Whether an inode of this type takes its parent's default ACL (symlinks do not)."""
    return not stat.S_ISLNK(mode)
