"""A hostile bucket owner flips, swaps, cuts, deletes and replays file data: reads say EIO."""

from __future__ import annotations

import errno
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.bucket_tamper import (
    Bucket,
    Chunk,
    Sources,
    chunk_map,
    kill_daemon,
    mount_after_crash,
    open_sources,
    pattern,
    read_errno,
    tally_fixture,
    write_synced,
)
from tests.fixtures_mount import Device, needs_fuse, unmount

pytestmark = [needs_fuse, pytest.mark.fuse]

MIB = 1 << 20
STRESS = bool(os.environ.get("ENCFS_STRESS"))
FUZZ_FLIPS = 200 if STRESS else 12
# Attacks on the bucket must be read from it: this device's sealed disk cache still holds the
# authentic bytes it wrote (test_diskcache.py attacks the cache itself).
BUCKET_READS = "disk_cache_size=0"


# --- shared set-up: one filesystem per source and purpose, built once per module -------------


@pytest.fixture(scope="module", params=["file", "s3"])
def sources(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sources]:
    """Data attacks run over both backends: how a ranged read of a cut object ends differs."""
    with open_sources(request.param, request, tmp_path_factory.mktemp(request.param)) as found:
        yield found


@pytest.fixture(scope="module")
def file_sources(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sources]:
    with open_sources("file", request, tmp_path_factory.mktemp("file-only")) as found:
        yield found


tally = tally_fixture(
    lambda c: f"[test_attacks] attacks: {c['tried']} tried, {c['detected']} detected"
)


# --- attacks on file data ---------------------------------------------------------------------

# Each group is written and then committed (fsync), so it fills pack(s) of its own: deleting
# or cutting a pack then hits that group's files only, and never the control files.
FILE_GROUPS: list[dict[str, int]] = [
    {
        "bitflip.bin": 2 * MIB,
        "swapself.bin": 2 * MIB,
        "swap_a.bin": MIB,
        "swap_b.bin": MIB,
        "small.bin": 10_000,
    },
    {"control/keep.bin": MIB + 5000, "control/deeper/note.txt": 300, "control/empty": 0},
    {"tail.bin": 3 * MIB},
    {"replay.bin": MIB},
    {"gone.bin": MIB + MIB // 2},
    {"cut.bin": 2 * MIB},
]


@dataclass
class DataWorld:
    device: Device
    mnt: Path
    log: Path
    contents: dict[str, bytes]
    inodes: dict[str, int]
    victims: dict[str, list[tuple[str, Chunk]]] = field(default_factory=dict)  # attack → files

    def log_names(self, ino: int, obj: str) -> bool:
        wanted = re.compile(rf"\binode {ino}\b.*\b{re.escape(obj)}\b")
        return any(wanted.search(line) for line in self.log.read_text().splitlines())

    def check_rest_usable(self) -> None:
        for name, data in self.contents.items():
            if name.startswith("control/"):
                assert (self.mnt / name).read_bytes() == data, f"{name} no longer reads"
        assert sorted(os.listdir(self.mnt / "control")) == ["deeper", "empty", "keep.bin"]
        probe = self.mnt / f"probe-{uuid.uuid4().hex[:8]}"
        write_synced(probe, b"still writable")
        assert probe.read_bytes() == b"still writable"


def _attack_data(
    bucket: Bucket, chunks: dict[str, list[Chunk]], old_replay: bytes
) -> dict[str, list[tuple[str, Chunk]]]:
    """Apply every data attack; returns, per attack, the files it hits and a chunk it changed."""
    flip = chunks["bitflip.bin"][1]
    bucket.flip_bit(flip.object, flip.off + flip.len // 2, 3)

    c0, c1 = chunks["swapself.bin"]
    assert c0.object == c1.object and c0.len == c1.len
    bucket.swap_ranges(c0.object, c0.off, c1.object, c1.off, c0.len)

    a, b = chunks["swap_a.bin"][0], chunks["swap_b.bin"][0]
    assert a.len == b.len
    bucket.swap_ranges(a.object, a.off, b.object, b.off, a.len)

    last = chunks["tail.bin"][-1]
    bucket.truncate(last.object, last.off)  # the last chunk (and the padding) is gone

    new = chunks["replay.bin"][0]
    assert len(old_replay) == new.len
    bucket.write_range(new.object, new.off, old_replay)

    gone = chunks["gone.bin"][0]
    assert {c.object for c in chunks["gone.bin"]} == {gone.object}
    bucket.delete(gone.object)

    cut = chunks["cut.bin"][0]
    bucket.truncate(cut.object, cut.off + cut.len // 2)

    small = chunks["small.bin"][0]
    bucket.flip_bit(small.object, small.off + small.len - 1, 7)  # inside the GCM tag
    return {
        "bit flipped in a chunk": [("bitflip.bin", flip)],
        "chunk swapped within its file": [("swapself.bin", c0)],
        "chunks swapped between two files": [("swap_a.bin", a), ("swap_b.bin", b)],
        "trailing chunk cut off": [("tail.bin", last)],
        "chunk replaced by its older version": [("replay.bin", new)],
        "pack deleted": [("gone.bin", gone)],
        "pack truncated": [("cut.bin", cut)],
        "tag of a small file flipped": [("small.bin", small)],
    }


DATA_ATTACKS = [
    "bit flipped in a chunk",
    "chunk swapped within its file",
    "chunks swapped between two files",
    "trailing chunk cut off",
    "chunk replaced by its older version",
    "pack deleted",
    "pack truncated",
    "tag of a small file flipped",
]


@pytest.fixture(scope="module")
def data_world(sources: Sources, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataWorld]:
    base = tmp_path_factory.mktemp(f"data-{sources.kind}")
    device = Device(base / "device")
    source = sources.new("data")
    device.init(source)
    bucket = Bucket.open(source)
    contents = {name: os.urandom(size) for group in FILE_GROUPS for name, size in group.items()}
    mnt = base / "mnt"
    with device.mounted(source, mnt) as m:
        (m / "control" / "deeper").mkdir(parents=True)
        for group in FILE_GROUPS:
            for name in group:
                (m / name).write_bytes(contents[name])
            write_synced(m / name, contents[name])  # fsync: the whole group is committed
        inodes = {name: os.stat(m / name).st_ino for name in contents}
        # Keep the sealed bytes of replay.bin's first version, then rewrite it in place.
        (old,) = chunk_map(bucket, device.home, [inodes["replay.bin"]])[inodes["replay.bin"]]
        old_sealed = bucket.read_range(old.object, old.off, old.len)
        contents["replay.bin"] = os.urandom(MIB)
        with open(m / "replay.bin", "r+b") as f:
            f.write(contents["replay.bin"])
            os.fsync(f.fileno())
        assert os.stat(m / "replay.bin").st_ino == inodes["replay.bin"]
    by_ino = chunk_map(bucket, device.home, list(inodes.values()))
    chunks = {name: by_ino[ino] for name, ino in inodes.items()}
    assert chunks["replay.bin"][0].ref.version != old.ref.version
    victims = _attack_data(bucket, chunks, old_sealed)
    log = base / "daemon.log"
    with device.mounted(source, mnt, f"log={log}", BUCKET_READS) as m:
        yield DataWorld(device, m, log, contents, inodes, victims)


@pytest.mark.parametrize("attack", DATA_ATTACKS)
def test_data_attack_reads_eio(data_world: DataWorld, attack: str, tally: Counter[str]) -> None:
    tally["tried"] += 1
    for name, chunk in data_world.victims[attack]:
        assert read_errno(data_world.mnt / name) == errno.EIO, f"{attack}: {name} read"
        ino = data_world.inodes[name]
        assert data_world.log_names(ino, chunk.object), (
            f"{attack}: no log line names inode {ino} and {chunk.object}"
        )
    data_world.check_rest_usable()
    tally["detected"] += 1


def test_cut_tail_leaves_head_readable(data_world: DataWorld) -> None:
    """Detection is exact: the chunks before the cut still read."""
    with open(data_world.mnt / "tail.bin", "rb") as f:
        assert f.read(64 << 10) == data_world.contents["tail.bin"][: 64 << 10]


# --- random bit flips anywhere in a chunk, amid untouched neighbours ----------------------------


@pytest.mark.parametrize(
    "flips",
    [pytest.param(FUZZ_FLIPS, marks=pytest.mark.slow if STRESS else (), id=f"{FUZZ_FLIPS}")],
)
def test_random_bit_flips(
    file_sources: Sources, tmp_path: Path, tally: Counter[str], flips: int
) -> None:
    """A single flipped bit anywhere in a sealed chunk is caught, and only there.

    Small files written together lie back to back in one pack and are read together (one
    GET for a run of neighbours): every other file keeps its bits, and reads exactly, while
    its neighbours fail; undone, the flipped ones read again (nothing bad was cached).
    """
    device = Device(tmp_path / "device")
    source = file_sources.new("fuzz")
    device.init(source)
    bucket = Bucket.open(source)
    rng = random.Random(os.environ.get("ENCFS_SEED", "fuzz"))
    names = [f"f{i:04d}" for i in range(2 * flips)]
    sizes = {n: rng.choice([1, 4095, 4096, 20_000, 70_000, MIB + 1]) for n in names}
    with device.mounted(source, tmp_path / "mnt") as m:
        for n in names:
            (m / n).write_bytes(pattern(n, sizes[n]))
        inodes = {n: os.stat(m / n).st_ino for n in names}
    by_ino = chunk_map(bucket, device.home, list(inodes.values()))
    flipped = set(rng.sample(names, flips))
    spots: dict[str, list[tuple[int, int]]] = {}
    for n in sorted(flipped):
        chunk = rng.choice(by_ino[inodes[n]])
        spots.setdefault(chunk.object, []).append(
            (chunk.off + rng.randrange(chunk.len), rng.randrange(8))
        )
    with device.mounted(source, tmp_path / "mnt", BUCKET_READS) as m:
        for obj, where in spots.items():
            bucket.flip_bits(obj, where)
        for n in rng.sample(names, len(names)):
            if n in flipped:
                tally["tried"] += 1
                assert read_errno(m / n) == errno.EIO, f"a bit flipped in {n} was not caught"
                tally["detected"] += 1
            else:
                assert (m / n).read_bytes() == pattern(n, sizes[n]), f"{n} hurt by a neighbour"
        for obj, where in spots.items():
            bucket.flip_bits(obj, where)
        for n in flipped:
            assert (m / n).read_bytes() == pattern(n, sizes[n]), f"{n} unreadable once undone"


# --- a chunk that was uploaded but never committed, replayed after the crash -----------------


def _wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def test_uncommitted_chunk_replayed_after_crash(
    file_sources: Sources, tmp_path: Path, tally: Counter[str]
) -> None:
    """A sealed chunk the daemon uploaded just before it was killed never made it into a
    commit; after the remount the same chunk of the same file is written again. Putting the
    orphan's bytes where the new chunk lies must fail to authenticate, never read as the old
    content."""
    device = Device(tmp_path / "device")
    source = file_sources.new("orphan")
    device.init(source)
    bucket = Bucket.open(source)
    mnt = tmp_path / "mnt"
    slow = "commit_interval=3600"  # no periodic commit: only fsync and unmount commit
    mnt.mkdir()
    assert device.mount(source, mnt, slow).returncode == 0
    try:
        write_synced(mnt / "x.bin", pattern("v0", MIB))
        committed = set(bucket.packs())
        with open(mnt / "x.bin", "r+b") as f:
            f.write(pattern("old", MIB))  # a full chunk: sealed into the open pack at once
        # Seven more full chunks: the pack holding x.bin's chunk fills up and is uploaded.
        (mnt / "filler.bin").write_bytes(pattern("filler", 7 * MIB))
        (orphan,) = _wait_for(lambda: set(bucket.packs()) - committed, "the full pack")
        orphan_bytes = bucket.get(orphan)
    finally:
        kill_daemon(mnt)
    mount_after_crash(device, source, mnt, slow)
    try:
        with open(mnt / "x.bin", "r+b") as f:
            assert f.read() == pattern("v0", MIB)  # the uncommitted write is gone, as it should
            f.seek(0)
            f.write(pattern("new", MIB))
            os.fsync(f.fileno())
        ino = os.stat(mnt / "x.bin").st_ino
    finally:
        unmount(device, mnt)
    (chunk,) = chunk_map(bucket, device.home, [ino])[ino]
    old_sealed = orphan_bytes[: chunk.len]  # x.bin's chunk went first into the orphan pack
    tally["tried"] += 1
    bucket.write_range(chunk.object, chunk.off, old_sealed)
    with device.mounted(source, mnt, BUCKET_READS) as m:
        try:
            content = (m / "x.bin").read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO
        else:
            assert content != pattern("old", MIB), "the orphaned chunk was accepted as current"
            raise AssertionError("the replaced chunk read without error")
    tally["detected"] += 1
