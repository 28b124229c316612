"""A real mount over S3 through a faulty network: retries cure transient faults; outages surface."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bucket_tamper import fsync_dir, pattern, tally_fixture, write_synced
from tests.faultproxy import Fault, FaultProxy, Rule
from tests.fixtures_mount import Device, needs_fuse
from tests.fixtures_s3 import MotoServer

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.s3]

STRESS = bool(os.environ.get("ENCFS_STRESS"))
# A stress run is long by design: past the suite-wide 300 s per-test timeout.
STRESS_MARKS = [pytest.mark.slow, pytest.mark.timeout(1800)]
ROUNDS = 8 if STRESS else 1  # workloads, each meeting every fault of the plans below once
KIB, MIB = 1 << 10, 1 << 20
FILES = {"a.bin": MIB + MIB // 2, "b.bin": 700 * KIB, "c.bin": 2 * MIB + 123, "d": 5000}
DATA, META, MOUNTS, KEYS = r"/data/", r"/meta/", r"/mounts/", r"/keys/"
# One store call makes at most 6 attempts, and a read or a mount's replay is one call: a plan
# never lines up more than 5 faults for requests that may be one call's retries. Uploads and
# commits retry further up, so their plans hold every fault (HANG has a test of its own: it
# costs a whole read timeout). A cut body only means something for answers that have one.
EVERY_PUT_FAULT = [
    Fault.HTTP_500,
    Fault.SLOW_DOWN,
    Fault.RESET_BEFORE,
    Fault.RESET_DURING,
    Fault.RESET_AFTER,
    Fault.DELAY,
]
PUT_PLAN = {
    DATA: EVERY_PUT_FAULT,
    META: EVERY_PUT_FAULT,
    MOUNTS: [Fault.HTTP_500, Fault.RESET_BEFORE, Fault.RESET_AFTER],
}
GET_PLAN = {
    DATA: [Fault.HTTP_500, Fault.SLOW_DOWN, Fault.RESET_DURING, Fault.TRUNCATE, Fault.DELAY],
    META: [Fault.RESET_BEFORE, Fault.RESET_AFTER, Fault.TRUNCATE],
    KEYS: [Fault.HTTP_500, Fault.SLOW_DOWN, Fault.DELAY],
}
BOUND = 120.0  # generous: no single operation may take longer, whatever the faults


@pytest.fixture
def proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url) as p:
        yield p


tally = tally_fixture(
    lambda c: (
        f"[test_faults_mount] faults injected: {c['faults']}, "
        f"workloads completed: {c['workloads']}, fsyncs refused in outages: "
        f"{c['refused']}"
    )
)


def options(proxy: FaultProxy, log: Path, *extra: str) -> list[str]:
    # A hung request then costs 5 s rather than boto's default 30.
    # No disk cache: the reads after a remount must meet the GET faults, not local copies.
    return [
        f"endpoint_url={proxy.endpoint_url}",
        f"log={log}",
        "read_timeout=5",
        "disk_cache_size=0",
        *extra,
    ]


def write_files(mnt: Path, folder: str) -> None:
    (mnt / folder).mkdir(exist_ok=True)
    for name, size in FILES.items():
        with open(mnt / folder / name, "wb") as f:
            f.write(pattern(folder + name, size))
            os.fsync(f.fileno())
    fsync_dir(mnt / folder)


def check_files(mnt: Path, folder: str) -> None:
    for name, size in FILES.items():
        assert (mnt / folder / name).read_bytes() == pattern(folder + name, size), f"{name}"


def inject(proxy: FaultProxy, method: str, plan: dict[str, list[Fault]]) -> list[Rule]:
    return [
        proxy.inject(fault, count=1, method=method, path=path, delay=0.3, retry_after=0.2)
        for path, faults in plan.items()
        for fault in faults
    ]


def log_tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else "(no log)"


@contextlib.contextmanager
def explained(log: Path) -> Iterator[None]:
    """A failure in the block carries the end of the daemon's log."""
    try:
        yield
    except (AssertionError, OSError) as exc:
        raise AssertionError(f"{exc!r}\n--- daemon log ---\n{log_tail(log)}") from exc


@pytest.mark.parametrize(
    "rounds", [pytest.param(ROUNDS, marks=STRESS_MARKS if STRESS else (), id=f"{ROUNDS}")]
)
def test_workload_completes_through_faults(
    device: Device,
    s3_bucket: str,
    proxy: FaultProxy,
    tmp_path: Path,
    rounds: int,
    tally: Counter[str],
) -> None:
    """Writes, fsyncs, a remount's unlock and replay, and reads all meet every fault."""
    # Each mount advertises itself (a PUT under mounts/), which meets faults too.
    device.init(s3_bucket)
    log = tmp_path / "daemon.log"
    mnt = tmp_path / "mnt"
    for n in range(rounds):
        began = time.monotonic()
        rules = inject(proxy, "PUT", PUT_PLAN)
        with explained(log), device.mounted(s3_bucket, mnt, *options(proxy, log)) as m:
            write_files(m, f"r{n}")
        rules += inject(proxy, "GET", GET_PLAN)
        with explained(log), device.mounted(s3_bucket, mnt, *options(proxy, log)) as m:
            for done in range(n + 1):
                check_files(m, f"r{done}")
        assert time.monotonic() - began < 2 * BOUND
        unhit = [(r.fault.value, r.method, r.path and r.path.pattern) for r in rules if not r.hits]
        assert not unhit, f"faults never injected (no request matched): {unhit}"
        tally["faults"] += sum(r.hits for r in rules)
        tally["workloads"] += 1


HANG_RUNS = [pytest.param(2, marks=STRESS_MARKS, id="2")] if STRESS else [pytest.param(1, id="1")]


@pytest.mark.parametrize("hangs", HANG_RUNS)
def test_hung_requests_time_out_and_retry(
    device: Device,
    s3_bucket: str,
    proxy: FaultProxy,
    tmp_path: Path,
    hangs: int,
    tally: Counter[str],
) -> None:
    """A request the network swallows is abandoned after the read timeout and retried."""
    device.init(s3_bucket)
    log = tmp_path / "daemon.log"
    mnt = tmp_path / "mnt"
    with device.mounted(s3_bucket, mnt, *options(proxy, log)) as m:
        write_files(m, "h")
    hang = proxy.inject(Fault.HANG, count=hangs, method="GET", path=DATA)
    began = time.monotonic()
    with explained(log), device.mounted(s3_bucket, mnt, *options(proxy, log)) as m:
        check_files(m, "h")
    assert hang.hits == hangs
    assert time.monotonic() - began < BOUND, "a hung request held the mount too long"
    tally["faults"] += hang.hits
    tally["workloads"] += 1


def _fsync_until(path: Path, deadline: float) -> int:
    """fsync until it succeeds; returns how many attempts failed with EIO."""
    failed = 0
    while True:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            return failed
        except OSError as exc:
            assert exc.errno == errno.EIO, f"fsync failed with {exc!r}, not EIO"
            failed += 1
            assert time.monotonic() < deadline, "uploads did not resume after the outage"
            time.sleep(0.5)
        finally:
            os.close(fd)


def _fsync_refused(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as refused:
            os.fsync(fd)
    finally:
        os.close(fd)
    assert refused.value.errno == errno.EIO, f"fsync failed with {refused.value!r}, not EIO"


def outage_then_recovery(
    device: Device,
    s3_bucket: str,
    s3_server: MotoServer,
    tmp_path: Path,
    outage: str,
    tally: Counter[str],
    *,
    lasting: float = 0.0,
) -> None:
    """With the store down, writes still land in the cache but fsync says EIO (it does not
    pretend); the mount stays up for `lasting` seconds of outage at least; once the store is
    back, the same data uploads and survives a remount."""
    device.init(s3_bucket)
    log = tmp_path / "daemon.log"
    mnt = tmp_path / "mnt"
    proxy = FaultProxy(s3_server.endpoint_url).start()
    port = int(proxy.endpoint_url.rsplit(":", 1)[1])
    before = {"w/a.bin": pattern("a", MIB)}
    during = {"w/b.bin": pattern("b", 2 * MIB + 7), "w/c.bin": pattern("c", 3 * MIB)}
    try:
        with (
            explained(log),
            device.mounted(s3_bucket, mnt, *options(proxy, log, "sync_timeout=3")) as m,
        ):
            (m / "w").mkdir()
            write_synced(m / "w/a.bin", before["w/a.bin"])
            # The first commit is a snapshot, after which a background task lists meta/ to
            # drop older commits; let it finish (its failure has a test of its own, below).
            time.sleep(1.0)
            began = time.monotonic()
            if outage == "http500":
                down = proxy.inject(Fault.HTTP_500, count=1 << 30)
            else:
                proxy.stop()
            for name, data in during.items():
                (m / name).write_bytes(data)  # into the cache: no store needed
            _fsync_refused(m / "w/b.bin")
            assert time.monotonic() - began < BOUND
            tally["refused"] += 1
            time.sleep(max(0.0, began + lasting - time.monotonic()))
            assert sorted(os.listdir(m / "w")) == ["a.bin", "b.bin", "c.bin"]
            assert (m / "w/a.bin").read_bytes() == before["w/a.bin"]
            if outage == "http500":  # the store comes back
                tally["faults"] += down.hits
                proxy.clear()
            else:
                tally["faults"] += 1
                proxy = FaultProxy(s3_server.endpoint_url, port=port).start()
            _fsync_until(m / "w/b.bin", time.monotonic() + BOUND)
        with device.mounted(s3_bucket, mnt) as m:  # straight to the server: no proxy now
            for name, data in {**before, **during}.items():
                assert (m / name).read_bytes() == data, f"{name} lost: {log_tail(log)}"
        tally["workloads"] += 1
    finally:
        proxy.stop()


def test_outage_fails_fsync_then_resumes(
    device: Device, s3_bucket: str, s3_server: MotoServer, tmp_path: Path, tally: Counter[str]
) -> None:
    """Every request answered 500 for a while: a store that is up but failing."""
    outage_then_recovery(device, s3_bucket, s3_server, tmp_path, "http500", tally, lasting=2)


def test_unreachable_store_keeps_mount_alive(
    device: Device, s3_bucket: str, s3_server: MotoServer, tmp_path: Path, tally: Counter[str]
) -> None:
    """The endpoint refuses connections for longer than one call's retries (about 6 s)."""
    outage_then_recovery(device, s3_bucket, s3_server, tmp_path, "refused", tally, lasting=8)


def test_failed_cleanup_listing_keeps_mount_alive(
    device: Device, s3_bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    """After a snapshot commit, older commits are listed and deleted in the background; a
    store failing that listing must cost a warning, not the mount."""
    device.init(s3_bucket)
    log = tmp_path / "daemon.log"
    with device.mounted(s3_bucket, tmp_path / "mnt", *options(proxy, log)) as m:
        # Enough 500s to exhaust one call's retries: the listing after the first (snapshot)
        # commit fails for good.
        listing = proxy.inject(Fault.HTTP_500, count=6, method="GET", path=r"prefix=meta")
        with open(m / "x", "wb") as f:
            f.write(b"first commit")
            os.fsync(f.fileno())
        deadline = time.monotonic() + BOUND
        while listing.hits < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert listing.hits == 6
        time.sleep(1.0)  # the failed task has reached its end by now
        with open(m / "y", "wb") as f:
            f.write(b"still mounted")
            os.fsync(f.fileno())
        assert sorted(os.listdir(m)) == ["x", "y"], log_tail(log)
