"""A replayed old released lease: the second writer gets in, but no acknowledged data is lost."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from encfs_cloud import layout
from tests.bucket_tamper import pattern, write_synced
from tests.fixtures_mount import Device, needs_fuse
from tests.fixtures_s3 import MotoServer
from tests.test_devices_e2e import enroll

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.s3]


def _poll(check: object, what: str, timeout: float = 120.0) -> None:
    assert callable(check)
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.2)


def test_replayed_released_lease_costs_no_acknowledged_data(
    device: Device, s3_bucket: str, s3_env: MotoServer, tmp_path: Path
) -> None:
    bucket = s3_bucket.removeprefix("s3://")
    raw = s3_env.client()
    device.extra_env["ENCFS_CLOUD_LEASE_SECONDS"] = "8"  # renewals every 2 s
    device.init(s3_bucket)
    other = Device(tmp_path / "device-b", extra_env={"ENCFS_CLOUD_LEASE_SECONDS": "8"})
    enroll(device, other, s3_bucket, "intruder-side")
    mnt_a, mnt_b = tmp_path / "a", tmp_path / "b"
    log_a = tmp_path / "a.log"
    # A session that ends cleanly leaves a released lease: the bucket owner keeps a copy.
    with device.mounted(s3_bucket, mnt_a) as m:
        write_synced(m / "before.bin", pattern("before", 100_000))
    old_released = raw.get_object(Bucket=bucket, Key=layout.LEASE_NAME)["Body"].read()

    acked = pattern("acked", 300_000)
    with device.mounted(s3_bucket, mnt_a, "commit_interval=3600", f"log={log_a}") as m:
        (m / "acked.bin").write_bytes(acked)  # write() and close() succeeded: acknowledged
        raw.put_object(Bucket=bucket, Key=layout.LEASE_NAME, Body=old_released)  # the replay
        with other.mounted(s3_bucket, mnt_b):  # the second writer gets in on the replay
            _poll(lambda: "lost the single-writer lease" in log_a.read_text(), "A notices")
        # (A is unmounted here, by the context manager: its changes must go to the spool.)
    assert "local spool" in log_a.read_text()
    with device.mounted(s3_bucket, mnt_a) as m:  # the spool goes up at this mount
        assert (m / "acked.bin").read_bytes() == acked
        assert (m / "before.bin").read_bytes() == pattern("before", 100_000)


def test_spool_that_meets_the_other_writers_commits_is_kept(
    device: Device, s3_bucket: str, s3_env: MotoServer, tmp_path: Path
) -> None:
    """If the second writer committed meanwhile, the spool is neither uploaded over its
    commits nor dropped: the read-write mount refuses (exit 21) and says where it is."""
    bucket = s3_bucket.removeprefix("s3://")
    raw = s3_env.client()
    device.extra_env["ENCFS_CLOUD_LEASE_SECONDS"] = "8"
    device.init(s3_bucket)
    other = Device(tmp_path / "device-b", extra_env={"ENCFS_CLOUD_LEASE_SECONDS": "8"})
    enroll(device, other, s3_bucket, "second")
    mnt_a, mnt_b = tmp_path / "a", tmp_path / "b"
    log_a = tmp_path / "a.log"
    with device.mounted(s3_bucket, mnt_a):
        pass
    old_released = raw.get_object(Bucket=bucket, Key=layout.LEASE_NAME)["Body"].read()
    with device.mounted(s3_bucket, mnt_a, "commit_interval=3600", f"log={log_a}") as m:
        (m / "acked.bin").write_bytes(b"kept")
        raw.put_object(Bucket=bucket, Key=layout.LEASE_NAME, Body=old_released)
        with other.mounted(s3_bucket, mnt_b) as b:
            write_synced(b / "theirs.bin", b"theirs")
            _poll(lambda: "lost the single-writer lease" in log_a.read_text(), "A notices")
    mnt_a.mkdir(exist_ok=True)
    done = device.mount(s3_bucket, mnt_a)
    if done.returncode == 0:
        device.run("umount", str(mnt_a))
    assert done.returncode == 21, done.stderr
    assert "spool stays in" in done.stderr
    spool = next((device.home / "encfs-cloud").glob("*/spool"))
    assert any(p.name.split("-", 1)[1].startswith("meta@") for p in spool.iterdir())
    with device.mounted(s3_bucket, mnt_a, "ro") as m:
        assert (m / "theirs.bin").read_bytes() == b"theirs"
