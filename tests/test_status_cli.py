"""`status --json/--prometheus/--watch` from the real command, while the store works and fails."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import Fault, FaultProxy
from tests.fixtures_mount import ENCFS, Device, needs_fuse
from tests.fixtures_s3 import MotoServer

pytestmark = needs_fuse

METRIC = re.compile(r'^encfs_cloud_[a-z_]+\{mountpoint="[^"]+"\} -?[0-9.e+]+$')


@pytest.fixture
def proxy(s3_env: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_env.endpoint_url) as running:
        yield running


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _iso(text: str) -> datetime.datetime:
    when = datetime.datetime.fromisoformat(text)
    assert when.tzinfo is not None, text
    return when


def test_status_json_prometheus_and_an_unreachable_store(
    device: Device, s3_bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    device.init(s3_bucket)
    mnt = tmp_path / "mnt"
    options = (f"endpoint_url={proxy.endpoint_url}", "sync_timeout=3", "commit_interval=3600")
    with device.mounted(s3_bucket, mnt, *options):
        (mnt / "a.bin").write_bytes(os.urandom(1 << 20))
        _fsync(mnt / "a.bin")
        s = json.loads(device.run("status", str(mnt), "--json", check=True).stdout)
        assert not [t for t in _strings(s) if "ago" in t], s  # numbers and ISO times only
        _iso(s["time"])
        _iso(s["last_commit"]["time"])
        assert "lease" not in s  # mounts write side by side: only exclusive operations hold it
        assert s["store"]["reachable"] is True and s["store"]["last_error"] is None
        _iso(s["store"]["last_success"])

        text = device.run("status", str(mnt), "--prometheus", check=True).stdout
        samples = [line for line in text.splitlines() if not line.startswith("#")]
        assert samples and all(METRIC.match(line) for line in samples), text
        assert f'encfs_cloud_store_reachable{{mountpoint="{mnt}"}} 1' in samples
        assert any(line.startswith("encfs_cloud_last_commit_seq{") for line in samples)
        for name in {line.split("{")[0] for line in samples}:
            assert f"# TYPE {name} " in text and f"# HELP {name} " in text

        proxy.inject(Fault.HTTP_500, count=1_000_000)
        try:
            (mnt / "b.bin").write_bytes(os.urandom(1 << 20))
            with pytest.raises(OSError):
                _fsync(mnt / "b.bin")
            # The store layer retries for a while before it records a failure; a request left
            # unanswered long enough counts too. Either way status says so.
            deadline = time.monotonic() + 180
            while True:
                s = json.loads(device.run("status", str(mnt), "--json", check=True).stdout)
                if s["store"]["reachable"] is False or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert s["store"]["reachable"] is False, s["store"]
            _iso(s["store"]["failing_since"])
            assert s["store"]["last_error"]
            human = device.run("status", str(mnt), check=True).stdout
            assert "store:       UNREACHABLE since" in human, human
            prom = device.run("status", str(mnt), "--prometheus", check=True).stdout
            assert f'encfs_cloud_store_reachable{{mountpoint="{mnt}"}} 0' in prom
        finally:
            proxy.clear()
        _fsync(mnt / "b.bin")  # the store answers again
        s = json.loads(device.run("status", str(mnt), "--json", check=True).stdout)
        assert s["store"]["reachable"] is True


def test_status_watch_repeats_until_the_unmount(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    device.init(local_source)
    mnt = tmp_path / "mnt"
    out_path = tmp_path / "watch.out"
    with device.mounted(local_source, mnt), open(out_path, "w") as out:
        watch = subprocess.Popen(
            [ENCFS, "status", "--watch", "0.2", str(mnt)],
            env=device.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while out_path.read_text().count("last commit:") < 2:
                assert time.monotonic() < deadline and watch.poll() is None, out_path.read_text()
                time.sleep(0.1)
            done = device.run("umount", str(mnt))
            assert done.returncode == 0, done.stderr
            assert watch.wait(timeout=120) == 0
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
    shown = out_path.read_text()
    assert "\x1b[" not in shown  # not a terminal: no screen control
    assert shown.rstrip().endswith("no longer mounted"), shown
