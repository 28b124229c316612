"""Devices end to end through the real CLI: enroll, revoke, re-encrypt, recover, passwd, wipe."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from encfs_cloud import layout
from encfs_cloud.keys import master as K
from encfs_cloud.keys import records, vault
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store import open_store
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tree.journal import replay
from encfs_cloud.tree.metadata import ROOT_INODE, ChunkRef, Metadata
from tests.fixtures_mount import Device, needs_fuse

pytestmark = needs_fuse

_RECOVERY = re.compile(r"\b(?:[0-9A-Z]{4}-){7}[0-9A-Z]{4}\b")


def field(out: str, label: str) -> str:
    """The value of a `label: value` line a command printed for scripts."""
    for line in out.splitlines():
        if line.startswith(label + ": "):
            return line.split(": ", 1)[1].strip()
    raise AssertionError(f"no {label!r} line in:\n{out}")


def init(dev: Device, source: str, *extra: str) -> tuple[bytes, str]:
    out = dev.init(source, "--device-name", "laptop", *extra).stdout
    return bytes.fromhex(field(out, "filesystem id")), _RECOVERY.findall(out)[0]


def enroll(approver: Device, new: Device, source: str, name: str) -> str:
    """request on `new`, approve on `approver`; returns the new device id."""
    out = new.run("device", "request", source, "--no-passphrase", "--device-name", name).stdout
    request_id, code = field(out, "request id"), field(out, "verification code")
    done = approver.run(
        "device", "approve", source, request_id, "--code-file", "-", "--yes", input=code + "\n"
    )
    assert done.returncode == 0, done.stderr
    assert field(done.stdout, "device id") == request_id
    return request_id


def mount_code(dev: Device, source: str, mountpoint: Path, *options: str) -> int:
    """The exit code of a mount expected to fail (unmounted at once if it did not)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = dev.mount(source, mountpoint, *options)
    if done.returncode == 0:
        dev.run("umount", str(mountpoint))
    return done.returncode


def device_store(dev: Device) -> DeviceStore:
    return DeviceStore(dev.home / "encfs-cloud")


def replayed(store: ObjectStore, keys: K.MasterKeys, fs_id: bytes) -> Metadata:
    md, _, _ = replay(store, Sealer(fs_id, keys))
    return md


def chunk_of(md: Metadata, name: bytes) -> tuple[int, ChunkRef]:
    ino = md.lookup(ROOT_INODE, name)
    assert ino is not None
    ref = md.get_chunk(ino, 0)
    assert ref is not None
    return ino, ref


def open_chunk(store: ObjectStore, sealer: Sealer, ino: int, ref: ChunkRef) -> bytes:
    blob = store.get(layout.pack_name(ref.pack), ref.off, ref.len)
    return bytes(
        sealer.open_chunk(ino, 0, ref.version, ref.gen, ref.plain_len, blob, ref.digest, ref.pack)
    )


def test_enroll_by_request_and_approve(
    device: Device, second_device: Device, any_source: str, tmp_path: Path
) -> None:
    init(device, any_source)
    with device.mounted(any_source, tmp_path / "mnt") as mnt:
        (mnt / "shared.txt").write_text("from the laptop")
    out = second_device.run("device", "request", any_source, "--no-passphrase").stdout
    request_id, code = field(out, "request id"), field(out, "verification code")
    listed = device.run("device", "list", any_source, check=True).stdout
    assert request_id in listed.split("pending requests", 1)[1]
    wrong = "0000-0000-0000" if code != "0000-0000-0000" else "1111-1111-1111"
    for bad in (wrong, "not-a-code"):
        done = device.run(
            "device", "approve", any_source, request_id, "--code-file", "-", "--yes", input=bad
        )
        assert done.returncode == 17, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    store = open_store(any_source)
    assert store.head(records.record_name(request_id)) is None  # nothing enrolled
    (tmp_path / "mnt2").mkdir()
    refused = second_device.mount(any_source, tmp_path / "mnt2")
    assert refused.returncode == 8 and code in refused.stderr  # still waits for approval
    # Never in argv (every local user could read it): refused with a hint, nothing enrolled.
    done = device.run("device", "approve", any_source, request_id, "--code", code, "--yes")
    assert done.returncode == 2 and "--code-file" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert store.head(records.record_name(request_id)) is None
    code_file = tmp_path / "code"
    code_file.write_text(code.lower() + "\n")
    done = device.run("device", "approve", any_source, request_id, "--code-file", str(code_file))
    assert done.returncode == 0, done.stderr
    with second_device.mounted(any_source, tmp_path / "mnt2") as mnt:
        assert (mnt / "shared.txt").read_text() == "from the laptop"
    mine = second_device.run("device", "list", any_source, check=True).stdout
    assert re.search(rf"^\* {request_id} .*\(this device\)$", mine, re.M)
    assert "pending requests: none" in mine
    second_device.run("device", "rename", any_source, request_id[:8], "phone", check=True)
    assert f"{request_id}  phone  " in device.run("device", "list", any_source).stdout


def test_revoke_reencrypt_and_old_keys(
    device: Device, second_device: Device, any_source: str, tmp_path: Path
) -> None:
    third = Device(tmp_path / "device-c")
    fs_id, _ = init(device, any_source)
    b_id = enroll(device, second_device, any_source, "phone")
    enroll(device, third, any_source, "tablet")
    with device.mounted(any_source, tmp_path / "mnt") as mnt:
        (mnt / "before.txt").write_text("written before the revocation")
    # Everything the revoked device could keep: its device folder and its key record.
    store = open_store(any_source)
    shutil.copytree(second_device.home / "encfs-cloud", tmp_path / "stolen" / "encfs-cloud")
    stolen_record = store.get(records.record_name(b_id))
    stolen = DeviceStore(tmp_path / "stolen" / "encfs-cloud").load(fs_id, None)
    _, wrapped, _ = records.decode_record(stolen_record, b_id)
    old_keys = K.unwrap_for_device(wrapped, fs_id, b_id, stolen.private_key)
    thief = Sealer(fs_id, old_keys)
    md = replayed(store, old_keys, fs_id)  # it could read everything so far
    ino, ref = chunk_of(md, b"before.txt")
    assert open_chunk(store, thief, ino, ref).startswith(b"written before")
    md.db.close()

    # Re-encryption is refused while the filesystem is mounted; nothing changes.
    with device.mounted(any_source, tmp_path / "mnt"):
        done = third.run("device", "revoke", any_source, b_id, "--reencrypt", "--yes")
        assert done.returncode == 12, done.stderr
    assert store.head(records.record_name(b_id)) is not None
    done = third.run("device", "revoke", any_source, b_id, "--reencrypt", "--yes")
    assert done.returncode == 0, done.stderr
    assert field(done.stdout, "device id") == b_id
    assert mount_code(second_device, any_source, tmp_path / "mnt-b") == 15

    with device.mounted(any_source, tmp_path / "mnt") as mnt:
        assert (mnt / "before.txt").read_text() == "written before the revocation"
        (mnt / "after.txt").write_text("written after the revocation")
    with third.mounted(any_source, tmp_path / "mnt-c") as mnt:
        assert (mnt / "before.txt").read_text() == "written before the revocation"
        assert (mnt / "after.txt").read_text() == "written after the revocation"

    ring = third.run("device", "list", any_source, check=True).stdout
    assert b_id not in ring and "key generation: 2" in ring
    current = vault.unlock(store, device_store(third), None)
    md = replayed(store, current.keys, fs_id)
    try:
        gens = {int(g) for (g,) in md.db.execute("SELECT gen FROM chunks")}
        assert gens == {2}  # every chunk of before.txt was rewritten, after.txt is new
        for name in (b"before.txt", b"after.txt"):
            ino, ref = chunk_of(md, name)
            assert open_chunk(store, Sealer(fs_id, current.keys), ino, ref)
            with pytest.raises(Exception, match=r"generation|authentication"):
                open_chunk(store, thief, ino, ref)
    finally:
        md.db.close()
        current.wipe()
    for obj in store.list(layout.META_PREFIX):
        blob = store.get(obj.name)
        assert int.from_bytes(blob[4:8], "big") == 2  # the ECS1 header's generation
        with pytest.raises(Exception, match="generation"):
            thief.open_object(obj.name, "commit", blob)


def test_recover_after_wiping_every_device(
    device: Device, second_device: Device, local_source: str, tmp_path: Path
) -> None:
    _, recovery = init(device, local_source)
    enroll(device, second_device, local_source, "phone")
    with device.mounted(local_source, tmp_path / "mnt") as mnt:
        (mnt / "keep.txt").write_text("survives every device")
    for dev in (device, second_device):
        done = dev.run("wipe", local_source, "--yes")
        assert done.returncode == 0, done.stderr
        assert mount_code(dev, local_source, tmp_path / "mnt") == 8
    bad = tmp_path / "bad-key"
    bad.write_text(K.new_recovery_key()[0] + "\n")
    done = device.run("recover", local_source, "--recovery-key-file", str(bad), "--no-passphrase")
    assert done.returncode == 16, done.stderr
    key_file = tmp_path / "recovery-key"
    key_file.write_text(recovery + "\n")
    done = device.run(
        "recover", local_source, "--recovery-key-file", str(key_file), "--no-passphrase"
    )
    assert done.returncode == 0, done.stderr
    with device.mounted(local_source, tmp_path / "mnt") as mnt:
        assert (mnt / "keep.txt").read_text() == "survives every device"
    rotated = device.run("recovery-key", local_source, "--rotate", check=True).stdout
    new_key = _RECOVERY.findall(rotated)[0]
    third = Device(tmp_path / "device-c")
    done = third.run(
        "recover", local_source, "--recovery-key-file", str(key_file), "--no-passphrase"
    )
    assert done.returncode == 16, done.stderr  # the old key stopped working
    key_file.write_text(new_key)
    third.run(
        "recover", local_source, "--recovery-key-file", str(key_file), "--no-passphrase", check=True
    )


def test_wipe_refuses_the_last_key(device: Device, local_source: str) -> None:
    init(device, local_source)
    store = open_store(local_source)
    store.delete(records.RECOVERY_NAME)  # as if there were no recovery key
    done = device.run("wipe", local_source, "--yes")
    assert done.returncode == 17 and "--force" in done.stderr
    assert device.run("device", "list", local_source).returncode == 0
    assert device.run("wipe", local_source, "--force", "--yes").returncode == 0
    assert device.run("device", "list", local_source).returncode == 8


def test_passwd(device: Device, local_source: str, tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text("correct horse\n")
    new.write_text("battery staple\n")
    device.run(
        "init", local_source, "--passphrase-file", str(old), "--device-name", "laptop", check=True
    )
    done = device.run(
        "passwd", local_source, "--passphrase-file", str(new), "--new-passphrase-file", str(old)
    )
    assert done.returncode == 7  # the current passphrase is required
    device.run(
        "passwd",
        local_source,
        "--passphrase-file",
        str(old),
        "--new-passphrase-file",
        str(new),
        check=True,
    )
    assert device.run("device", "list", local_source, "--passphrase-file", str(old)).returncode == 7
    assert mount_code(device, local_source, tmp_path / "mnt", f"passphrase_file={old}") == 7
    with device.mounted(local_source, tmp_path / "mnt", f"passphrase_file={new}") as mnt:
        (mnt / "f").write_text("x")
    device.run("passwd", local_source, "--passphrase-file", str(new), "--no-passphrase", check=True)
    assert device.run("device", "list", local_source).returncode == 0


def test_tampered_header_or_key_record_refused(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    fs_id, _ = init(device, local_source)
    store = open_store(local_source)
    own = records.record_name(device_store(device).device_id(fs_id))
    header = store.get(layout.HEADER_NAME)
    doc = json.loads(header)
    doc["kdf"]["min_iterations"] += 1  # still well-formed, but not what was tagged
    record = json.loads(store.get(own))
    wrapped = bytearray(records.unb64(record["wrapped"]))
    wrapped[-1] ^= 1
    tampered = {
        layout.HEADER_NAME: json.dumps(doc).encode(),
        own: json.dumps({**record, "wrapped": records.b64(bytes(wrapped))}).encode(),
        records.KEYRING_NAME: store.get(records.KEYRING_NAME)[:-1] + b"\0",
    }
    (tmp_path / "mnt").mkdir()
    for name, data in tampered.items():
        original = store.get(name)
        store.put(name, data)
        done = device.mount(local_source, tmp_path / "mnt")
        assert done.returncode == 20, (name, done.stderr)
        assert "modified" in done.stderr
        store.put(name, original)
    with device.mounted(local_source, tmp_path / "mnt") as mnt:
        (mnt / "f").write_text("untouched again")


def test_umount_wipe(
    device: Device, second_device: Device, any_source: str, tmp_path: Path
) -> None:
    init(device, any_source)
    enroll(device, second_device, any_source, "phone")
    mnt = tmp_path / "mnt-b"
    with second_device.mounted(any_source, mnt):
        (mnt / "last words.txt").write_text("flushed before the wipe")
        done = second_device.run("umount", "--wipe", str(mnt))
        assert done.returncode == 0, done.stderr
    assert not any(second_device.home.rglob("*"))  # nothing of the filesystem is left here
    assert mount_code(second_device, any_source, mnt) == 8
    with device.mounted(any_source, tmp_path / "mnt") as m:
        assert (m / "last words.txt").read_text() == "flushed before the wipe"
