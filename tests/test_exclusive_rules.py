"""Who keeps whom out, over the memory store: a lease that does not open, and the deletions a
leaving mount may make at once."""

from __future__ import annotations

import os
import time

import pytest

from encfs_cloud import layout
from encfs_cloud.daemon import exclusive
from encfs_cloud.daemon.lease import Lease
from encfs_cloud.data.presence import KIND, STALE_AFTER, Presence, Reaper
from encfs_cloud.errors import LeaseHeldError, StoreError
from encfs_cloud.keys.master import new_master_keys
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.memory import MemoryStore


class CountingStore(MemoryStore):
    """Remembers how many bytes each GET asked for, so a capped read can be told apart."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int | None] = []

    def get_with_etag(self, name: str, limit: int | None = None) -> tuple[bytes, str]:
        self.asked.append(limit)
        return super().get_with_etag(name, limit)


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(os.urandom(16), new_master_keys())


@pytest.mark.parametrize(
    ("junk", "why"),
    [
        (b"\0" * (layout.LEASE_CAP + 1), "larger than"),
        (b'{"holder": "someone else"}', "does not authenticate"),
    ],
)
def test_a_lease_that_does_not_open_keeps_writers_out_unless_takeover(
    sealer: Sealer, junk: bytes, why: str
) -> None:
    store = CountingStore()
    store.put(layout.LEASE_NAME, junk)
    with pytest.raises(LeaseHeldError) as refused:
        exclusive.refuse_if_held(store, sealer)
    assert refused.value.exit_code == 12
    assert why in str(refused.value) and "-o takeover" in str(refused.value)
    with pytest.raises(StoreError, match=why):  # a running mount's commit stays queued
        exclusive.check_before_commit(store, sealer)
    assert all(asked == layout.LEASE_CAP + 1 for asked in store.asked)  # never read whole
    exclusive.refuse_if_held(store, sealer, takeover=True)
    exclusive.check_before_commit(store, sealer, takeover=True)


def test_takeover_never_overrides_a_lease_that_opens(sealer: Sealer) -> None:
    store = MemoryStore()
    repair = Lease(store, sealer, "id-fsck", "fsck-elsewhere", validity=60.0)
    repair.acquire()
    for takeover in (False, True):
        with pytest.raises(LeaseHeldError, match="fsck-elsewhere"):
            exclusive.refuse_if_held(store, sealer, takeover=takeover)
        with pytest.raises(StoreError, match="fsck-elsewhere"):
            exclusive.check_before_commit(store, sealer, takeover=takeover)
    repair.release()
    exclusive.refuse_if_held(store, sealer)  # a released lease holds nothing
    assert exclusive.holder(store, sealer) is None


def _waiting(store: MemoryStore, sealer: Sealer) -> tuple[Presence, Reaper]:
    mine = Presence(store, sealer)
    mine.publish(3)  # advertised before its final commit (4): the reaper must not wait for it
    reaper = Reaper(mine, grace=3600.0)
    reaper.schedule(4, ["data/aa", "data/bb"])
    return mine, reaper


def test_a_leaving_mount_alone_deletes_at_once(sealer: Sealer) -> None:
    store = MemoryStore()
    _, reaper = _waiting(store, sealer)
    assert reaper.ready(lambda _: True) == []  # still within the grace
    assert sorted(reaper.ready(lambda name: name != "data/bb", leaving=True)) == ["data/aa"]
    assert not reaper.waiting  # the revived one is forgotten, not deleted


def test_a_leaving_mount_leaves_deletions_to_other_live_mounts(sealer: Sealer) -> None:
    store = MemoryStore()
    _, reaper = _waiting(store, sealer)
    other = Presence(store, sealer)
    other.publish(4)  # already past the freeing commit: only the grace holds them back
    assert reaper.ready(lambda _: True, leaving=True) == []
    assert set(reaper.waiting) == {"data/aa", "data/bb"}
    other.withdraw()
    assert len(reaper.ready(lambda _: True, leaving=True)) == 2


def test_a_silent_advertisement_counts_as_gone(sealer: Sealer) -> None:
    """An unmount in an outage leaves its mounts/ object; others stop waiting for it after
    STALE_AFTER, as the unmount's log line promises."""
    store = MemoryStore()
    gone = Presence(store, sealer)
    gone.publish(1)
    assert [m.name for m in Presence(store, sealer).live()] == [gone.name]
    stale = time.time() - STALE_AFTER - 1
    payload = f'{{"applied": 1, "time": {stale}}}'.encode()
    store.put(gone.name, sealer.seal_object(gone.name, KIND, payload))
    assert Presence(store, sealer).live() == []
    assert exclusive.live_mounts(store, sealer) == 0
