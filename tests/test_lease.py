"""The single-writer lease: API over memory/file/S3 stores, thread races, and real mounts."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from encfs_cloud import layout
from encfs_cloud.daemon.lease import FencedStore, Lease, LeaseInfo, LeaseKeeper
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
    is_mounted,
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


def test_keeper_reports_a_stolen_lease(sealer: Sealer) -> None:
    store = MemoryStore()
    holder = lease(store, sealer, "a")
    holder.acquire()
    thief = lease(store, sealer, "thief", clock=lambda: time.time() + HOUR)
    thief.acquire(takeover=True)  # its clock says the holder's lease is long expired
    lost: list[str] = []

    async def main() -> None:
        keeper = LeaseKeeper(holder, lost.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
        await keeper.stop_and_release()

    trio.run(main)
    assert lost and "'thief'" in lost[0]
    assert not holder.may_write()
    assert thief.renew()  # the loser's release left the thief's lease alone


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
def test_second_mount_refused_read_only_alongside(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    device.init(local_source)
    other = tmp_path / "other"
    other.mkdir()
    with cleanup(device, other), device.mounted(local_source, tmp_path / "mnt") as mnt:
        write_synced(mnt / "f", b"committed")
        refused = device.mount(local_source, other)
        assert refused.returncode == 12, refused.stderr
        assert "mounted read-write by device" in refused.stderr and "since" in refused.stderr
        assert "-o takeover" in refused.stderr
        live = device.mount(local_source, other, "takeover")
        assert live.returncode == 12 and "alive" in live.stderr
        with device.mounted(local_source, other, "ro") as ro:
            assert (ro / "f").read_bytes() == b"committed"
    # The clean unmount released the lease: the next writer needs no takeover.
    store = open_store(local_source)
    unlocked = unlock(store, DeviceStore(device.home / "encfs-cloud"), None)
    try:
        info, _ = lease(store, Sealer(unlocked.fs_id, unlocked.keys), "next").read()
    finally:
        unlocked.wipe()
    assert info is not None and info.released


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
def test_mount_that_lost_its_lease_turns_read_only(local_source: str, tmp_path: Path) -> None:
    device = Device(tmp_path / "dev", extra_env={"ENCFS_CLOUD_LEASE_SECONDS": "2"})
    device.init(local_source)
    first, second = tmp_path / "first", tmp_path / "second"
    log = tmp_path / "first.log"
    for m in (first, second):
        m.mkdir()
    with cleanup(device, first, second):
        assert device.mount(local_source, first, f"log={log}").returncode == 0
        write_synced(first / "before", b"1")
        (pid,) = daemon_pids(first)
        os.kill(pid, signal.SIGSTOP)  # a hung writer: no renewals
        deadline = time.monotonic() + 60
        while True:  # its lease expires after validity + clock skew
            done = device.mount(local_source, second, "takeover")
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            assert done.returncode == 12, done.stderr
            time.sleep(1)
        assert done.returncode == 0, done.stderr
        os.kill(pid, signal.SIGCONT)
        assert _wait_read_only(first / "probe"), "the first mount never turned read-only"
        assert (first / "before").read_bytes() == b"1"  # reads still work
        write_synced(second / "after", b"2")
        # Probes made before it noticed the loss are kept in its spool: umount says so (18).
        kept = bool(list(first.glob("probe*")))
        done = device.run("umount", str(first))
        assert done.returncode == (18 if kept else 0), done.stderr
        assert not is_mounted(first)
        unmount(device, second)
        assert "lost the single-writer lease" in log.read_text()
    # What the first mount changed before it noticed (a probe folder) was kept in its spool,
    # not dropped; it conflicts with the second writer's commit, so a read-write mount
    # refuses and says where the spool is; moved away, the device mounts again.
    spools = list((device.home / "encfs-cloud").glob("*/spool"))
    if spools:
        done = device.mount(local_source, first)
        if done.returncode == 0:
            unmount(device, first)
        assert done.returncode == 21 and "spool stays in" in done.stderr, done.stderr
        spools[0].rename(spools[0].with_name("spool.dropped"))
    with device.mounted(local_source, first) as mnt:
        assert sorted(p.name for p in mnt.iterdir()) == ["after", "before"]


def _wait_read_only(probe: Path) -> bool:
    deadline = time.monotonic() + 60
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            (probe.parent / f"{probe.name}{n}").mkdir()
        except OSError as exc:
            assert exc.errno == errno.EROFS, exc
            return True
        time.sleep(0.2)
    return False


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
        codes = sorted(code for code, _ in results)
        assert codes == [0, 12, 12], results
        winner = next(p for p, (code, _) in zip(points, results, strict=True) if code == 0)
        assert [is_mounted(p) for p in points].count(True) == 1
        write_synced(winner / "f", b"one writer")
        unmount(device, winner)
    with device.mounted(s3_bucket, points[0]) as mnt:
        assert (mnt / "f").read_bytes() == b"one writer"
