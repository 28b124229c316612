"""kill -9 during fsync'ed writes, remount, and every fsync'ed file is there, whole and exact."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.bucket_tamper import (
    fsync_dir,
    kill_daemon,
    mount_after_crash,
    pattern,
    tally_fixture,
)
from tests.fixtures_mount import Device, force_unmount, is_mounted, needs_fuse, unmount

pytestmark = [needs_fuse, pytest.mark.fuse]

STRESS = bool(os.environ.get("ENCFS_STRESS"))
# A stress run is long by design: past the suite-wide 300 s per-test timeout.
STRESS_MARKS = [pytest.mark.slow, pytest.mark.timeout(1800)]
CYCLES = 30 if STRESS else 2
WRITERS = 2
BLOCK = 4096
# After the daemon dies, a syscall on its mount fails with one of these.
DEAD_MOUNT = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENOENT}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def intended(path: Path) -> bytes:
    """What a file was being written with: its name says its size and seeds its content."""
    size = int(path.name.rsplit("-", 1)[1])
    return pattern(path.name, size)


@dataclass
class Ledger:
    """What the writers proved durable, kept outside the mount (relative path → sha256).

    A rename or unlink in progress is kept aside until its folders are fsync'ed: after a crash
    the file may be at either path (rename), or present or not (unlink), but nowhere else.
    """

    durable: dict[str, str] = field(default_factory=dict)
    renaming: dict[str, tuple[str, str]] = field(default_factory=dict)  # name → (old, new)
    unlinking: dict[str, str] = field(default_factory=dict)  # path → sha256
    lock: threading.Lock = field(default_factory=threading.Lock)
    stats: Counter[str] = field(default_factory=Counter)


class Writer(threading.Thread):
    """Creates, renames and deletes files with fsync, recording each once it is durable."""

    def __init__(self, mnt: Path, ledger: Ledger, wid: int, cycle: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.mnt = mnt
        self.ledger = ledger
        self.wid = wid
        self.cycle = cycle
        self.rng = random.Random(seed)
        self.killed = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            home = self.mnt / f"c{self.cycle:03d}-w{self.wid}"
            home.mkdir()
            fsync_dir(self.mnt)
            (home / "moved").mkdir()
            fsync_dir(home)
            n = 0
            while True:
                roll = self.rng.random()
                with self.ledger.lock:
                    mine = [p for p in self.ledger.durable if p.startswith(home.name + "/")]
                if roll < 0.12 and mine:
                    self._rename(self.rng.choice(mine))
                elif roll < 0.2 and mine:
                    self._unlink(self.rng.choice(mine))
                else:
                    self._create(home, n)
                    n += 1
        except OSError as exc:
            if not (self.killed.is_set() and exc.errno in DEAD_MOUNT):
                self.error = exc  # a failure while the daemon was alive is a bug
        except BaseException as exc:
            self.error = exc

    def _size(self) -> int:
        roll = self.rng.random()
        if roll < 0.5:
            return self.rng.randrange(0, 16 << 10)
        if roll < 0.85:
            return self.rng.randrange(16 << 10, 600 << 10)
        return self.rng.randrange(1 << 20, (5 << 20) // 2)

    def _create(self, home: Path, n: int) -> None:
        path = home / f"w{self.wid}-{n:05d}-{self._size()}"
        data = intended(path)
        with open(path, "wb") as f:
            pos = 0
            while pos < len(data):
                step = self.rng.choice([BLOCK, 64 << 10, 256 << 10])
                f.write(data[pos : pos + step])
                pos += step
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(home)
        with self.ledger.lock:
            self.ledger.durable[str(path.relative_to(self.mnt))] = sha256(data)
            self.ledger.stats["fsynced"] += 1

    def _rename(self, rel: str) -> None:
        old = self.mnt / rel
        folder = old.parent if old.parent.name != "moved" else old.parent.parent
        new = (folder if old.parent.name == "moved" else folder / "moved") / old.name
        with self.ledger.lock:
            digest = self.ledger.durable.pop(rel)
            self.ledger.renaming[old.name] = (rel, str(new.relative_to(self.mnt)))
        os.rename(old, new)
        fsync_dir(old.parent)
        fsync_dir(new.parent)
        with self.ledger.lock:
            del self.ledger.renaming[old.name]
            self.ledger.durable[str(new.relative_to(self.mnt))] = digest
            self.ledger.stats["renamed"] += 1

    def _unlink(self, rel: str) -> None:
        with self.ledger.lock:
            self.ledger.unlinking[rel] = self.ledger.durable.pop(rel)
        os.unlink(self.mnt / rel)
        fsync_dir((self.mnt / rel).parent)
        with self.ledger.lock:
            del self.ledger.unlinking[rel]
            self.ledger.stats["unlinked"] += 1


def verify(mnt: Path, ledger: Ledger) -> int:
    """Check the remounted tree against the ledger; returns how many durable files verified.

    Every durable file reads back exactly. A file caught mid-rename is at exactly one of its
    two paths; one caught mid-unlink is whole or gone. Any other file (written, not yet
    fsync'ed) holds no byte that was never written: each block is its own data or zeros.
    Every directory entry stats and opens (nothing dangles).
    """
    for name, (old, new) in list(ledger.renaming.items()):
        found = [p for p in (old, new) if (mnt / p).exists()]
        assert len(found) == 1, f"{name} mid-rename is at {found}, not at exactly one path"
        ledger.durable[found[0]] = sha256(intended(mnt / found[0]))
    ledger.renaming.clear()
    for rel, digest in list(ledger.unlinking.items()):
        if (mnt / rel).exists():
            ledger.durable[rel] = digest
    ledger.unlinking.clear()
    seen: set[str] = set()
    for folder, dirs, files in os.walk(mnt):
        for name in dirs + files:
            os.lstat(os.path.join(folder, name))
        for name in files:
            path = Path(folder) / name
            rel = str(path.relative_to(mnt))
            seen.add(rel)
            data = path.read_bytes()
            if rel in ledger.durable:
                assert sha256(data) == ledger.durable[rel], f"durable file {rel} changed"
                continue
            want = intended(path)
            assert len(data) <= len(want), f"{rel} is longer than ever written"
            for off in range(0, len(data), BLOCK):
                block = data[off : off + BLOCK]
                assert block in (want[off : off + len(block)], bytes(len(block))), (
                    f"{rel} holds bytes at {off} that were never written"
                )
    missing = sorted(set(ledger.durable) - seen)
    assert not missing, f"fsync'ed files lost: {missing[:5]} ({len(missing)} in all)"
    return len(ledger.durable)


tally = tally_fixture(
    lambda c: (
        f"[test_crash] kill cycles: {c['cycles']}, fsync'ed files verified: "
        f"{c['verified']} ({c['durable']} distinct), takeovers: {c['takeovers']}"
    )
)


@pytest.mark.parametrize(
    "cycles", [pytest.param(CYCLES, marks=STRESS_MARKS if STRESS else (), id=f"{CYCLES}")]
)
def test_sigkill_loses_no_fsynced_file(
    device: Device, any_source: str, tmp_path: Path, cycles: int, tally: Counter[str]
) -> None:
    seed = int(os.environ.get("ENCFS_SEED", time.time_ns() % 1_000_000))
    print(f"seed {seed} (ENCFS_SEED={seed} repeats this run)")
    rng = random.Random(seed)
    device.init(any_source)
    mnt = tmp_path / "mnt"
    ledger = Ledger()
    for cycle in range(cycles):
        took_over = mount_after_crash(device, any_source, mnt)
        tally["takeovers"] += took_over
        writers: list[Writer] = []
        try:
            tally["verified"] += verify(mnt, ledger)
            writers = [
                Writer(mnt, ledger, wid, cycle, rng.randrange(1 << 30)) for wid in range(WRITERS)
            ]
            for w in writers:
                w.start()
            time.sleep(rng.uniform(0.2, 2.0))
            for w in writers:
                w.killed.set()
            kill_daemon(mnt)
        finally:
            if is_mounted(mnt):
                force_unmount(mnt)
            for w in writers:
                w.killed.set()
                w.join(timeout=60)
                assert not w.is_alive(), "a writer hangs on the dead mount"
        for w in writers:
            assert w.error is None, f"writer {w.wid} failed while the daemon lived: {w.error!r}"
        tally["cycles"] += 1
    tally["takeovers"] += mount_after_crash(device, any_source, mnt)
    try:
        tally["verified"] += verify(mnt, ledger)
    finally:
        unmount(device, mnt)
    tally["durable"] += len(ledger.durable)
    print(f"ledger: {dict(ledger.stats)}, {len(ledger.durable)} durable files at the end")
    assert ledger.stats["fsynced"] > 0, "no file was fsync'ed before a kill: nothing was proved"
