"""Store deadlines end to end: real commands and a real mount against a silent or slow store."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bucket_tamper import pattern, write_synced
from tests.faultproxy import Fault, FaultProxy
from tests.fixtures_mount import ENCFS, Device, daemon_pids, force_unmount, is_mounted, needs_fuse
from tests.fixtures_s3 import MotoServer

pytestmark = [pytest.mark.s3]
UNREACHABLE = 10


@pytest.fixture
def proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url) as p:
        yield p


def run_on_terminal(
    cmd: list[str], env: dict[str, str], timeout: float, until: str | None = None
) -> tuple[int | None, str]:
    """Run `cmd` with stdout and stderr on a pseudo-terminal: (exit code, what it printed).

    With `until`, stop (and kill it: exit code None) once what it printed matches that regex."""
    main, sub = pty.openpty()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=sub, stderr=sub)
    os.close(sub)
    out = bytearray()
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            readable, _, _ = select.select([main], [], [], 1.0)
            if not readable:
                continue
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            out += chunk
            if until is not None and re.search(until, out.decode(errors="replace")):
                return None, out.decode(errors="replace")
        return proc.wait(timeout=max(1.0, end - time.monotonic())), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)


WAITING = r"waiting for (\S+) \(no answer for (\d+) s, attempt 1 of 6\)"


def test_a_silent_store_is_named_on_a_terminal_within_seconds(
    device: Device, s3_bucket: str, proxy: FaultProxy
) -> None:
    """On a terminal, a command says early what it is waiting for (issue 12: within 5 s)."""
    device.init(s3_bucket)
    proxy.inject(Fault.TRICKLE, count=1 << 30, delay=1.0)
    cmd = [ENCFS, "device", "list", s3_bucket, "--endpoint-url", proxy.endpoint_url]
    began = time.monotonic()
    code, out = run_on_terminal(cmd, device.env, timeout=120, until=WAITING)
    assert code is None, f"it ended (exit {code}) before saying what it waits for: {out}"
    first = re.search(WAITING, out)
    assert first is not None and first[1] == f"{s3_bucket}/", out
    assert int(first[2]) >= 5  # said after 5 s of silence (when exactly depends on the load)
    assert time.monotonic() - began < 60, out
    assert "Traceback" not in out, out


@pytest.mark.slow  # the whole 120 s budget: make stress (the store tests cut it in seconds)
@pytest.mark.timeout(600)
def test_trickling_store_fails_a_command_within_its_budget(
    device: Device, s3_bucket: str, proxy: FaultProxy
) -> None:
    """One byte every second never trips botocore's 30 s read timeout; the command still
    ends within its 120 s budget, as unreachable (exit 10), and says "waiting for" only on a
    terminal."""
    device.init(s3_bucket)
    rule = proxy.inject(Fault.TRICKLE, count=1 << 30, delay=1.0)
    cmd = [ENCFS, "device", "list", s3_bucket, "--endpoint-url", proxy.endpoint_url]
    results: dict[str, tuple[int | None, str, float]] = {}

    def on_terminal() -> None:
        began = time.monotonic()
        code, out = run_on_terminal(cmd, device.env, timeout=400)
        results["tty"] = (code, out, time.monotonic() - began)

    def piped() -> None:
        began = time.monotonic()
        done = device.run(*cmd[1:], timeout=400)
        results["pipe"] = (done.returncode, done.stderr, time.monotonic() - began)

    threads = [threading.Thread(target=on_terminal), threading.Thread(target=piped)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for kind in ("tty", "pipe"):
        code, out, took = results[kind]
        assert code == UNREACHABLE, f"{kind}: exit {code}: {out}"
        assert "did not answer" in out, out
        assert "Traceback" not in out, out
        # 120 s of budget, then the overdue attempt is cut; 250 s bounds it generously
        # (before, the same trickle held a command for more than 420 s).
        assert took < 250, f"{kind} took {took:.0f}s"
    assert re.search(WAITING, results["tty"][1]) is not None, results["tty"][1]
    assert "waiting for" not in results["pipe"][1]
    assert rule.aborted >= 2  # the client closed trickling connections, not just gave up


@needs_fuse
@pytest.mark.fuse
@pytest.mark.slow  # 40 s: make stress (make test kept within its 15 minutes)
@pytest.mark.timeout(600)
def test_unmount_in_an_outage_keeps_to_sync_timeout(
    device: Device, s3_bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    """With a store that swallows every request, unmount waits about sync_timeout (not the
    product of nested retry budgets: 264 s before), keeps the changes in the spool, and
    the next mount uploads them."""
    device.init(s3_bucket)
    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    data = pattern("outage", 3 << 20)
    opts = f"endpoint_url={proxy.endpoint_url},sync_timeout=15,log={log}"
    done = device.mount(s3_bucket, mnt, *opts.split(","))
    assert done.returncode == 0, done.stderr
    try:
        (mnt / "kept.bin").write_bytes(data)  # no fsync: it is still in memory
        hang = proxy.inject(Fault.HANG, count=1 << 30)
        began = time.monotonic()
        umount = device.run("umount", str(mnt), timeout=300)
        took = time.monotonic() - began
        deadline = time.monotonic() + 60
        while daemon_pids(mnt) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not daemon_pids(mnt), "the daemon outlived its unmount"
        assert not is_mounted(mnt), umount.stderr
        # A correctness bound on the one budget (3 x sync_timeout), not a speed figure.
        assert took < 45, f"unmount took {took:.0f}s: {log.read_text()[-2000:]}"
        assert hang.hits >= 1
        assert "spool" in log.read_text()
    finally:
        if is_mounted(mnt):
            force_unmount(mnt)
    proxy.clear()
    with device.mounted(s3_bucket, mnt) as m:  # straight to the server
        assert (m / "kept.bin").read_bytes() == data


@needs_fuse
@pytest.mark.fuse
@pytest.mark.timeout(600)
def test_sigterm_is_not_held_by_a_read_on_a_trickling_store(
    device: Device, s3_bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    """A cold read stuck on a store that trickles one byte a second, then SIGTERM: the read
    fails (EIO) and the daemon exits promptly (before: it ignored SIGTERM for minutes)."""
    device.init(s3_bucket)
    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    data = pattern("cold", 2 << 20)
    with device.mounted(s3_bucket, mnt) as m:
        write_synced(m / "cold.bin", data)
    # A fresh mount with an empty disk cache of its own: the first mount's sealed disk cache
    # would serve the re-read without a request, and the read must reach the store.
    cold = tmp_path / "cold-cache"
    opts = (
        f"endpoint_url={proxy.endpoint_url}",
        "sync_timeout=15",
        f"log={log}",
        f"cache_dir={cold}",
    )
    done = device.mount(s3_bucket, mnt, *opts)  # a fresh mount: nothing cached
    assert done.returncode == 0, done.stderr
    reader: subprocess.Popen[bytes] | None = None
    try:
        (pid,) = daemon_pids(mnt)
        rule = proxy.inject(Fault.TRICKLE_BODY, count=1 << 30, method="GET", path="/data/")
        reader = subprocess.Popen(["cat", str(mnt / "cold.bin")], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while rule.hits == 0:  # the read is stuck in a trickling GET
            assert time.monotonic() < deadline, "the read never reached the store"
            time.sleep(0.1)
        began = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        assert reader.wait(timeout=120) != 0  # EIO, not the file's bytes
        deadline = time.monotonic() + 120
        while daemon_pids(mnt) and time.monotonic() < deadline:
            time.sleep(0.2)
        took = time.monotonic() - began
        assert not daemon_pids(mnt), f"the daemon ignored SIGTERM: {log.read_text()[-2000:]}"
        assert took < 60, f"SIGTERM took {took:.0f}s"  # bounded, not a speed figure
        assert rule.aborted >= 1
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        if is_mounted(mnt):
            force_unmount(mnt)
