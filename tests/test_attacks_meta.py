"""A hostile bucket owner edits commits, the header and key records, or rolls back: no mount."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.bucket_tamper import (
    Bucket,
    Sources,
    device_id_of,
    open_sources,
    pattern,
    tally_fixture,
    write_synced,
)
from tests.fixtures_mount import Device, is_mounted, needs_fuse, unmount

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.s3]


@pytest.fixture(scope="module")
def s3_sources(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sources]:
    """Refusals at mount do not depend on the backend: S3 alone keeps the module fast."""
    with open_sources("s3", request, tmp_path_factory.mktemp("s3-only")) as found:
        yield found


tally = tally_fixture(
    lambda c: f"[test_attacks_meta] attacks: {c['tried']} tried, {c['detected']} refused"
)


# --- attacks on metadata, header and keys: the mount is refused ----------------------------------


@dataclass
class MetaWorld:
    device: Device
    source: str
    bucket: Bucket
    mnt: Path
    device_id: str
    state_a: dict[str, bytes]  # the bucket after the first session
    state_b: dict[str, bytes]  # ... and after the second, the newest this device saw


@pytest.fixture(scope="module")
def meta_world(
    s3_sources: Sources, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MetaWorld]:
    base = tmp_path_factory.mktemp("meta")
    device = Device(base / "device")
    source = s3_sources.new("meta")
    device_id = device_id_of(device.init(source).stdout)
    bucket = Bucket.open(source)
    mnt = base / "mnt"
    with device.mounted(source, mnt) as m:
        for name in ("a.txt", "b.txt"):
            write_synced(m / name, pattern(name, 3000))
    state_a = bucket.snapshot()
    with device.mounted(source, mnt) as m:
        for name in ("c.txt", "d.txt", "e.txt"):
            write_synced(m / name, pattern(name, 3000))
    state_b = bucket.snapshot()
    assert len(bucket.commits()) >= 4
    yield MetaWorld(device, source, bucket, mnt, device_id, state_a, state_b)


def attempt_mount(world: MetaWorld, *options: str) -> tuple[int, str]:
    """Try to mount; a mount that succeeds is unmounted at once. Returns (exit code, stderr)."""
    world.mnt.mkdir(exist_ok=True)
    try:
        done = world.device.mount(world.source, world.mnt, *options)
    finally:
        if is_mounted(world.mnt):
            unmount(world.device, world.mnt)
    return done.returncode, done.stderr


def _flip_header_tag(doc: dict[str, Any]) -> None:
    tag = bytearray(base64.b64decode(doc["auth"]))
    tag[0] ^= 1
    doc["auth"] = base64.b64encode(bytes(tag)).decode()


def _raise_floor(doc: dict[str, Any]) -> None:
    doc["kdf"]["min_iterations"] += 1


def _bump_format(doc: dict[str, Any]) -> None:
    doc["format"] += 1


def _edit_wrapped(doc: dict[str, Any]) -> None:
    raw = bytearray(base64.b64decode(doc["wrapped"]))
    raw[len(raw) // 2] ^= 0x40
    doc["wrapped"] = base64.b64encode(bytes(raw)).decode()


def _bump_generation(doc: dict[str, Any]) -> None:
    doc["generation"] += 1


@dataclass(frozen=True)
class MetaAttack:
    name: str
    apply: Callable[[MetaWorld], None]
    exit_code: int
    words: str  # a regular expression the one-line message must match


def _middle_commit(w: MetaWorld) -> None:
    w.bucket.delete(w.bucket.commits()[-2])


def _swap_commits(w: MetaWorld) -> None:
    newest, before = w.bucket.commits()[-1], w.bucket.commits()[-2]
    w.bucket.swap_objects(newest, before)


def _flip_commit(w: MetaWorld) -> None:
    name = w.bucket.commits()[-1]
    w.bucket.flip_bit(name, len(w.bucket.get(name)) // 2)


def _drop_newest(w: MetaWorld) -> None:
    w.bucket.delete(w.bucket.commits()[-1])


def _drop_all_commits(w: MetaWorld) -> None:
    for name in w.bucket.commits():
        w.bucket.delete(name)


def _roll_back(w: MetaWorld) -> None:
    w.bucket.restore(w.state_a)


def _header(change: Callable[[dict[str, Any]], None]) -> Callable[[MetaWorld], None]:
    return lambda w: w.bucket.edit_json("encfs-cloud", change)


def _key_record(change: Callable[[dict[str, Any]], None]) -> Callable[[MetaWorld], None]:
    return lambda w: w.bucket.edit_json(f"keys/{w.device_id}", change)


def _flip_keyring(w: MetaWorld) -> None:
    w.bucket.flip_bit("keys/keyring", len(w.bucket.get("keys/keyring")) - 5)


def _forge_lease(w: MetaWorld) -> None:
    w.bucket.put("lease", b'{"holder": "someone else", "forged": true}')


LEASE_HELD = 12
ROLLED_BACK = 13
INTEGRITY = 20
FORMAT = 6
META_ATTACKS = [
    MetaAttack("commit removed from the middle", _middle_commit, INTEGRITY, "missing"),
    MetaAttack("two commits swapped", _swap_commits, INTEGRITY, "meta/"),
    MetaAttack("bit flipped in a commit", _flip_commit, INTEGRITY, "meta/"),
    MetaAttack("newest commit removed", _drop_newest, ROLLED_BACK, "rolled back"),
    MetaAttack("every commit removed", _drop_all_commits, ROLLED_BACK, "rolled back"),
    MetaAttack("whole bucket rolled back", _roll_back, ROLLED_BACK, "rolled back"),
    MetaAttack("header tag flipped", _header(_flip_header_tag), INTEGRITY, "header"),
    MetaAttack("header KDF floor raised", _header(_raise_floor), INTEGRITY, "header"),
    MetaAttack("header format bumped", _header(_bump_format), FORMAT, "newer"),
    MetaAttack("key record: wrapped key edited", _key_record(_edit_wrapped), INTEGRITY, "key"),
    MetaAttack("key record: generation edited", _key_record(_bump_generation), INTEGRITY, "key"),
    MetaAttack("keyring bit flipped", _flip_keyring, INTEGRITY, "keyring"),
]


@pytest.mark.parametrize("attack", [pytest.param(a, id=a.name) for a in META_ATTACKS])
def test_meta_attack_refuses_mount(
    meta_world: MetaWorld, attack: MetaAttack, tally: Counter[str]
) -> None:
    tally["tried"] += 1
    try:
        attack.apply(meta_world)
        code, stderr = attempt_mount(meta_world)
    finally:
        meta_world.bucket.restore(meta_world.state_b)
    lines = stderr.strip().splitlines()
    assert code == attack.exit_code, f"{attack.name}: exit {code}: {stderr}"
    tally["detected"] += 1
    assert len(lines) == 1, f"{attack.name}: not one line: {stderr!r}"
    assert re.search(attack.words, lines[0]), f"{attack.name}: {lines[0]}"


def test_forged_lease_is_not_believed(meta_world: MetaWorld) -> None:
    """Liveness is the bucket owner's to break; but a forged lease must not pass as real, nor
    as absent: a lease that does not open might be an exclusive operation's under a key this
    device lacks, so a read-write mount refuses it (exit 12) unless -o takeover, and an
    exclusive operation refuses to take it over without --takeover."""
    try:
        _forge_lease(meta_world)
        code, stderr = attempt_mount(meta_world)
        assert code == LEASE_HELD and "does not authenticate" in stderr, stderr
        assert "-o takeover" in stderr, stderr
        code, stderr = attempt_mount(meta_world, "takeover")
        assert code == 0, stderr
        done = meta_world.device.run("fsck", meta_world.source, "--repair", "--yes")
        assert done.returncode == LEASE_HELD and "authenticate" in done.stderr, done.stderr
    finally:
        meta_world.bucket.restore(meta_world.state_b)


@contextlib.contextmanager
def device_state_kept(device: Device) -> Iterator[None]:
    """Put the device's local state back after the block (allow_rollback moves it back)."""
    saved = device.home.with_name(device.home.name + "-saved")
    shutil.copytree(device.home, saved)
    try:
        yield
    finally:
        shutil.rmtree(device.home)
        saved.rename(device.home)


@pytest.mark.parametrize("attack", ["newest commit removed", "whole bucket rolled back"])
def test_allow_rollback_accepts_older_state(meta_world: MetaWorld, attack: str) -> None:
    """-o allow_rollback is the user's explicit way past a rollback refusal."""
    world = meta_world
    apply = next(a.apply for a in META_ATTACKS if a.name == attack)
    try:
        with device_state_kept(world.device):
            apply(world)
            with world.device.mounted(world.source, world.mnt, "allow_rollback") as m:
                names = set(os.listdir(m))
                assert (m / "a.txt").read_bytes() == pattern("a.txt", 3000)
    finally:
        world.bucket.restore(world.state_b)
    assert names < {"a.txt", "b.txt", "c.txt", "d.txt", "e.txt"}, f"not older: {names}"
    if attack == "whole bucket rolled back":
        assert names == {"a.txt", "b.txt"}
