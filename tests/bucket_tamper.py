"""Helpers for the attack, crash and fault tests: a hostile bucket owner, a killed daemon."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from encfs_cloud import layout
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.keys.vault import unlock
from encfs_cloud.store import StoreOptions, open_store
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree.journal import replay
from encfs_cloud.tree.metadata import ChunkRef
from tests.fixtures_mount import Device, daemon_pids, force_unmount
from tests.fixtures_s3 import MotoServer, empty_bucket, point_aws_chain_at

Snapshot = dict[str, bytes]  # object name → its bytes: a saved copy of the whole bucket


class Bucket:
    """Raw access to every object of a file:// folder or an S3 bucket, with no keys at all.

    This is the attacker's view: names and bytes. It goes through the project's own store
    backends only because they already speak both protocols; nothing here is sealed or opened.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @classmethod
    def open(cls, source: str, endpoint_url: str | None = None) -> Bucket:
        return cls(open_store(source, StoreOptions(endpoint_url=endpoint_url)))

    def names(self, prefix: str = "") -> list[str]:
        return [info.name for info in self.store.list(prefix)]

    def get(self, name: str) -> bytes:
        return self.store.get(name)

    def put(self, name: str, data: bytes) -> None:
        self.store.put(name, data)

    def delete(self, name: str) -> None:
        self.store.delete(name)

    # --- editing one object ----------------------------------------------------------------

    def flip_bit(self, name: str, offset: int, bit: int = 0) -> None:
        self.flip_bits(name, [(offset, bit)])

    def flip_bits(self, name: str, spots: list[tuple[int, int]]) -> None:
        """Flip bit `bit` of byte `offset` for each (offset, bit): one read, one write."""
        data = bytearray(self.get(name))
        for offset, bit in spots:
            data[offset] ^= 1 << bit
        self.put(name, bytes(data))

    def truncate(self, name: str, length: int) -> None:
        self.put(name, self.get(name)[:length])

    def write_range(self, name: str, offset: int, chunk: bytes) -> None:
        """Overwrite bytes [offset, offset+len(chunk)) of an object, keeping its length."""
        data = bytearray(self.get(name))
        if offset + len(chunk) > len(data):
            raise ValueError("write_range would grow the object")
        data[offset : offset + len(chunk)] = chunk
        self.put(name, bytes(data))

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self.get(name)[offset : offset + length]

    def swap_ranges(self, name_a: str, off_a: int, name_b: str, off_b: int, length: int) -> None:
        """Exchange two equally long byte ranges, inside one object or between two."""
        a = self.read_range(name_a, off_a, length)
        b = self.read_range(name_b, off_b, length)
        if len(a) != length or len(b) != length:
            raise ValueError("a range to swap runs past the end of its object")
        if name_a == name_b and abs(off_a - off_b) < length:
            raise ValueError("overlapping ranges")
        self.write_range(name_a, off_a, b)
        self.write_range(name_b, off_b, a)

    def swap_objects(self, name_a: str, name_b: str) -> None:
        a, b = self.get(name_a), self.get(name_b)
        self.put(name_a, b)
        self.put(name_b, a)

    def edit_json(self, name: str, change: Any) -> None:
        """Parse a JSON object, let `change(doc)` edit it in place, and store it back."""
        doc = json.loads(self.get(name))
        change(doc)
        self.put(name, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())

    # --- the whole bucket ------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return {name: self.get(name) for name in self.names()}

    def restore(self, saved: Snapshot) -> None:
        """Roll the bucket back to `saved`: newer objects go, older bytes come back."""
        for name in self.names():
            if name not in saved:
                self.delete(name)
        for name, data in saved.items():
            self.put(name, data)

    # --- what lies where -------------------------------------------------------------------

    def commits(self) -> list[str]:
        """The metadata commit objects, oldest first."""
        named = [(layout.commit_seq(n), n) for n in self.names(layout.META_PREFIX)]
        return [n for seq, n in sorted((s, n) for s, n in named if s is not None)]

    def packs(self) -> list[str]:
        return self.names(layout.DATA_PREFIX)


@dataclass(frozen=True)
class Chunk:
    """Where one chunk of a file lies: pack object, byte range, and its identity."""

    ino: int
    idx: int
    ref: ChunkRef

    @property
    def object(self) -> str:
        return layout.pack_name(self.ref.pack)

    @property
    def off(self) -> int:
        return self.ref.off

    @property
    def len(self) -> int:
        return self.ref.len


def chunk_map(bucket: Bucket, device_home: Path, inodes: list[int]) -> dict[int, list[Chunk]]:
    """Every chunk of the given inodes, read from the newest metadata with the device's keys.

    Only a test needs this: it aims an attack at one file's chunk. It may run while mounted:
    the key checks any unlock records go through the device's state lock, as the daemon's do.
    """
    devices = DeviceStore(device_home / "encfs-cloud")
    unlocked = unlock(bucket.store, devices, None)
    try:
        md, _, _ = replay(bucket.store, Sealer(unlocked.fs_id, unlocked.keys))
        try:
            found: dict[int, list[Chunk]] = {}
            for ino in inodes:
                chunks = []
                for idx in sorted(md.chunk_indices(ino)):
                    ref = md.get_chunk(ino, idx)
                    assert ref is not None
                    chunks.append(Chunk(ino, idx, ref))
                found[ino] = chunks
            return found
        finally:
            md.db.close()
    finally:
        unlocked.wipe()


def device_id_of(init_output: str) -> str:
    """The device id `encfs-cloud init` printed."""
    for line in init_output.splitlines():
        if line.startswith("device id:"):
            return line.split(":", 1)[1].strip()
    raise ValueError("init printed no device id")


def pattern(name: str, size: int) -> bytes:
    """Deterministic, incompressible content for a test file, derived from its name."""
    return hashlib.shake_256(name.encode()).digest(size) if size else b""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def report(config: pytest.Config, line: str) -> None:
    """Print a summary line past output capture, so a run's log shows what was proved."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write("\n")
        reporter.write_line(line)


def tally_fixture(summary: Callable[[Counter[str]], str]) -> Any:
    """A module-scoped `tally` fixture: a Counter the tests fill, one summary line at the end."""

    @pytest.fixture(scope="module")
    def tally(request: pytest.FixtureRequest) -> Iterator[Counter[str]]:
        counts: Counter[str] = Counter()
        yield counts
        report(request.config, summary(counts))

    return tally


# --- the daemon dies: SIGKILL, clean-up, and the remount that must need no manual step ---------

LEASE_HELD_EXIT = 12


def kill_daemon(mountpoint: Path) -> None:
    """SIGKILL the daemon of `mountpoint` (no flush, no lease release), then clear the mount."""
    pids = daemon_pids(mountpoint)
    assert len(pids) == 1, f"expected one daemon for {mountpoint}, found {pids}"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pids[0], signal.SIGKILL)
    force_unmount(mountpoint)


def mount_after_crash(device: Device, source: str, mountpoint: Path, *options: str) -> bool:
    """Mount again after a crash; True if the dead writer's lease had to be taken over."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = device.mount(source, mountpoint, *options)
    took_over = False
    if done.returncode == LEASE_HELD_EXIT:
        # The lease names a process that is gone: taking it over is the documented way in.
        took_over = True
        done = device.mount(source, mountpoint, "takeover", *options)
    if done.returncode != 0:
        force_unmount(mountpoint)
        raise AssertionError(f"remount failed ({done.returncode}): {done.stderr.strip()}")
    return took_over


# --- sources for module-scoped worlds, and writing what must be durable ------------------------


class Sources:
    """Fresh, empty file:// folders or S3 buckets, with the environment the CLI needs."""

    def __init__(self, kind: str, base: Path, server: MotoServer | None) -> None:
        self.kind = kind
        self.base = base
        self.server = server
        self.buckets: list[str] = []

    def new(self, name: str) -> str:
        if self.server is None:
            folder = self.base / f"bucket-{name}"
            folder.mkdir()
            return f"file://{folder}"
        bucket = f"attack-{name}-{uuid.uuid4().hex[:12]}"
        self.server.client().create_bucket(Bucket=bucket)
        self.buckets.append(bucket)
        return f"s3://{bucket}"

    def close(self) -> None:
        if self.server is not None:
            for bucket in self.buckets:
                empty_bucket(self.server.client(), bucket)
                self.server.client().delete_bucket(Bucket=bucket)


@contextlib.contextmanager
def open_sources(kind: str, request: pytest.FixtureRequest, base: Path) -> Iterator[Sources]:
    """Sources of `kind` ("file" or "s3") for the body of a with-block (a module fixture)."""
    if kind == "file":
        yield Sources("file", base, None)
        return
    server: MotoServer = request.getfixturevalue("s3_server")
    # The same environment as the s3_env fixture, for a whole module (it is function-scoped).
    with pytest.MonkeyPatch.context() as mp:
        point_aws_chain_at(mp, base, server.endpoint_url)
        found = Sources("s3", base, server)
        try:
            yield found
        finally:
            found.close()


def write_synced(path: Path, data: bytes) -> None:
    """Write, fsync the file and its folder: after this the bytes are in the bucket."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def read_errno(path: Path) -> int | None:
    """The errno reading the whole file fails with, or None if it reads."""
    try:
        path.read_bytes()
    except OSError as exc:
        return exc.errno
    return None
