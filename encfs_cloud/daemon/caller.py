"""What a FUSE request does not say about its caller: supplementary groups, from /proc."""

from __future__ import annotations

from pathlib import Path


def in_group(uid: int, gid: int, pid: int, group: int) -> bool:
    """Whether the caller may keep a set-group-id bit for `group` (as in_group_or_capable).

    The kernel tells FUSE only the caller's uid, primary gid and pid; its other groups are
    read from /proc. Root counts as capable. A caller that has gone away, or that lives in a
    pid namespace we cannot see (pid 0), counts as not in it: the bit is dropped (the safe
    side).
    """
    if uid == 0 or gid == group:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("Groups:"):
            return str(group) in line.split()[1:]
    return False
