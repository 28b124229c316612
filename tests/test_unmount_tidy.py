"""Unmount tidies up: packs freed by the final commit are deleted before the lease goes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs_cloud import layout
from tests.faultproxy import Fault, FaultProxy
from tests.fixtures_mount import Device, needs_fuse
from tests.fixtures_s3 import MotoServer


@pytest.fixture
def proxy(s3_env: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_env.endpoint_url) as running:
        yield running


def _packs(server: MotoServer, s3_bucket: str) -> set[str]:
    bucket = s3_bucket.removeprefix("s3://").split("/")[0]
    listed = server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"] for o in listed if layout.DATA_PREFIX in o["Key"]}


@needs_fuse
def test_packs_freed_by_the_last_commit_are_deleted_at_unmount(
    device: Device, s3_bucket: str, s3_env: MotoServer, proxy: FaultProxy, tmp_path: Path
) -> None:
    device.init(s3_bucket)
    log = tmp_path / "mount.log"
    options = (f"endpoint_url={proxy.endpoint_url}", "commit_interval=3600", f"log={log}")
    with device.mounted(s3_bucket, tmp_path / "mnt", *options) as mnt:
        # More than two packs, so several deletions run after the final commit.
        (mnt / "doomed.bin").write_bytes(os.urandom(3 * layout.PACK_TARGET))
        fd = os.open(mnt / "doomed.bin", os.O_RDONLY)
        try:
            os.fsync(fd)  # its packs are committed
        finally:
            os.close(fd)
        before = _packs(s3_env, s3_bucket)
        assert len(before) >= 3
        (mnt / "doomed.bin").unlink()  # only the final commit at unmount frees them
        # Deletions answer late, as over a slow link: the unmount must wait for them.
        proxy.inject(Fault.DELAY, count=1000, method="DELETE", delay=1.0)
    assert not (before & _packs(s3_env, s3_bucket)), "freed packs were left in the bucket"
    assert "could not delete" not in log.read_text()
    fsck = device.run("fsck", "--endpoint-url", s3_env.endpoint_url, s3_bucket)
    assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout + fsck.stderr
    # The tree forgot them too: the next mount counts as stored only what the bucket holds.
    with device.mounted(s3_bucket, tmp_path / "mnt", f"endpoint_url={proxy.endpoint_url}") as again:
        status = json.loads(device.run("status", str(again), "--json", check=True).stdout)
    assert status["storage"]["stored_bytes"] == _pack_bytes(s3_env, s3_bucket)


def _pack_bytes(server: MotoServer, s3_bucket: str) -> int:
    bucket = s3_bucket.removeprefix("s3://").split("/")[0]
    listed = server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return sum(o["Size"] for o in listed if layout.DATA_PREFIX in o["Key"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@needs_fuse
def test_freed_packs_wait_for_another_live_mount_and_go_with_the_last(
    device: Device, s3_bucket: str, s3_env: MotoServer, tmp_path: Path
) -> None:
    """With another mount live, the unmount leaves what it freed for that mount: the last
    one to pass the freeing commit deletes it at its own unmount."""
    device.init(s3_bucket)
    # Two mount points of one device, sharing its default disk cache folder.
    first = ("commit_interval=3600", f"log={tmp_path / 'a.log'}")
    other = ("poll_interval=1", f"log={tmp_path / 'b.log'}")
    with device.mounted(s3_bucket, tmp_path / "b", *other) as b:
        with device.mounted(s3_bucket, tmp_path / "a", *first) as a:
            (a / "doomed.bin").write_bytes(os.urandom(3 * layout.PACK_TARGET))
            _fsync(a / "doomed.bin")
            before = _packs(s3_env, s3_bucket)
            assert len(before) >= 3
            (a / "doomed.bin").unlink()  # freed by the final commit at unmount
        assert before <= _packs(s3_env, s3_bucket), "deleted while another mount was live"
        assert "stay for the other live mounts" in (tmp_path / "a.log").read_text()
        deadline = time.monotonic() + 120
        while (b / "doomed.bin").exists():  # b applies a's final commit
            assert time.monotonic() < deadline, "the other mount never saw the deletion"
            time.sleep(0.5)
        (b / "note.txt").write_text("b commits at unmount, naming the freed packs dead")
    assert not (before & _packs(s3_env, s3_bucket)), "the last mount left the freed packs"
    fsck = device.run("fsck", "--endpoint-url", s3_env.endpoint_url, s3_bucket)
    assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout + fsck.stderr
