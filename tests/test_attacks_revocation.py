"""A revoked, wiped or rotated-out key attacks for real: it can neither forge nor read new data."""

from __future__ import annotations

import errno
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from encfs_cloud import layout
from encfs_cloud.keys import master as K
from encfs_cloud.keys import records
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store import open_store
from encfs_cloud.tree.journal import KIND_DELTA, CommitInfo, export_delta, replay, seal_commit
from encfs_cloud.tree.metadata import ROOT_INODE, Metadata
from tests.bucket_tamper import Bucket, read_errno
from tests.fixtures_mount import Device, needs_fuse
from tests.test_devices_e2e import enroll, field, init, mount_code

pytestmark = [needs_fuse, pytest.mark.fuse]

INTEGRITY_EXIT = 20
ROLLBACK_EXIT = 13
REVOKED_EXIT = 15
RECOVERY_EXIT = 16
ABORTED_EXIT = 17
_RECOVERY = re.compile(r"\b(?:[0-9A-Z]{4}-){7}[0-9A-Z]{4}\b")


class Revoked:
    """What a device keeps when it is revoked: its folder, its key record, its keys."""

    def __init__(self, dev: Device, source: str, fs_id: bytes, device_id: str, keep: Path) -> None:
        self.fs_id = fs_id
        self.device_id = device_id
        shutil.copytree(dev.home / "encfs-cloud", keep / "encfs-cloud")
        self.folder = keep
        self.record = open_store(source).get(records.record_name(device_id))
        self.keyring = open_store(source).get(records.KEYRING_NAME)

    def keys(self) -> K.MasterKeys:
        identity = DeviceStore(self.folder / "encfs-cloud").load(self.fs_id, None)
        try:
            _, wrapped, _ = records.decode_record(self.record, self.device_id)
            return K.unwrap_for_device(wrapped, self.fs_id, self.device_id, identity.private_key)
        finally:
            identity.wipe()


def forge_commit(
    source: str, keys: K.MasterKeys, fs_id: bytes, change: Callable[[Metadata], None]
) -> None:
    """Append a delta to the chain, sealed with `keys`, as any holder of them could."""
    store = open_store(source)
    sealer = Sealer(fs_id, keys)
    md, head, _ = replay(store, sealer)
    change(md)
    info = CommitInfo(head.seq + 1, KIND_DELTA, head.hash, head.snapshot_seq, time.time_ns())
    store.put(
        layout.commit_name(info.seq),
        seal_commit(sealer, info, export_delta(md)),
        if_none_match=True,
    )
    md.db.close()


def _setuid_root(name: bytes) -> Callable[[Metadata], None]:
    def change(md: Metadata) -> None:
        ino = md.lookup(ROOT_INODE, name)
        assert ino is not None
        md.db.execute("UPDATE inodes SET mode=?, uid=0 WHERE id=?", (0o104755, ino))
        md.dirty["inodes"].add((ino,))

    return change


def _world(a: Device, b: Device, source: str, tmp_path: Path) -> tuple[bytes, str, Revoked]:
    """A writes victim.txt, enrolls B; B keeps everything; A revokes B (no commit since)."""
    fs_id, _ = init(a, source)
    with a.mounted(source, tmp_path / "mnt") as mnt:
        (mnt / "victim.txt").write_bytes(b"the real content " * 100)
    b_id = enroll(a, b, source, "phone")
    kept = Revoked(b, source, fs_id, b_id, tmp_path / "kept-b")
    a.run("device", "revoke", source, b_id, "--yes", check=True)
    return fs_id, b_id, kept


def test_revoked_device_cannot_append_a_commit(
    device: Device, second_device: Device, any_source: str, tmp_path: Path
) -> None:
    fs_id, _, kept = _world(device, second_device, any_source, tmp_path)
    keys = kept.keys()
    try:
        forge_commit(any_source, keys, fs_id, _setuid_root(b"victim.txt"))
    finally:
        keys.wipe()
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    done = device.mount(any_source, mnt)
    assert done.returncode == INTEGRITY_EXIT, done.stderr
    assert "retired key" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = device.run("fsck", any_source)  # reports it, and offers the state before it
    assert done.returncode != 0 and "retired key" in done.stdout + done.stderr


def test_revoked_device_cannot_reseal_a_chunk_in_place(
    device: Device, second_device: Device, any_source: str, tmp_path: Path
) -> None:
    fs_id, _, kept = _world(device, second_device, any_source, tmp_path)
    keys = kept.keys()
    store = open_store(any_source)
    try:
        sealer = Sealer(fs_id, keys)
        md, _, _ = replay(store, sealer)
        ino = md.lookup(ROOT_INODE, b"victim.txt")
        assert ino is not None
        ref = md.get_chunk(ino, 0)
        assert ref is not None
        md.db.close()
        forged = (b"the forged content" * 100)[: ref.plain_len]
        assert len(forged) == ref.plain_len
        # Same inode, index, version, generation: the AEAD accepts it under the old key.
        Bucket(store).write_range(
            layout.pack_name(ref.pack),
            ref.off,
            sealer.seal_chunk(ino, 0, ref.version, forged, ref.pack),
        )
    finally:
        keys.wipe()
    # Over S3, A's disk cache still holds the chunk it wrote and serves it (authenticated: the
    # real bytes); over file:// there is no disk cache by default. Never B's bytes either way;
    # a cold cache makes the read fetch B's re-sealed chunk from the bucket.
    with device.mounted(any_source, tmp_path / "mnt") as mnt:
        try:
            assert (mnt / "victim.txt").read_bytes() == b"the real content " * 100
        except OSError as exc:
            assert exc.errno == errno.EIO
    cold = f"cache_dir={tmp_path / 'cold-cache'}"
    with device.mounted(any_source, tmp_path / "mnt", cold) as mnt:
        assert read_errno(mnt / "victim.txt") == errno.EIO


def test_revoked_device_cannot_hide_the_revocation_from_an_offline_device(
    device: Device, second_device: Device, any_source: str, tmp_path: Path
) -> None:
    third = Device(tmp_path / "device-c")
    fs_id, _ = init(device, any_source)
    b_id = enroll(device, second_device, any_source, "phone")
    enroll(device, third, any_source, "tablet")
    with third.mounted(any_source, tmp_path / "mnt-c") as mnt:  # C has seen generation 1
        (mnt / "from-c.txt").write_text("c was here")
    kept = Revoked(second_device, any_source, fs_id, b_id, tmp_path / "kept-b")
    device.run("device", "revoke", any_source, b_id, "--yes", check=True)
    store = open_store(any_source)
    # B re-seals the keyring it last saw (B listed) as a newer version under generation 1,
    # and re-tags the header under generation 1.
    keys = kept.keys()
    try:
        old = K.open_keyring(keys, fs_id, kept.keyring)
        version, _ = K.keyring_head(store.get(records.KEYRING_NAME))
        fake = K.Keyring(
            version + 1, 1, old.recovery_public, old.recovery_created_at, old.devices, {1: 1}
        )
        store.put(records.KEYRING_NAME, K.seal_keyring(keys, fs_id, fake))
        header = records.parse_header(store.get(layout.HEADER_NAME))
        store.put(layout.HEADER_NAME, records.seal_header(keys, header))
    finally:
        keys.wipe()
    # C never saw generation 2, but its key record (written by A) commits it.
    assert mount_code(third, any_source, tmp_path / "mnt-c") == INTEGRITY_EXIT
    done = third.run("device", "list", any_source)
    assert done.returncode == INTEGRITY_EXIT and "re-sealed" in done.stderr
    # A has seen generation 2: refused as a rollback.
    assert mount_code(device, any_source, tmp_path / "mnt-a") == ROLLBACK_EXIT


def test_rotated_recovery_key_opens_nothing_new(
    device: Device, second_device: Device, any_source: str, tmp_path: Path
) -> None:
    fs_id, old_key = init(device, any_source)
    store = open_store(any_source)
    kept_record = store.get(records.RECOVERY_NAME)  # the bucket owner keeps a copy
    rotated = device.run("recovery-key", any_source, "--rotate", check=True).stdout
    assert _RECOVERY.search(rotated)
    with device.mounted(any_source, tmp_path / "mnt") as mnt:
        (mnt / "after.txt").write_text("written after the rotation")
    # The old key with the old record: only generation 1, and every commit is newer.
    rec = K.parse_recovery_key(old_key)
    try:
        _, wrapped, _ = records.decode_record(kept_record, K.RECOVERY_ID)
        old = K.unwrap_for_recovery(wrapped, fs_id, rec)
    finally:
        rec.wipe()
    try:
        assert old.generations == (1,)
        newest = Bucket(store).commits()[-1]
        with pytest.raises(Exception, match="generation"):
            Sealer(fs_id, old).open_object(newest, "commit", store.get(newest))
    finally:
        old.wipe()
    # The bucket owner puts the old record back and recovers with the old key: refused.
    store.put(records.RECOVERY_NAME, kept_record)
    key_file = tmp_path / "old-key"
    key_file.write_text(old_key + "\n")
    done = second_device.run(
        "recover", any_source, "--recovery-key-file", str(key_file), "--no-passphrase", "--yes"
    )
    assert done.returncode == RECOVERY_EXIT, done.stderr
    assert "rotate" in done.stderr
    listed = device.run("device", "list", any_source, check=True).stdout
    assert len(re.findall(r"^[ *] [0-9a-f]{32} ", listed, re.M)) == 1  # nobody else enrolled


def test_wiped_device_copy_reads_nothing_new(
    device: Device, second_device: Device, any_source: str, tmp_path: Path
) -> None:
    init(device, any_source)
    b_id = enroll(device, second_device, any_source, "phone")
    backup = tmp_path / "backup-b"
    shutil.copytree(second_device.home, backup)  # a disk image taken before the wipe
    record = open_store(any_source).get(records.record_name(b_id))
    done = second_device.run("wipe", any_source, "--yes")
    assert done.returncode == 0, done.stderr
    ring = device.run("device", "list", any_source, check=True).stdout
    assert b_id not in ring and "key generation: 2" in ring
    with device.mounted(any_source, tmp_path / "mnt") as mnt:
        (mnt / "after.txt").write_text("written after the wipe")
    shutil.rmtree(second_device.home)
    shutil.copytree(backup, second_device.home)
    assert mount_code(second_device, any_source, tmp_path / "mnt-b") == REVOKED_EXIT
    # Even with its old record put back by the bucket owner it holds generation 1 only.
    store = open_store(any_source)
    assert store.head(records.record_name(b_id)) is None
    store.put(records.record_name(b_id), record)
    assert mount_code(second_device, any_source, tmp_path / "mnt-b") == REVOKED_EXIT


def test_wipe_without_unlocking_needs_force(
    device: Device, second_device: Device, local_source: str, tmp_path: Path
) -> None:
    init(device, local_source)
    secret = tmp_path / "passphrase"
    secret.write_text("correct horse\n")
    out = second_device.run(
        "device", "request", local_source, "--passphrase-file", str(secret), check=True
    ).stdout
    b_id, code = field(out, "request id"), field(out, "verification code")
    device.run(
        "device",
        "approve",
        local_source,
        b_id,
        "--code-file",
        "-",
        "--yes",
        input=code + "\n",
        check=True,
    )
    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple\n")
    done = second_device.run("wipe", local_source, "--yes", "--passphrase-file", str(wrong))
    assert done.returncode == ABORTED_EXIT, done.stderr
    assert "revoke" in done.stderr and "--force" in done.stderr
    unlock = ("--passphrase-file", str(secret))
    assert second_device.run("device", "list", local_source, *unlock).returncode == 0
    done = second_device.run(
        "wipe", local_source, "--yes", "--force", "--passphrase-file", str(wrong)
    )
    assert done.returncode == 0, done.stderr
    assert b_id in device.run("device", "list", local_source, check=True).stdout  # still listed


def test_fresh_device_refuses_a_rolled_back_bucket(
    device: Device, second_device: Device, any_source: str, tmp_path: Path
) -> None:
    init(device, any_source)
    bucket = Bucket(open_store(any_source))
    with device.mounted(any_source, tmp_path / "mnt") as mnt:
        (mnt / "old.txt").write_text("old")
    saved = bucket.snapshot()
    with device.mounted(any_source, tmp_path / "mnt") as mnt:
        (mnt / "new.txt").write_text("new")
        (mnt / "old.txt").unlink()
    enroll(device, second_device, any_source, "phone")
    # Roll back the tree (commits and packs), keeping the keys the new device needs.
    keep = {n: d for n, d in bucket.snapshot().items() if n.startswith(layout.KEYS_PREFIX)}
    bucket.restore({**{n: d for n, d in saved.items() if not n.startswith("keys/")}, **keep})
    assert mount_code(second_device, any_source, tmp_path / "mnt-b") == ROLLBACK_EXIT
