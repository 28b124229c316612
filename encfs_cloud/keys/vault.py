"""Opening the vault: init, unlock with a device key, unlock with the recovery key."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from encfs_cloud import layout
from encfs_cloud.crypto import codes
from encfs_cloud.crypto.aead import SecretKey
from encfs_cloud.errors import (
    AbortedError,
    DeviceKeyMissingError,
    DeviceRevokedError,
    FormatError,
    IntegrityError,
    NotEmptyError,
    ObjectMissingError,
    PreconditionFailedError,
    RecoveryKeyError,
    UsageError,
)
from encfs_cloud.keys import master as K
from encfs_cloud.keys.device import DeviceIdentity, DeviceStore
from encfs_cloud.keys.records import (
    KEYRING_NAME,
    RECOVERY_NAME,
    RECOVERY_NEXT_NAME,
    decode_record,
    device_record,
    entry_for,
    fs_id_of,
    keyring_lock,
    load_keyring,
    new_header,
    now,
    own_confirm,
    parse_header,
    read_header,
    record_name,
    record_start,
    recovery_record,
    seal_header,
    start_bytes,
    store_keyring,
    verify_header,
)
from encfs_cloud.keys.trust import (
    adopt_keyring,
    check_generations,
    check_header_generation,
    check_keyring_generation,
    refuse_if_uncommitted,
    remember,
    same,
    seed_state,
)
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.capped import read_capped

log = logging.getLogger(__name__)

__all__ = [
    "Unlocked",
    "enroll_device",
    "init_filesystem",
    "read_header",
    "refresh",
    "remember",
    "unlock",
    "unlock_with_recovery",
]


@dataclass(repr=False)
class Unlocked:
    """An opened filesystem: everything the mount needs; `wipe()` at unmount."""

    fs_id: bytes
    header: dict[str, Any]
    keys: K.MasterKeys
    device: DeviceIdentity
    keyring: K.Keyring

    def wipe(self) -> None:
        self.keys.wipe()
        self.device.wipe()

    def __repr__(self) -> str:
        return f"<Unlocked fs={self.fs_id.hex()} device={self.device.device_id} redacted>"


def finish_open(
    store: ObjectStore,
    devices: DeviceStore,
    header: dict[str, Any],
    keys: K.MasterKeys,
    identity: DeviceIdentity,
) -> Unlocked:
    """Keyring, generation and header checks shared by unlock and recovery."""
    fs_id = fs_id_of(header)
    state = devices.load_state(fs_id)
    ring, _ = load_keyring(store, keys, fs_id)
    entry = ring.device(identity.device_id)
    if entry is None:
        raise DeviceRevokedError(
            f"this device is not in the keyring of filesystem {fs_id.hex()}: it was revoked "
            "(or its approval did not finish); enroll again with encfs-cloud device request"
        )
    if not same(entry.public_key, identity.public):
        raise IntegrityError("the keyring lists another public key for this device")
    check_generations(keys, state, ring)  # a device that saw newer: a rollback (exit 13)
    check_keyring_generation(keys, ring)
    adopt_keyring(keys, ring)
    try:
        header_gen = verify_header(keys, header)
    except IntegrityError:
        raise IntegrityError("header was modified") from None
    check_header_generation(state, header_gen)
    remember(devices, fs_id, keys, ring, header_gen)
    return Unlocked(fs_id, header, keys, identity, ring)


# --- init, unlock, recovery -------------------------------------------------------------------


def init_filesystem(
    store: ObjectStore, devices: DeviceStore, passphrase: bytes | None, device_name: str
) -> tuple[Unlocked, str]:
    """A new filesystem in an empty store; returns it unlocked and the recovery key text."""
    if next(iter(store.list("")), None) is not None:
        raise NotEmptyError(f"{store.url} is not empty; init needs an empty bucket or prefix")
    fs_id = os.urandom(16)
    identity = devices.create(fs_id, device_name, passphrase)
    keys = K.new_master_keys()
    keys.keyring_floor = 1  # generation 1 is committed by keyring version 1
    written: list[str] = []
    try:
        check = K.key_check(keys)
        text, rec = K.new_recovery_key()
        rec_public = K.recovery_public(rec)
        rec_confirm = K.recovery_confirm(rec, fs_id, check)
        rec.wipe()
        entry = entry_for(identity, keys.current)
        ring = K.Keyring(1, keys.current, rec_public, now(), [entry])
        header = new_header(fs_id)
        # Fixed names go first with if_none_match: of two concurrent inits only one gets past
        # the recovery record, and the loser then deletes only its own, randomly named, objects.
        objects = [
            (RECOVERY_NAME, recovery_record(keys, fs_id, rec_public, rec_confirm)),
            (KEYRING_NAME, K.seal_keyring(keys, fs_id, ring)),
            (
                record_name(identity.device_id),
                device_record(keys, fs_id, entry, own_confirm(identity, fs_id, check)),
            ),
            (layout.HEADER_NAME, seal_header(keys, header)),  # last: it makes the filesystem
        ]
        for name, data in objects:
            try:
                store.put(name, data, if_none_match=True)
            except PreconditionFailedError:
                raise NotEmptyError(f"another init of {store.url} is running or won") from None
            written.append(name)
        header = parse_header(objects[-1][1], store.url)
        unlocked = finish_open(store, devices, header, keys, identity)
    except BaseException:
        for name in reversed(written):
            try:
                store.delete(name)
            except Exception as exc:
                log.warning("init cleanup could not delete %s: %s", name, exc)
        keys.wipe()
        devices.wipe(fs_id)
        raise
    return unlocked, text


def unlock(store: ObjectStore, devices: DeviceStore, passphrase: bytes | None) -> Unlocked:
    header = read_header(store)
    fs_id = fs_id_of(header)
    if not devices.has(fs_id):
        raise DeviceKeyMissingError(
            f"this device is not enrolled for filesystem {fs_id.hex()}; "
            "run encfs-cloud device request / recover"
        )
    identity = devices.load(fs_id, passphrase)
    try:
        unlocked = _unlock_device(store, devices, header, identity)
    except BaseException:
        identity.wipe()
        raise
    if identity.kdf is not None:  # the (now authenticated) header may raise the floors
        kdf = header["kdf"]
        try:
            identity.kdf.check(kdf["min_memory_kib"], kdf["min_iterations"], kdf["min_lanes"])
        except FormatError:
            unlocked.wipe()
            raise FormatError(
                "this device's passphrase KDF is below the filesystem's floors; "
                "run encfs-cloud passwd to re-seal it"
            ) from None
    return unlocked


def _unlock_device(
    store: ObjectStore, devices: DeviceStore, header: dict[str, Any], identity: DeviceIdentity
) -> Unlocked:
    fs_id = fs_id_of(header)
    try:
        raw = read_capped(store, record_name(identity.device_id), layout.KEY_RECORD_CAP)
    except ObjectMissingError:
        if store.head(layout.REQUESTS_PREFIX + identity.device_id) is not None:
            code = codes.enrollment_code(identity.private_key, fs_id, identity.device_id)
            raise DeviceKeyMissingError(
                f"this device waits for approval; on an enrolled device run "
                f"encfs-cloud device approve and type the code {code}"
            ) from None
        raise DeviceRevokedError(
            f"this device's key record for filesystem {fs_id.hex()} is gone: it was revoked; "
            "enroll again with encfs-cloud device request / recover"
        ) from None
    gen, wrapped, confirm = decode_record(raw, identity.device_id)
    start = record_start(raw)
    try:
        keys = K.unwrap_for_device(wrapped, fs_id, identity.device_id, identity.private_key)
    except IntegrityError:
        raise IntegrityError("this device's key record was modified") from None
    try:
        if gen != keys.current:
            raise IntegrityError("this device's key record was modified (generation)")
        check = K.key_check(keys)
        state = devices.load_state(fs_id)
        if state.key_check is not None:
            trusted = same(state.key_check, check)
        else:
            # First unlock after approval (or lost state): only a device that knew our
            # enrollment code could have made this tag, so the bucket cannot substitute keys.
            # The tag also covers the head the approver had seen, which becomes ours.
            code = codes.enrollment_code(identity.private_key, fs_id, identity.device_id)
            covered = check + start_bytes(start)
            trusted = codes.enrollment_confirm_ok(code, fs_id, identity.device_id, covered, confirm)
            if trusted and start is not None:
                seed_state(devices, fs_id, start)
        if not trusted:
            raise IntegrityError(
                "the master key offered to this device is not the filesystem's "
                "(key substitution refused)"
            )
        return finish_open(store, devices, header, keys, identity)
    except BaseException:
        keys.wipe()
        raise


def refresh(store: ObjectStore, devices: DeviceStore, unlocked: Unlocked) -> bool:
    """Adopt generations committed since unlock (another device revoked one); True if any.

    A long-running mount must call this now and then (before commits, with the lease): until
    it does, it keeps sealing under a generation the revoked device still holds.
    """
    fs_id, identity = unlocked.fs_id, unlocked.device
    try:
        raw = read_capped(store, record_name(identity.device_id), layout.KEY_RECORD_CAP)
    except ObjectMissingError:
        raise DeviceRevokedError(f"this device was revoked from filesystem {fs_id.hex()}") from None
    gen, wrapped, _ = decode_record(raw, identity.device_id)
    try:
        fresh = K.unwrap_for_device(wrapped, fs_id, identity.device_id, identity.private_key)
    except IntegrityError:
        raise IntegrityError("this device's key record was modified") from None
    try:
        held = unlocked.keys.generations
        if gen != fresh.current or not all(
            g in fresh.generations and same(K.key_check(fresh, g), K.key_check(unlocked.keys, g))
            for g in held
        ):
            raise IntegrityError("this device's key record changed keys it already held")
        ring, _ = load_keyring(store, fresh, fs_id)
        if ring.device(identity.device_id) is None:
            raise DeviceRevokedError(f"this device was revoked from filesystem {fs_id.hex()}")
        check_generations(fresh, devices.load_state(fs_id), ring)
        check_keyring_generation(fresh, ring)
        adopt_keyring(fresh, ring)
        added = [g for g in fresh.generations if g > unlocked.keys.current]
        for g in added:
            unlocked.keys.add(g, SecretKey(fresh.key(g).material))
        unlocked.keys.starts = dict(ring.starts)
        unlocked.keys.keyring_floor = fresh.keyring_floor
        unlocked.keys.uncommitted = fresh.uncommitted
        unlocked.keyring = ring
        remember(devices, fs_id, unlocked.keys, ring)
        return bool(added)
    finally:
        fresh.wipe()


def open_recovery(store: ObjectStore, fs_id: bytes, rec: SecretKey) -> K.MasterKeys:
    """The generations behind the recovery key (also tries a half-finished rotation)."""
    refused: list[RecoveryKeyError] = []
    for name in (RECOVERY_NAME, RECOVERY_NEXT_NAME):
        try:
            raw = read_capped(store, name, layout.KEY_RECORD_CAP)
        except ObjectMissingError:
            continue
        gen, wrapped, confirm = decode_record(raw, K.RECOVERY_ID)
        try:
            keys = K.unwrap_for_recovery(wrapped, fs_id, rec)
        except RecoveryKeyError as exc:
            refused.append(exc)
            continue
        if gen != keys.current or not K.recovery_confirm_ok(rec, fs_id, K.key_check(keys), confirm):
            keys.wipe()
            raise IntegrityError("the recovery record was substituted (key confirmation failed)")
        return keys
    raise refused[0] if refused else RecoveryKeyError("this filesystem has no recovery record")


def unlock_with_recovery(
    store: ObjectStore,
    devices: DeviceStore,
    recovery_text: str,
    passphrase: bytes | None,
    device_name: str,
) -> Unlocked:
    """Open with the recovery key and enroll this machine as a new device."""
    rec = K.parse_recovery_key(recovery_text)  # the checksum is checked before anything else
    header = read_header(store)
    fs_id = fs_id_of(header)
    if devices.has(fs_id):
        rec.wipe()
        raise UsageError(
            f"this machine already has a device key for filesystem {fs_id.hex()}; unlock with it, "
            "or wipe it first (encfs-cloud wipe SOURCE) to recover"
        )
    try:
        keys = open_recovery(store, fs_id, rec)
        rec_public = K.recovery_public(rec)
    finally:
        rec.wipe()
    identity: DeviceIdentity | None = None
    try:
        # Refuse a rolled-back bucket before enrolling (state survives only if not wiped).
        state = devices.load_state(fs_id)
        try:
            ring, _ = load_keyring(store, keys, fs_id)
        except DeviceRevokedError:
            # The record opened but holds no generation the keyring is sealed under: an old
            # record with an old key, both replaced by a rotation.
            raise RecoveryKeyError(
                "this recovery key no longer opens the filesystem: it was rotated out "
                "(recovery-key --rotate); use the newest one"
            ) from None
        if not same(ring.recovery_public, rec_public):
            # An old key with an old record the bucket owner put back: rotated out.
            raise RecoveryKeyError(
                "this recovery key was replaced (recovery-key --rotate); use the newest one"
            )
        check_generations(keys, state, ring)
        check_keyring_generation(keys, ring)
        adopt_keyring(keys, ring)
        identity = devices.create(fs_id, device_name, passphrase)
        enroll_device(
            store,
            keys,
            fs_id,
            identity.device_id,
            entry_for(identity, ring.generation),
            own_confirm(identity, fs_id, K.key_check(keys)),
        )
        return finish_open(store, devices, header, keys, identity)
    except BaseException:
        keys.wipe()
        if identity is not None:
            identity.wipe()
            devices.wipe(fs_id)
        raise


def enroll_device(
    store: ObjectStore,
    keys: K.MasterKeys,
    fs_id: bytes,
    holder: str,
    entry: K.DeviceEntry,
    confirm: bytes,
    start: dict[str, Any] | None = None,
) -> K.Keyring:
    """Wrap every generation for `entry` and add it to the keyring (under the keyring lock)."""
    refuse_if_uncommitted(keys)
    with keyring_lock(store, holder):
        ring, etag = load_keyring(store, keys, fs_id)
        if ring.device(entry.device_id) is not None:
            raise AbortedError(f"device {entry.device_id} is already enrolled")
        entry = K.DeviceEntry(
            entry.device_id, entry.name, entry.enrolled_at, entry.public_key, ring.generation
        )
        name = record_name(entry.device_id)
        store.put(name, device_record(keys, fs_id, entry, confirm, start))
        new = K.Keyring(
            ring.version + 1,
            ring.generation,
            ring.recovery_public,
            ring.recovery_created_at,
            [*ring.devices, entry],
            dict(ring.starts),
        )
        try:
            store_keyring(store, keys, fs_id, new, etag)
        except BaseException:
            store.delete(name)
            raise
        return new
