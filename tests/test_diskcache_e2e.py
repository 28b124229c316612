"""Through a real mount: random rewrites inflate storage, fsck --repair compacts, bytes survive;
the disk cache serves a remount's re-read, takes a burst the bucket is too slow for, and
`umount --wipe` removes it."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faultproxy import Fault, FaultProxy
from tests.fixtures_mount import Device, needs_fuse
from tests.fixtures_s3 import MotoServer

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20
# file:// SOURCEs have no disk cache unless asked for (the bucket is on local disk already).
CACHE_ON = "disk_cache_size=64M"


def pack_bytes(bucket: Path) -> int:
    return sum(p.stat().st_size for p in (bucket / "data").iterdir())


def rewrite_randomly(path: Path, content: bytearray, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for _ in range(rounds):  # an fsync per round: a commit, so old chunks die for good
            for _ in range(8):
                off = rng.randrange(len(content) // 4096) * 4096
                piece = os.urandom(4096)
                content[off : off + 4096] = piece
                f.seek(off)
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())


def test_fsck_repair_compacts_random_rewrites(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    bucket = Path(local_source[len("file://") :])
    device.init(local_source)
    content = bytearray(os.urandom(24 * MiB))
    with device.mounted(local_source, tmp_path / "mnt", CACHE_ON) as mnt:
        (mnt / "db").write_bytes(content)
        rewrite_randomly(mnt / "db", content, 6, 1)
        status = json.loads(device.run("status", str(mnt), "--json", check=True).stdout)
        storage = status["storage"]
        assert storage["stored_bytes"] > 1.3 * storage["live_bytes"]
        text = device.run("status", str(mnt), check=True).stdout
        assert "live in" in text and "disk cache:" in text
    before = pack_bytes(bucket)
    assert before > 1.3 * len(content)
    done = device.run("fsck", local_source)
    assert done.returncode == 0 and "fsck --repair compacts them" in done.stdout, done.stdout
    done = device.run("fsck", local_source, "--repair", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compact" in done.stdout
    after = pack_bytes(bucket)
    assert after <= 1.05 * len(content), f"{before} → {after} for {len(content)}"
    done = device.run("fsck", local_source)
    assert done.returncode == 0 and "clean" in done.stdout, done.stdout
    with device.mounted(local_source, tmp_path / "mnt", "disk_cache_size=0") as mnt:
        assert (mnt / "db").read_bytes() == bytes(content)


def test_remount_reread_from_disk_cache_and_wipe_removes_it(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    """With the bucket's packs made unreadable, a remount still reads the file: from the disk
    cache, authenticated. `umount --wipe` then deletes the cache."""
    bucket = Path(local_source[len("file://") :])
    device.init(local_source)
    content = os.urandom(5 * MiB + 123)
    with device.mounted(local_source, tmp_path / "mnt", CACHE_ON) as mnt:
        (mnt / "f").write_bytes(content)
    hidden = tmp_path / "hidden"
    (bucket / "data").rename(hidden)  # a bucket read would now fail
    (bucket / "data").mkdir()
    with device.mounted(local_source, tmp_path / "mnt", CACHE_ON) as mnt:
        assert (mnt / "f").read_bytes() == content
        status = json.loads(device.run("status", str(mnt), "--json", check=True).stdout)
        assert status["disk_cache"]["hits"] > 0 and status["errors"]["read"] == 0
    (bucket / "data").rmdir()
    hidden.rename(bucket / "data")
    cache = device.cache_home / "encfs-cloud"
    assert any(p.is_file() for p in cache.rglob("*"))
    mnt = tmp_path / "mnt"
    done = device.mount(local_source, mnt, CACHE_ON)
    assert done.returncode == 0, done.stderr
    done = device.run("umount", "--wipe", str(mnt))  # the recovery key is left: not refused
    if done.returncode != 0:  # leave nothing mounted whatever happened
        device.run("umount", str(mnt))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [p for p in cache.rglob("*") if p.is_file()]


@pytest.fixture
def proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url) as p:
        yield p


@pytest.mark.slow  # make stress: the two-mount test below spills through FUSE in make test
def test_burst_spills_to_disk_while_uploads_are_slow(
    device: Device, s3_bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    """The first pack uploads hang for 20 s each; 48 MiB still go in (six times the 8 MiB
    dirty limit of cache_size=32M): the packs beyond it wait sealed on disk. fsync and the
    unmount wait for the bucket, and everything reads back from it."""
    device.init(s3_bucket)
    proxy.inject(Fault.DELAY, count=4, method="PUT", path=r"/data/", delay=20.0)
    opts = [f"endpoint_url={proxy.endpoint_url}", "cache_size=32M", f"log={tmp_path / 'log'}"]
    content = os.urandom(48 * MiB)
    with device.mounted(s3_bucket, tmp_path / "mnt", *opts) as mnt:
        with open(mnt / "burst", "wb") as f:
            for off in range(0, len(content), MiB):
                f.write(content[off : off + MiB])
            os.fsync(f.fileno())  # the bucket holds it all once this returns
        status = json.loads(device.run("status", str(mnt), "--json", check=True).stdout)
        assert status["disk_cache"]["bytes_spilled"] > 0, status
        assert status["disk_cache"]["spilled_bytes"] == 0, "fsync left spilled packs behind"
    with device.mounted(s3_bucket, tmp_path / "mnt", *opts, "disk_cache_size=0") as mnt:
        assert (mnt / "burst").read_bytes() == content


def test_two_mounts_of_one_device_share_the_cache_while_one_spills(
    device: Device, s3_bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    """Issue 11 on one device: two mount points, both with the default cache folder. The
    first spills (the bucket answers its pack uploads with SlowDown), the second starts
    meanwhile (before, a start deleted `spill/` and so the first's pending packs), writes
    and spills too; then the bucket takes everything and a cold third mount reads both."""
    device.init(s3_bucket)
    rule = proxy.inject(Fault.SLOW_DOWN, count=1 << 30, method="PUT", path=r"/data/")
    first = [f"endpoint_url={proxy.endpoint_url}", "cache_size=32M", f"log={tmp_path / 'a.log'}"]
    second = ["cache_size=32M", f"log={tmp_path / 'b.log'}", "commit_interval=3600"]
    a_data, b_data = os.urandom(40 * MiB), os.urandom(40 * MiB)
    with device.mounted(s3_bucket, tmp_path / "a", *first) as a:
        with open(a / "a.bin", "wb") as f:  # no fsync: the bucket refuses the packs
            for off in range(0, len(a_data), MiB):
                f.write(a_data[off : off + MiB])
        spill = next((device.cache_home / "encfs-cloud").glob("*/spill"))
        before = {p.name for p in spill.glob("*/*") if "." not in p.name}
        assert before and rule.hits > 0, "nothing spilled"
        with device.mounted(s3_bucket, tmp_path / "b", *second) as b:
            after = {p.name for p in spill.glob("*/*") if "." not in p.name}
            assert before <= after, "the second mount's start deleted spilled packs"
            with open(b / "b.bin", "wb") as f:
                for off in range(0, len(b_data), MiB):
                    f.write(b_data[off : off + MiB])
                os.fsync(f.fileno())  # b's uploads go straight to the bucket
            assert len(list(spill.iterdir())) == 2, "one spill folder per live mount"
            proxy.clear()  # the bucket takes the first mount's packs again
            fd = os.open(a / "a.bin", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    assert list(spill.iterdir()) == [], "a clean unmount leaves no spill folder"
    with device.mounted(s3_bucket, tmp_path / "c", "disk_cache_size=0") as c:
        assert (c / "a.bin").read_bytes() == a_data
        assert (c / "b.bin").read_bytes() == b_data
