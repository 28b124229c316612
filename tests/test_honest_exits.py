"""Honest exits from the real commands: umount's verdict, and what Ctrl-C says was done."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faultproxy import Fault, FaultProxy
from tests.fixtures_mount import ENCFS, Device, daemon_pids, is_mounted, needs_fuse
from tests.fixtures_s3 import MotoServer

pytestmark = needs_fuse


@pytest.fixture
def proxy(s3_env: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_env.endpoint_url) as running:
        yield running


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _interrupt(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_interrupted_umount_says_the_daemon_goes_on(
    device: Device, s3_bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    device.init(s3_bucket)
    mnt = tmp_path / "mnt"
    payload = os.urandom(2 << 20)
    options = (f"endpoint_url={proxy.endpoint_url}", "sync_timeout=600", "commit_interval=3600")
    with device.mounted(s3_bucket, mnt, *options):
        (mnt / "late.bin").write_bytes(payload)
        proxy.inject(Fault.HTTP_500, count=1_000_000)  # the final upload cannot finish yet
        daemons = daemon_pids(mnt)
        umount = subprocess.Popen(
            [ENCFS, "umount", str(mnt)],
            env=device.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for(lambda: not is_mounted(mnt), "the kernel to detach the mount")
            code, err = _interrupt(umount)
        finally:
            if umount.poll() is None:
                umount.kill()
                umount.wait()
        assert code == 130, err
        assert "goes on uploading" in err and "in the background" in err, err
        assert "nothing was changed" not in err
        # And so it does: once the store answers again it finishes and exits alone.
        proxy.clear()
        _wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in daemons), "the daemon")
    with device.mounted(s3_bucket, mnt, f"endpoint_url={proxy.endpoint_url}"):
        assert (mnt / "late.bin").read_bytes() == payload


def test_interrupted_salvage_says_what_it_wrote_where(
    device: Device, s3_bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    device.init(s3_bucket)
    mnt = tmp_path / "mnt"
    with device.mounted(s3_bucket, mnt, f"endpoint_url={proxy.endpoint_url}"):
        for n in range(40):
            (mnt / f"f{n:02d}.bin").write_bytes(os.urandom(4096) * 8)
    dest = tmp_path / "rescued"
    # Every data read answers late, so the copy is still running when Ctrl-C comes.
    proxy.inject(Fault.DELAY, count=1_000_000, method="GET", delay=2.0)
    salvage = subprocess.Popen(
        [ENCFS, "salvage", "--endpoint-url", proxy.endpoint_url, s3_bucket, str(dest)],
        env=device.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: dest.is_dir() and any(dest.iterdir()), "salvage to write a file")
        code, err = _interrupt(salvage)
    finally:
        if salvage.poll() is None:
            salvage.kill()
            salvage.wait()
    assert code == 130, err
    assert "nothing was changed" not in err
    written = sum(1 for p in dest.rglob("*") if p.is_file())
    assert f"interrupted: {written} files" in err, err
    assert str(dest) in err and "salvage command again to resume" in err, err
    # And so it does: the same command into the same folder completes the copy.
    proxy.clear()
    done = device.run("salvage", "--endpoint-url", proxy.endpoint_url, s3_bucket, str(dest))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in dest.iterdir()) == [f"f{n:02d}.bin" for n in range(40)]
    assert all(p.stat().st_size == 4096 * 8 for p in dest.iterdir())
    # A folder that no salvage left behind is still refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    refused = device.run("salvage", "--endpoint-url", proxy.endpoint_url, s3_bucket, str(other))
    assert refused.returncode == 2 and (other / "mine.txt").read_text() == "keep"


def test_interrupted_reencrypt_says_a_rerun_resumes(
    device: Device, second_device: Device, s3_bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    from tests.test_devices_e2e import enroll

    device.init(s3_bucket)
    phone = enroll(device, second_device, s3_bucket, "phone")
    mnt = tmp_path / "mnt"
    with device.mounted(s3_bucket, mnt, f"endpoint_url={proxy.endpoint_url}"):
        for n in range(3):  # three commits: three packs under generation 1
            (mnt / f"f{n}.bin").write_bytes(os.urandom(3 << 20))
            fd = os.open(mnt / f"f{n}.bin", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    device.run("device", "revoke", s3_bucket, phone, "--yes", check=True)
    # Pack uploads answer late, so Ctrl-C comes while the rewrite is under way.
    slow = proxy.inject(Fault.DELAY, count=1_000_000, method="PUT", path="/data/", delay=2.0)
    cmd = [ENCFS, "device", "reencrypt", "--endpoint-url", proxy.endpoint_url, s3_bucket]
    run = subprocess.Popen(
        cmd,
        env=device.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: slow.hits >= 1, "the first pack upload")
        code, err = _interrupt(run)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert code == 130, err
    assert "nothing was changed" not in err
    assert "device reencrypt SOURCE again to resume" in err, err
    proxy.clear()
    done = device.run("device", "reencrypt", s3_bucket)
    assert done.returncode == 0, done.stderr
    fsck = device.run("fsck", s3_bucket)
    assert fsck.returncode == 0 and "clean" in fsck.stdout, fsck.stdout + fsck.stderr
