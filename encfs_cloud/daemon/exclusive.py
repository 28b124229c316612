"""Exclusive operations against several writers: the lease keeps mounts from committing."""

from __future__ import annotations

import time

from encfs_cloud.daemon.lease import Lease
from encfs_cloud.data.presence import Presence
from encfs_cloud.errors import LeaseHeldError, StoreError
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.base import ObjectStore

UNKNOWN = "an unknown holder"


def holder(store: ObjectStore, sealer: Sealer, *, takeover: bool = False) -> str | None:
    """Who holds the lease for an exclusive operation right now, if anyone (one GET of at
    most LEASE_CAP + 1 bytes, so a huge planted object costs no memory).

    A lease object that does not open counts as held by UNKNOWN: a real one may be sealed
    under a key generation this mount has not adopted yet, and keeping out is the safe
    side. `takeover` (-o takeover) ignores such an object (never a lease that opens).
    """
    lease = Lease(store, sealer, "", "")
    info, etag = lease.read()
    if info is None:
        if etag is None or takeover:
            return None
        return f"{UNKNOWN} (the lease object {lease.unreadable})"
    if info.expired(time.time()) or info.gone_from_here():
        return None
    return info.holder()


def refuse_if_held(store: ObjectStore, sealer: Sealer, *, takeover: bool = False) -> None:
    """A read-write mount does not start while fsck --repair or re-encryption runs."""
    who = holder(store, sealer, takeover=takeover)
    if who is None:
        return
    if who.startswith(UNKNOWN):
        raise LeaseHeldError(
            f"an exclusive operation may hold the filesystem: {who}; if no fsck --repair or "
            "re-encryption is running, mount with -o takeover, or mount with -o ro"
        )
    raise LeaseHeldError(
        f"an exclusive operation (fsck --repair or re-encryption) by {who} "
        "holds the filesystem; mount with -o ro, or wait until it is done"
    )


def check_before_commit(store: ObjectStore, sealer: Sealer, *, takeover: bool = False) -> None:
    """Raised as a store error so the commit stays queued and is retried later."""
    who = holder(store, sealer, takeover=takeover)
    if who is not None:
        raise StoreError(
            f"an exclusive operation by {who} holds the filesystem; "
            "changes stay queued until it is done"
        )


def live_mounts(store: ObjectStore, sealer: Sealer) -> int:
    """How many mounts (read-write or read-only, anywhere) advertise themselves as live."""
    return len(Presence(store, sealer).live())


def refuse_if_mounted(store: ObjectStore, sealer: Sealer, *, takeover: bool = False) -> None:
    """Called by an exclusive operation after it took the lease (so a mount starting now
    sees the lease): mounts that started before must be unmounted first. `takeover`
    ignores them, for mounts that crashed and so could not withdraw their advertisement."""
    live = live_mounts(store, sealer)
    if live and not takeover:
        raise LeaseHeldError(
            f"{live} mount(s) of this filesystem are live (on this or other devices); "
            "unmount them first, or if they crashed, retry with --takeover"
        )
