"""A store that stops answering: fsync gives EIO, unmount spools, the next mount uploads."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faultproxy import Fault, FaultProxy
from tests.fixtures_mount import Device, needs_fuse
from tests.fixtures_s3 import MotoServer

MARKER = b"spool-plaintext-marker-5b1c"


@pytest.fixture
def proxy(s3_env: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_env.endpoint_url) as running:
        yield running


def _store_down(proxy: FaultProxy) -> None:
    proxy.inject(Fault.HTTP_500, count=1_000_000)


@needs_fuse
def test_outage_spools_and_next_mount_uploads(
    device: Device, s3_bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    device.init(s3_bucket)
    mnt = tmp_path / "mnt"
    options = (f"endpoint_url={proxy.endpoint_url}", "sync_timeout=3", "commit_interval=3600")
    with device.mounted(s3_bucket, mnt, *options):
        (mnt / "before.bin").write_bytes(MARKER * 1000)
        fd = os.open(mnt / "before.bin", os.O_RDONLY)
        try:
            os.fsync(fd)  # the store still answers: durable
        finally:
            os.close(fd)
        _store_down(proxy)
        payload = os.urandom(3 << 20) + MARKER
        (mnt / "during.bin").write_bytes(payload)  # goes into the cache
        fd = os.open(mnt / "during.bin", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as failed:
                os.fsync(fd)  # must not pretend the data is in the bucket
            assert failed.value.errno == errno.EIO
        finally:
            os.close(fd)
        # The unmount cannot reach the store: it says so and exits with its own code.
        done = device.run("umount", str(mnt))
        assert done.returncode == 18, done.stderr
        assert "kept sealed in" in done.stderr and "/spool" in done.stderr, done.stderr
        assert "next mount" in done.stderr
    # The changes wait, sealed, in the spool.
    fs_dirs = [p for p in (device.home / "encfs-cloud").iterdir() if p.is_dir()]
    spooled = [f for d in fs_dirs for f in (d / "spool").glob("*")]
    assert spooled, "nothing was spooled"
    for path in spooled:
        assert MARKER not in path.read_bytes(), f"plaintext in spool file {path.name}"
    proxy.clear()
    with device.mounted(s3_bucket, mnt, f"endpoint_url={proxy.endpoint_url}"):
        assert (mnt / "during.bin").read_bytes() == payload
        assert (mnt / "before.bin").read_bytes() == MARKER * 1000
    assert not any((d / "spool").exists() for d in fs_dirs)
