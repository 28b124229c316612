"""The single-writer lease: API over memory/file/S3 stores, thread races, and real mounts."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from encfs_cloud import layout
from encfs_cloud.daemon.lease import FencedStore, Lease, LeaseInfo
from encfs_cloud.errors import LeaseHeldError, PreconditionFailedError, TransientStoreError
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.master import new_master_keys
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.keys.vault import unlock
from encfs_cloud.store import open_store
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.memory import MemoryStore
from tests.fixtures_mount import (
    MOUNT,
    Device,
    daemon_pids,
    force_unmount,
    needs_fuse,
    unmount,
)

HOUR = 3600.0


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(os.urandom(16), new_master_keys())


def lease(
    store: ObjectStore,
    sealer: Sealer,
    name: str,
    *,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
) -> Lease:
    return Lease(store, sealer, f"id-{name}", name, validity=60.0, clock=clock, monotonic=monotonic)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- the API -------------------------------------------------------------------------------


def test_second_writer_is_refused_with_who_and_since(sealer: Sealer) -> None:
    store = MemoryStore()
    first = lease(store, sealer, "laptop")
    first.acquire()
    with pytest.raises(LeaseHeldError) as refused:
        lease(store, sealer, "desktop").acquire()
    message = str(refused.value)
    assert refused.value.exit_code == 12
    assert "'laptop'" in message and socket.gethostname() in message
    assert "since" in message and "-o takeover" in message and "\n" not in message
    # A live lease is not taken over, even when asked to.
    with pytest.raises(LeaseHeldError, match="alive"):
        lease(store, sealer, "desktop").acquire(takeover=True)
    assert first.renew() and first.may_write()


def test_lease_is_sealed_so_the_bucket_owner_cannot_read_or_forge_it(sealer: Sealer) -> None:
    store = MemoryStore()
    lease(store, sealer, "secret-laptop-name").acquire()
    blob = store.get(layout.LEASE_NAME)
    assert b"secret-laptop-name" not in blob and b"hostname" not in blob
    # A forged (unsealed) lease is not believed: it takes an explicit takeover.
    store.put(layout.LEASE_NAME, b'{"released": true}')
    with pytest.raises(LeaseHeldError, match="does not authenticate"):
        lease(store, sealer, "b").acquire()
    lease(store, sealer, "b").acquire(takeover=True)


def test_expired_lease_taken_over_and_the_old_holder_stops_writing(sealer: Sealer) -> None:
    store = MemoryStore()
    crashed = lease(store, sealer, "old", clock=lambda: time.time() - HOUR)
    crashed.acquire()
    with pytest.raises(LeaseHeldError, match="expired"):
        lease(store, sealer, "new").acquire()
    taker = lease(store, sealer, "new")
    taker.acquire(takeover=True)
    # The old holder wakes up: its renewal finds the lease gone; the fence refuses writes.
    assert crashed.renew() is False and crashed.lost and not crashed.may_write()
    fenced = FencedStore(store, crashed)
    with pytest.raises(PreconditionFailedError):
        fenced.put(layout.commit_name(7), b"commit")
    with pytest.raises(PreconditionFailedError):
        fenced.delete(layout.pack_name("00"))
    assert store.head(layout.commit_name(7)) is None
    crashed.release()  # must not clobber the new holder's lease
    assert taker.renew() and taker.may_write()


def test_release_lets_the_next_writer_in_without_takeover(sealer: Sealer) -> None:
    store = MemoryStore()
    first = lease(store, sealer, "a")
    first.acquire()
    first.release()
    assert not first.may_write()
    second = lease(store, sealer, "b")
    second.acquire()
    assert second.held


def test_holder_gone_from_this_machine_is_taken_over_at_once(sealer: Sealer) -> None:
    store = MemoryStore()
    holder = lease(store, sealer, "a")
    info = holder.acquire()
    # Another machine's holder (or one from before a reboot) is not judged by its pid.
    elsewhere = dataclasses.replace(info, pid=dead_pid(), boot_id="another-boot")
    store.put(layout.LEASE_NAME, holder.seal(elsewhere))
    with pytest.raises(LeaseHeldError, match="alive"):
        lease(store, sealer, "b").acquire(takeover=True)
    store.put(layout.LEASE_NAME, holder.seal(dataclasses.replace(info, pid=dead_pid())))
    lease(store, sealer, "b").acquire()  # a dead process on this machine holds nothing


def test_writes_stop_when_renewals_fail_for_too_long(sealer: Sealer) -> None:
    now = [100.0]
    store = MemoryStore()
    holder = lease(store, sealer, "a", monotonic=lambda: now[0])
    holder.acquire()
    fenced = FencedStore(store, holder)
    fenced.put("data/aa", b"x")
    now[0] += 60.0 * 0.8  # no successful renewal for most of the validity
    assert not holder.may_write()
    with pytest.raises(TransientStoreError):
        fenced.put("data/bb", b"x")
    assert holder.renew()  # renewing again (lease untouched) makes writes legal again
    fenced.put("data/bb", b"x")


def _race(store_url: str, sealer: Sealer, *, takeover: bool, n: int = 8) -> list[str]:
    barrier = threading.Barrier(n)
    winners: list[str] = []
    refused: list[str] = []

    def contender(i: int) -> None:
        mine = lease(open_store(store_url), sealer, f"c{i}")
        barrier.wait()
        try:
            mine.acquire(takeover=takeover)
            winners.append(mine.device_name)
        except LeaseHeldError:
            refused.append(mine.device_name)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(winners) + len(refused) == n
    return winners


def test_racing_writers_exactly_one_wins(any_source: str, sealer: Sealer) -> None:
    assert len(_race(any_source, sealer, takeover=False)) == 1
    # Everyone racing to take over one expired lease: still exactly one.
    store = open_store(any_source)
    store.put(layout.LEASE_NAME, lease(store, sealer, "x").seal(_expired_info(sealer)))
    assert len(_race(any_source, sealer, takeover=True)) == 1


def _expired_info(sealer: Sealer) -> LeaseInfo:
    crashed = lease(MemoryStore(), sealer, "crashed", clock=lambda: time.time() - HOUR)
    return crashed.acquire()


# --- real mounts -------------------------------------------------------------------------


@contextlib.contextmanager
def cleanup(device: Device, *mountpoints: Path) -> Iterator[None]:
    try:
        yield
    finally:
        for mnt in mountpoints:
            for pid in daemon_pids(mnt):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            with contextlib.suppress(AssertionError):
                unmount(device, mnt)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@needs_fuse
def test_exclusive_lease_keeps_writers_out_and_read_only_mounts_in(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    device.init(local_source)
    with cleanup(device, tmp_path / "mnt"), device.mounted(local_source, tmp_path / "mnt") as mnt:
        write_synced(mnt / "f", b"committed")
    store = open_store(local_source)
    unlocked = unlock(store, DeviceStore(device.home / "encfs-cloud"), None)
    repair = lease(store, Sealer(unlocked.fs_id, unlocked.keys), "fsck-elsewhere")
    repair.acquire()  # what fsck --repair or re-encryption on another machine holds
    other = tmp_path / "other"
    other.mkdir()
    try:
        with cleanup(device, other):
            refused = device.mount(local_source, other)
            assert refused.returncode == 12, refused.stderr
            assert "exclusive operation" in refused.stderr and "fsck-elsewhere" in refused.stderr
            with device.mounted(local_source, other, "ro") as ro:
                assert (ro / "f").read_bytes() == b"committed"
            repair.release()
            with device.mounted(local_source, other) as rw:
                write_synced(rw / "g", b"after the repair")
    finally:
        unlocked.wipe()


@needs_fuse
def test_crashed_mount_on_this_machine_taken_over(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    device.init(local_source)
    mnt = tmp_path / "mnt"
    with cleanup(device, mnt):
        mnt.mkdir()
        assert device.mount(local_source, mnt).returncode == 0
        write_synced(mnt / "f", b"survives")
        for pid in daemon_pids(mnt):
            os.kill(pid, signal.SIGKILL)
        force_unmount(mnt)
        # Its lease is still live by the clock, but its process is gone from this machine.
        done = device.mount(local_source, mnt)
        assert done.returncode == 0, done.stderr
        assert (mnt / "f").read_bytes() == b"survives"


@needs_fuse
def test_three_mount_processes_race(device: Device, s3_bucket: str, tmp_path: Path) -> None:
    device.init(s3_bucket)
    points = [tmp_path / f"m{i}" for i in range(3)]
    for p in points:
        p.mkdir()
    with cleanup(device, *points):
        procs = [
            subprocess.Popen(
                [MOUNT, s3_bucket, str(p)],
                env=device.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for p in points
        ]
        results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
        assert [code for code, _ in results] == [0, 0, 0], results  # writers side by side
        for n, p in enumerate(points):
            write_synced(p / f"f{n}", f"writer {n}".encode())
        for p in points:
            unmount(device, p)
    with device.mounted(s3_bucket, points[0]) as mnt:
        assert sorted(p.name for p in mnt.iterdir()) == ["f0", "f1", "f2"]
        assert (mnt / "f2").read_bytes() == b"writer 2"
