"""The bucket vault: init, unlock, recovery, enrollment, revocation, and a hostile bucket."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from encfs_cloud import layout
from encfs_cloud.crypto import aead
from encfs_cloud.errors import (
    AbortedError,
    DeviceKeyMissingError,
    DeviceRevokedError,
    FormatError,
    IntegrityError,
    LeaseHeldError,
    NoFilesystemError,
    NotEmptyError,
    PreconditionFailedError,
    RecoveryKeyError,
    RollbackError,
    UsageError,
    WrongPassphraseError,
)
from encfs_cloud.keys import enrollment, records, vault
from encfs_cloud.keys import master as K
from encfs_cloud.keys.device import STATE_FILE, DeviceStore
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.memory import MemoryStore

pytestmark = pytest.mark.usefixtures("fast_kdf")

PW = b"pass phrase"


Machine = Callable[[str], DeviceStore]


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    """machine("a") is the device store of one simulated machine (its own XDG data dir)."""

    def make(name: str) -> DeviceStore:
        return DeviceStore(tmp_path / f"xdg-{name}" / "encfs-cloud")

    return make


def _init(store: ObjectStore, devices: DeviceStore) -> tuple[vault.Unlocked, str]:
    return vault.init_filesystem(store, devices, PW, "laptop")


def _enroll(
    store: ObjectStore,
    approver: vault.Unlocked,
    approver_devices: DeviceStore,
    devices: DeviceStore,
    name: str = "phone",
) -> vault.Unlocked:
    code = enrollment.request_enrollment(store, devices, None, name)
    enrollment.approve(store, approver, approver_devices, code)
    return vault.unlock(store, devices, None)


def test_init_writes_header_last_and_unlocks(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    unlocked, text = _init(store, a)
    names = sorted(i.name for i in store.list())
    assert names == sorted(
        [
            layout.HEADER_NAME,
            records.KEYRING_NAME,
            records.RECOVERY_NAME,
            records.record_name(unlocked.device.device_id),
        ]
    )
    header = vault.read_header(store)
    assert header["magic"] == "encfs-cloud" and header["format"] == layout.FORMAT_VERSION
    assert bytes.fromhex(header["fs_id"]) == unlocked.fs_id == records.fs_id_of(header)
    assert header["cipher"] == "AES-256-GCM" and header["chunk_size"] == layout.CHUNK_SIZE
    assert K.parse_recovery_key(text)
    again = vault.unlock(store, a, PW)
    assert again.fs_id == unlocked.fs_id
    assert K.key_check(again.keys) == K.key_check(unlocked.keys)
    assert [d.name for d in again.keyring.devices] == ["laptop"]
    state = a.load_state(unlocked.fs_id)
    assert state.key_check == K.key_check(again.keys) and state.keyring_version == 1
    for u in (unlocked, again):
        assert "redacted" in repr(u)
        assert bytes(u.keys.key(1).material).hex() not in repr(u)
    again.wipe()
    assert again.keys.key(1).wiped


def test_init_refuses_non_empty(store: ObjectStore, machine: Machine) -> None:
    store.put("something", b"x")
    with pytest.raises(NotEmptyError):
        _init(store, machine("a"))
    assert [i.name for i in store.list()] == ["something"]


class FailingStore(MemoryStore):
    """Fails the put of one named object, once."""

    def __init__(self, fail: str, exc: Exception) -> None:
        super().__init__()
        self.fail, self.exc = fail, exc

    def put(
        self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        if name == self.fail:
            self.fail = ""
            raise self.exc
        return super().put(name, data, if_none_match=if_none_match, if_match=if_match)


@pytest.mark.parametrize("name", [layout.HEADER_NAME, records.KEYRING_NAME])
def test_init_leaves_nothing_half_written(machine: Machine, name: str) -> None:
    store = FailingStore(name, OSError("network down"))
    a = machine("a")
    with pytest.raises(OSError):
        _init(store, a)
    assert list(store.list()) == []
    assert not a.root.exists() or not any(a.root.iterdir())


def test_concurrent_init_loses_cleanly(machine: Machine) -> None:
    store = FailingStore(records.RECOVERY_NAME, PreconditionFailedError("exists"))
    with pytest.raises(NotEmptyError, match="another init"):
        _init(store, machine("a"))
    assert list(store.list()) == []


def test_header_errors(store: ObjectStore) -> None:
    with pytest.raises(NoFilesystemError, match="create one with encfs-cloud init"):
        vault.read_header(store)
    store.put(layout.HEADER_NAME, b"\x00garbage")
    with pytest.raises(FormatError, match="not an encfs-cloud filesystem"):
        vault.read_header(store)
    store.put(layout.HEADER_NAME, json.dumps({"magic": "gocryptfs"}).encode())
    with pytest.raises(FormatError, match="not an encfs-cloud filesystem"):
        vault.read_header(store)


def _rewrite_header(store: ObjectStore, **changes: object) -> None:
    header = json.loads(store.get(layout.HEADER_NAME))
    header.update(changes)
    store.put(layout.HEADER_NAME, json.dumps(header).encode())


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format": 3}, r"newer encfs-cloud \(format 3\); upgrade"),
        ({"format": 1}, r"format 1, which this encfs-cloud no longer opens"),
        ({"features": ["holograms"]}, "newer encfs-cloud.*holograms"),
        ({"cipher": "ROT13"}, "cipher"),
        (
            {
                "kdf": {
                    "name": "argon2id",
                    "min_memory_kib": 1024,
                    "min_iterations": 1,
                    "min_lanes": 1,
                }
            },
            "floors",
        ),
    ],
)
def test_header_from_the_future_or_weakened(
    store: ObjectStore, machine: Machine, changes: dict[str, object], match: str
) -> None:
    _init(store, machine("a"))
    _rewrite_header(store, **changes)
    with pytest.raises(FormatError, match=match):
        vault.read_header(store)


def test_header_modification_detected_after_unlock(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    _init(store, a)
    # Raising a floor parses fine; only the tag says it is not what the owner wrote.
    _rewrite_header(
        store,
        kdf={"name": "argon2id", "min_memory_kib": 19456, "min_iterations": 3, "min_lanes": 1},
    )
    vault.read_header(store)
    with pytest.raises(IntegrityError, match="header was modified"):
        vault.unlock(store, a, PW)


def test_wrong_passphrase_and_not_enrolled(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    unlocked, _ = _init(store, a)
    with pytest.raises(WrongPassphraseError):
        vault.unlock(store, a, b"nope")
    with pytest.raises(DeviceKeyMissingError, match=f"{unlocked.fs_id.hex()}.*device request"):
        vault.unlock(store, machine("b"), None)


def test_passwd(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    unlocked, _ = _init(store, a)
    enrollment.change_passphrase(a, unlocked.fs_id, PW, b"new one")
    with pytest.raises(WrongPassphraseError):
        vault.unlock(store, a, PW)
    vault.unlock(store, a, b"new one")


def test_tampered_key_record_and_keyring(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    unlocked, _ = _init(store, a)
    name = records.record_name(unlocked.device.device_id)
    good = store.get(name)
    doc = json.loads(good)
    wrapped = bytearray(records.unb64(doc["wrapped"]))
    wrapped[-5] ^= 1
    doc["wrapped"] = records.b64(bytes(wrapped))
    store.put(name, json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="key record"):
        vault.unlock(store, a, PW)
    store.put(name, good)
    ring = bytearray(store.get(records.KEYRING_NAME))
    ring[-3] ^= 1
    store.put(records.KEYRING_NAME, bytes(ring))
    with pytest.raises(IntegrityError, match="keyring"):
        vault.unlock(store, a, PW)


def _substitute_keys(store: ObjectStore, fs_id: bytes, device_id: str, public: bytes) -> None:
    """What a hostile bucket owner can do: hand a device master keys it chose itself."""
    fake = K.new_master_keys()
    wrapped = K.wrap_for_device(fake, fs_id, device_id, public)
    record = records.encode_record("device-key", device_id, fake, wrapped, os.urandom(32))
    store.put(records.record_name(device_id), record)
    entry = K.DeviceEntry(device_id, "x", records.now(), public, 1)
    ring = K.Keyring(99, 1, os.urandom(32), records.now(), [entry])
    store.put(records.KEYRING_NAME, K.seal_keyring(fake, fs_id, ring))
    header = json.loads(store.get(layout.HEADER_NAME))
    store.put(layout.HEADER_NAME, records.seal_header(fake, header))


def test_fake_master_key_substitution_refused(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    unlocked, _ = _init(store, a)
    _substitute_keys(store, unlocked.fs_id, unlocked.device.device_id, unlocked.device.public)
    with pytest.raises(IntegrityError, match="substitution"):
        vault.unlock(store, a, PW)
    # Even with its local state lost, the device wants a tag only a real enrollment can make.
    (a.folder(unlocked.fs_id) / STATE_FILE).unlink()
    with pytest.raises(IntegrityError, match="substitution"):
        vault.unlock(store, a, PW)


def test_lost_state_recovers_trust_from_confirm_tag(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    unlocked, _ = _init(store, a)
    (a.folder(unlocked.fs_id) / STATE_FILE).unlink()
    assert K.key_check(vault.unlock(store, a, PW).keys) == K.key_check(unlocked.keys)


def test_keyring_rollback_refused(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    unlocked, _ = _init(store, a)
    old = store.get(records.KEYRING_NAME)
    enrollment.rename_device(store, unlocked, a, unlocked.device.device_id, "work laptop")
    assert vault.unlock(store, a, PW).keyring.devices[0].name == "work laptop"
    store.put(records.KEYRING_NAME, old)
    with pytest.raises(RollbackError):
        vault.unlock(store, a, PW)


def test_request_approve_and_codes(store: ObjectStore, machine: Machine) -> None:
    a, b = machine("a"), machine("b")
    unlocked, _ = _init(store, a)
    code = enrollment.request_enrollment(store, b, b"phone pw", "phone")
    assert enrollment.request_enrollment(store, b, b"phone pw", "phone") == code  # same again
    with pytest.raises(DeviceKeyMissingError, match=code):
        vault.unlock(store, b, b"phone pw")
    reqs = enrollment.list_requests(store, unlocked.fs_id)
    assert [r.name for r in reqs] == ["phone"]
    wrong = "0000-0000-0000" if code != "0000-0000-0000" else "1111-1111-1111"
    with pytest.raises(AbortedError):
        enrollment.approve(store, unlocked, a, wrong)
    entry = enrollment.approve(store, unlocked, a, code.lower().replace("-", ""))
    assert entry.name == "phone"
    assert enrollment.list_requests(store, unlocked.fs_id) == []
    ub = vault.unlock(store, b, b"phone pw")
    assert K.key_check(ub.keys) == K.key_check(unlocked.keys)
    assert sorted(d.name for d in enrollment.list_devices(store, ub)) == ["laptop", "phone"]
    with pytest.raises(UsageError, match="already enrolled"):
        enrollment.request_enrollment(store, b, b"phone pw", "phone")


def test_swapped_request_key_refused(store: ObjectStore, machine: Machine) -> None:
    """The bucket owner replaces the new device's public key with its own: no code matches."""
    a, b, evil = machine("a"), machine("b"), machine("evil")
    unlocked, _ = _init(store, a)
    code = enrollment.request_enrollment(store, b, None, "phone")
    req = enrollment.list_requests(store, unlocked.fs_id)[0]
    attacker = evil.create(unlocked.fs_id, "phone", None)
    body = json.loads(req.body)
    body["public_key"] = records.b64(attacker.public)
    doc = {"body": json.dumps(body), "mac": records.b64(req.mac)}
    store.put(enrollment.request_name(req.device_id), json.dumps(doc).encode())
    with pytest.raises(AbortedError):
        enrollment.approve(store, unlocked, a, code)
    assert not store.head(records.record_name(req.device_id))


def test_new_device_refuses_keys_nobody_approved(store: ObjectStore, machine: Machine) -> None:
    a, b = machine("a"), machine("b")
    unlocked, _ = _init(store, a)
    enrollment.request_enrollment(store, b, None, "phone")
    req = enrollment.list_requests(store, unlocked.fs_id)[0]
    _substitute_keys(store, unlocked.fs_id, req.device_id, req.public_key)
    with pytest.raises(IntegrityError, match="substitution"):
        vault.unlock(store, b, None)


def test_recovery_after_wiping(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    unlocked, text = _init(store, a)
    a.wipe(unlocked.fs_id)
    assert not a.folder(unlocked.fs_id).exists()
    with pytest.raises(DeviceKeyMissingError):
        vault.unlock(store, a, PW)
    typo = ("0" if text[0] != "0" else "1") + text[1:]
    with pytest.raises(RecoveryKeyError, match="typo"):
        vault.unlock_with_recovery(store, a, typo, None, "laptop again")
    other_text = K.new_recovery_key()[0]
    with pytest.raises(RecoveryKeyError):
        vault.unlock_with_recovery(store, a, other_text, None, "laptop again")
    assert not a.has(unlocked.fs_id)
    back = vault.unlock_with_recovery(store, a, text.lower(), b"new pw", "laptop again")
    assert K.key_check(back.keys) == K.key_check(unlocked.keys)
    assert sorted(d.name for d in back.keyring.devices) == ["laptop", "laptop again"]
    assert vault.unlock(store, a, b"new pw").device.device_id == back.device.device_id
    with pytest.raises(UsageError, match="wipe it first"):
        vault.unlock_with_recovery(store, a, text, None, "third")


def test_substituted_recovery_record_refused(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    unlocked, text = _init(store, a)
    rec = K.parse_recovery_key(text)
    fake = K.new_master_keys()  # a revoked device knows the recovery public key
    wrapped = K.wrap_for_recovery(fake, unlocked.fs_id, K.recovery_public(rec))
    store.put(
        records.RECOVERY_NAME,
        records.encode_record("recovery-key", K.RECOVERY_ID, fake, wrapped, b"\0" * 32),
    )
    with pytest.raises(IntegrityError, match="substituted"):
        vault.unlock_with_recovery(store, machine("b"), text, None, "x")


def test_revoke(store: ObjectStore, machine: Machine) -> None:
    a, b, c = machine("a"), machine("b"), machine("c")
    ua, text = _init(store, a)
    ub = _enroll(store, ua, a, b, "phone")
    uc = _enroll(store, ua, a, c, "tablet")
    stolen = ub.keys.copy()  # everything the revoked device could have kept
    old_sealer = Sealer(ua.fs_id, ua.keys)
    before = old_sealer.seal_object("meta/0000000000000001", "commit", b"before")
    with pytest.raises(UsageError):
        enrollment.revoke_device(store, ua, a, ua.device.device_id)
    gen = enrollment.revoke_device(store, ua, a, ub.device.device_id)
    assert gen == 2 and ua.keys.current == 2
    after = old_sealer.seal_object("meta/0000000000000002", "commit", b"after")  # same Sealer
    thief = Sealer(ua.fs_id, stolen)
    assert thief.open_object("meta/0000000000000001", "commit", before) == b"before"
    with pytest.raises(IntegrityError):
        thief.open_object("meta/0000000000000002", "commit", after)
    with pytest.raises(DeviceRevokedError):
        vault.unlock(store, b, None)
    uc2 = vault.unlock(store, c, None)
    assert uc2.keys.generations == (1, 2)
    assert Sealer(uc2.fs_id, uc2.keys).open_object("meta/0000000000000002", "commit", after)
    assert sorted(d.name for d in uc2.keyring.devices) == ["laptop", "tablet"]
    assert not store.head(records.record_name(ub.device.device_id))
    assert vault.unlock(store, a, PW).keys.current == 2
    # The header was re-tagged under the new generation; recovery gets generation 2 too.
    assert (
        records.check_header_tag(
            uc2.keys,
            records.header_body(vault.read_header(store)),
            records.unb64(vault.read_header(store)["auth"]),
        )
        == 2
    )
    del uc
    ud = vault.unlock_with_recovery(store, machine("d"), text, None, "rescue")
    assert ud.keys.current == 2


def test_rolled_back_key_record_after_revoke_refused(store: ObjectStore, machine: Machine) -> None:
    a, b, c = machine("a"), machine("b"), machine("c")
    ua, _ = _init(store, a)
    ub = _enroll(store, ua, a, b)
    _enroll(store, ua, a, c, "tablet")
    snapshot = {i.name: store.get(i.name) for i in store.list()}
    enrollment.revoke_device(store, ua, a, ub.device.device_id)
    vault.unlock(store, c, None)  # c has now seen generation 2
    for name, data in snapshot.items():  # the bucket owner replays the old key objects
        store.put(name, data)
    with pytest.raises(RollbackError):
        vault.unlock(store, c, None)


def test_interrupted_revoke_commits_nothing(machine: Machine) -> None:
    a, b = machine("a"), machine("b")
    store = FailingStore("", OSError("crash"))
    ua, _ = _init(store, a)
    ub = _enroll(store, ua, a, b)
    store.fail = records.KEYRING_NAME
    with pytest.raises(OSError):
        enrollment.revoke_device(store, ua, a, ub.device.device_id)
    assert ua.keys.current == 1  # never seals under an uncommitted generation
    again = vault.unlock(store, a, PW)
    assert again.keys.current == 1 and again.keys.generations == (1,)
    assert enrollment.revoke_device(store, again, a, ub.device.device_id) == 2
    with pytest.raises(DeviceRevokedError):
        vault.unlock(store, b, None)


def test_rotate_recovery_key(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    ua, old = _init(store, a)
    new = enrollment.rotate_recovery_key(store, ua, a)
    assert new != old and not store.head(records.RECOVERY_NEXT_NAME)
    with pytest.raises(RecoveryKeyError):
        vault.unlock_with_recovery(store, machine("b"), old, None, "x")
    vault.unlock_with_recovery(store, machine("c"), new, None, "y")


def test_keyring_lock(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    ua, _ = _init(store, a)
    with records.keyring_lock(store, "someone"), pytest.raises(LeaseHeldError):
        enrollment.rename_device(store, ua, a, ua.device.device_id, "x")
    assert not store.head(records.LOCK_NAME)
    stale = {"holder": "crashed", "taken_at": 0}
    store.put(records.LOCK_NAME, json.dumps(stale).encode())
    enrollment.rename_device(store, ua, a, ua.device.device_id, "x")  # takes over a stale lock
    assert not store.head(records.LOCK_NAME)


def test_find_device(store: ObjectStore, machine: Machine) -> None:
    a = machine("a")
    ua, _ = _init(store, a)
    me = ua.device.device_id
    assert enrollment.find_device(ua.keyring, me[:6]).device_id == me
    assert enrollment.find_device(ua.keyring, "laptop").device_id == me
    with pytest.raises(UsageError):
        enrollment.find_device(ua.keyring, "desktop")


def test_sealed_object_under_keys(store: ObjectStore, machine: Machine) -> None:
    """The Unlocked keys plug straight into the sealing layer."""
    ua, _ = _init(store, machine("a"))
    blob = aead.seal(ua.keys.subkey("lease"), b"x", b"ad")
    assert aead.open_sealed(ua.keys.subkey("lease", 1), blob, b"ad") == b"x"


def test_refresh_adopts_a_revocation_made_elsewhere(store: ObjectStore, machine: Machine) -> None:
    a, b, c = machine("a"), machine("b"), machine("c")
    ua, _ = _init(store, a)
    ub = _enroll(store, ua, a, b)
    uc = _enroll(store, ua, a, c, "tablet")
    sealer = Sealer(ua.fs_id, ua.keys)  # a running mount on device a
    enrollment.revoke_device(store, uc, c, ub.device.device_id)  # done from device c
    assert ua.keys.current == 1
    assert vault.refresh(store, a, ua) is True
    assert ua.keys.current == 2 and not vault.refresh(store, a, ua)
    blob = sealer.seal_object("meta/0000000000000009", "commit", b"new")
    with pytest.raises(IntegrityError):
        Sealer(ub.fs_id, ub.keys).open_object("meta/0000000000000009", "commit", blob)
    with pytest.raises(DeviceRevokedError):
        vault.refresh(store, b, ub)
    # Management from a stale mount refreshes first, so it wraps the newest generation.
    d = machine("d")
    code = enrollment.request_enrollment(store, d, None, "desk")
    stale = vault.unlock(store, a, PW)
    enrollment.revoke_device(store, uc, c, ua.device.device_id)
    with pytest.raises(DeviceRevokedError):
        enrollment.approve(store, stale, a, code)
    enrollment.approve(store, uc, c, code)
    assert vault.unlock(store, d, None).keys.current == 3


def test_no_secret_reaches_the_log(
    store: ObjectStore, machine: Machine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = machine("a"), machine("b")
    ua, text = _init(store, a)
    ub = _enroll(store, ua, a, b)
    store.put(enrollment.request_name("f" * 32), b"junk")  # makes list_requests log a warning
    enrollment.list_requests(store, ua.fs_id)
    with records.keyring_lock(store, "x"), pytest.raises(LeaseHeldError):
        enrollment.revoke_device(store, ua, a, ub.device.device_id)
    enrollment.revoke_device(store, ua, a, ub.device.device_id)
    secrets = [text, text.replace("-", ""), ua.device.private_key.private_bytes_raw().hex()]
    secrets += [bytes(ua.keys.key(g).material).hex() for g in ua.keys.generations]
    logged = caplog.text + repr(ua) + repr(ua.keyring) + repr(ua.device) + repr(ua.keys)
    assert "malformed enrollment request" in caplog.text
    for secret in secrets:
        assert secret not in logged and secret.lower() not in logged.lower()
