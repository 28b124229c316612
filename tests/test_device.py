"""The local device key store: sealing, passphrase, machine binding, modes, floors, wipe."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from encfs_cloud.crypto import passkdf
from encfs_cloud.errors import (
    DeviceKeyMissingError,
    FormatError,
    KeyFileModeError,
    UsageError,
    WrongPassphraseError,
)
from encfs_cloud.keys.device import KEY_FILE, STATE_FILE, DeviceState, DeviceStore

FS = bytes(range(16))


@pytest.fixture(autouse=True)
def _fast_and_fixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCFS_CLOUD_TEST_FAST_KDF", "1")
    monkeypatch.setenv("ENCFS_CLOUD_MACHINE_ID", "machine-one")


@pytest.fixture
def devices(tmp_path: Path) -> DeviceStore:
    return DeviceStore(tmp_path / "xdg" / "encfs-cloud")


def _raw(identity: object) -> bytes:
    return identity.private_key.private_bytes_raw()  # type: ignore[attr-defined,no-any-return]


def test_default_root_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert DeviceStore().root == tmp_path / "data" / "encfs-cloud"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert DeviceStore().root == tmp_path / "home" / ".local" / "share" / "encfs-cloud"


def test_create_and_load(devices: DeviceStore) -> None:
    old = os.umask(0)  # modes must not depend on the caller's umask
    try:
        made = devices.create(FS, "laptop", b"correct horse")
    finally:
        os.umask(old)
    assert devices.has(FS) and devices.needs_passphrase(FS)
    folder = devices.folder(FS)
    assert folder.name == FS.hex()
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / KEY_FILE).stat().st_mode & 0o777 == 0o600
    got = devices.load(FS, b"correct horse")
    assert (got.device_id, got.name, got.public) == (made.device_id, "laptop", made.public)
    assert _raw(got) == _raw(made)
    assert len(got.device_id) == 32
    # The private key is not in the file in any readable form.
    text = (folder / KEY_FILE).read_bytes()
    assert _raw(got).hex().encode() not in text and _raw(got) not in text
    with pytest.raises(UsageError):
        devices.create(FS, "again", None)


def test_no_passphrase_is_still_sealed(devices: DeviceStore) -> None:
    made = devices.create(FS, "server", None)
    assert not devices.needs_passphrase(FS)
    assert _raw(devices.load(FS, None)) == _raw(made)
    doc = json.loads((devices.folder(FS) / KEY_FILE).read_text())
    assert doc["kdf"] is None and "sealed" in doc


def test_wrong_or_missing_passphrase(devices: DeviceStore) -> None:
    devices.create(FS, "laptop", b"right")
    with pytest.raises(WrongPassphraseError):
        devices.load(FS, b"wrong")
    with pytest.raises(WrongPassphraseError):
        devices.load(FS, None)


def test_change_passphrase(devices: DeviceStore) -> None:
    made = devices.create(FS, "laptop", b"old")
    devices.change_passphrase(FS, b"old", b"new")
    with pytest.raises(WrongPassphraseError):
        devices.load(FS, b"old")
    assert _raw(devices.load(FS, b"new")) == _raw(made)
    with pytest.raises(WrongPassphraseError):
        devices.change_passphrase(FS, b"old", b"other")
    devices.change_passphrase(FS, b"new", None)
    assert not devices.needs_passphrase(FS)
    assert _raw(devices.load(FS, None)) == _raw(made)
    assert [p.name for p in devices.folder(FS).iterdir()] == [KEY_FILE]  # no temp files left


def test_copied_to_another_machine_fails(
    devices: DeviceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices.create(FS, "laptop", b"pw")
    devices.create(FS[::-1], "laptop", None)
    monkeypatch.setenv("ENCFS_CLOUD_MACHINE_ID", "machine-two")
    with pytest.raises(DeviceKeyMissingError, match="another machine"):
        devices.load(FS, b"pw")
    with pytest.raises(DeviceKeyMissingError, match="another machine"):
        devices.load(FS[::-1], None)


def test_machine_check_forged_still_fails(
    devices: DeviceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even with the machine check patched to match, the key derives from the machine id."""
    devices.create(FS, "laptop", None)
    monkeypatch.setenv("ENCFS_CLOUD_MACHINE_ID", "machine-two")
    path = devices.folder(FS) / KEY_FILE
    doc = json.loads(path.read_text())
    other = DeviceStore(devices.root)
    import base64

    doc["machine_check"] = base64.b64encode(other._machine_check(FS, doc["device_id"])).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(Exception, match="modified"):
        devices.load(FS, None)


def test_machine_id_files_are_the_default(
    devices: DeviceStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ENCFS_CLOUD_MACHINE_ID")
    monkeypatch.setattr("encfs_cloud.keys.device.MACHINE_ID_FILES", (str(tmp_path / "nope"),))
    devices.create(FS, "container", None)  # no machine id at all: a random fallback secret
    fallback = devices.root / "machine-secret"
    assert fallback.stat().st_mode & 0o777 == 0o600
    devices.load(FS, None)
    fallback.chmod(0o600)
    fallback.write_text("different")
    with pytest.raises(DeviceKeyMissingError):
        devices.load(FS, None)


def test_loose_modes_refused(devices: DeviceStore) -> None:
    devices.create(FS, "laptop", None)
    key = devices.folder(FS) / KEY_FILE
    key.chmod(0o644)
    with pytest.raises(KeyFileModeError, match="chmod 600"):
        devices.load(FS, None)
    key.chmod(0o600)
    devices.folder(FS).chmod(0o755)
    with pytest.raises(KeyFileModeError, match="chmod 700"):
        devices.load(FS, None)
    devices.folder(FS).chmod(0o700)
    devices.load(FS, None)


def test_symlinked_key_refused(devices: DeviceStore, tmp_path: Path) -> None:
    devices.create(FS, "laptop", None)
    key = devices.folder(FS) / KEY_FILE
    elsewhere = tmp_path / "elsewhere.key"
    key.rename(elsewhere)
    key.symlink_to(elsewhere)
    with pytest.raises(KeyFileModeError):
        devices.load(FS, None)


def _edit_kdf(devices: DeviceStore, **changes: int) -> None:
    path = devices.folder(FS) / KEY_FILE
    doc = json.loads(path.read_text())
    doc["kdf"].update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "changes",
    [
        {"memory_kib": 1024},
        {"iterations": 1},
        {"lanes": 0},
        {"memory_kib": 64 * 1024 * 1024},  # ceilings stop a crafted file from exhausting RAM
    ],
)
def test_kdf_params_below_floors_refused(devices: DeviceStore, changes: dict[str, int]) -> None:
    devices.create(FS, "laptop", b"pw")
    _edit_kdf(devices, **changes)
    with pytest.raises(FormatError, match="floors"):
        devices.load(FS, b"pw")


def test_kdf_params_are_authenticated(devices: DeviceStore) -> None:
    devices.create(FS, "laptop", b"pw")
    _edit_kdf(devices, iterations=3)  # above the floor, but not what the key was sealed with
    with pytest.raises(WrongPassphraseError):
        devices.load(FS, b"pw")


def test_tampered_file_refused(devices: DeviceStore) -> None:
    devices.create(FS, "laptop", None)
    path = devices.folder(FS) / KEY_FILE
    doc = json.loads(path.read_text())
    doc["name"] = "evil"
    path.write_text(json.dumps(doc))
    with pytest.raises(Exception, match="modified"):
        devices.load(FS, None)
    path.write_text("not json")
    with pytest.raises(FormatError):
        devices.load(FS, None)


def test_missing_key(devices: DeviceStore) -> None:
    assert not devices.has(FS)
    with pytest.raises(DeviceKeyMissingError):
        devices.load(FS, None)


def test_identity_is_redacted(devices: DeviceStore) -> None:
    identity = devices.create(FS, "laptop", None)
    raw = _raw(identity)
    for text in (repr(identity), str(identity), f"{identity}"):
        assert "redacted" in text and raw.hex() not in text and repr(raw) not in text
    identity.wipe()
    with pytest.raises(ValueError):
        _raw(identity)


def test_wipe_overwrites_and_removes(devices: DeviceStore, tmp_path: Path) -> None:
    devices.create(FS, "laptop", b"pw")
    devices.save_state(FS, DeviceState(commit_seq=3))
    key = devices.folder(FS) / KEY_FILE
    before = key.read_bytes()
    witness = tmp_path / "witness"
    os.link(key, witness)  # a second name for the same inode shows what wipe wrote into it
    devices.wipe(FS)
    assert not devices.folder(FS).exists() and not devices.has(FS)
    after = witness.read_bytes()
    assert len(after) == len(before) and after != before and b"sealed" not in after
    with pytest.raises(DeviceKeyMissingError):
        devices.load(FS, b"pw")
    devices.wipe(FS)  # idempotent


def test_state_roundtrip(devices: DeviceStore) -> None:
    assert devices.load_state(FS) == DeviceState()
    state = DeviceState(
        commit_seq=7,
        commit_hash=b"\x01" * 32,
        key_check=b"\x02" * 32,
        keyring_version=4,
        generation_checks={1: b"\x03" * 32, 2: b"\x04" * 32},
    )
    devices.save_state(FS, state)
    assert devices.load_state(FS) == state
    path = devices.folder(FS) / STATE_FILE
    assert path.stat().st_mode & 0o777 == 0o600

    def bump(s: DeviceState) -> None:
        s.keyring_version += 1

    assert devices.update_state(FS, bump).keyring_version == 5
    assert devices.load_state(FS).keyring_version == 5
    assert not [p for p in devices.folder(FS).iterdir() if p.name.endswith(".tmp")]
    path.chmod(0o644)
    with pytest.raises(KeyFileModeError):
        devices.load_state(FS)
    path.chmod(0o600)
    path.write_text("{}")
    with pytest.raises(FormatError):
        devices.load_state(FS)


def test_default_kdf_is_fast_enough_and_above_floors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENCFS_CLOUD_TEST_FAST_KDF")
    params = passkdf.KdfParams.default()
    params.check()
    assert params.memory_kib >= passkdf.MIN_MEMORY_KIB >= 19 * 1024
    start = time.perf_counter()
    params.derive(b"pw")
    assert time.perf_counter() - start < 1.0
    monkeypatch.setenv("ENCFS_CLOUD_TEST_FAST_KDF", "1")
    fast = passkdf.KdfParams.default()
    fast.check()  # the test shortcut still sits on the floors
    assert fast.memory_kib == passkdf.MIN_MEMORY_KIB
