"""Device management: request, approve, deny, list, rename, revoke; recovery key; passphrase."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from encfs_cloud import layout
from encfs_cloud.crypto import codes
from encfs_cloud.errors import AbortedError, IntegrityError, ObjectMissingError, UsageError
from encfs_cloud.keys import master as K
from encfs_cloud.keys.device import DeviceStore, validate_device_name
from encfs_cloud.keys.generations import NewRecovery, start_generation
from encfs_cloud.keys.records import (
    RECOVERY_NAME,
    RECOVERY_NEXT_NAME,
    b64,
    canonical,
    fs_id_of,
    keyring_lock,
    load_keyring,
    now,
    read_header,
    record_name,
    start_bytes,
    store_keyring,
    unb64,
)
from encfs_cloud.keys.trust import refuse_if_uncommitted, remember
from encfs_cloud.keys.vault import Unlocked, enroll_device, refresh
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.capped import read_capped

log = logging.getLogger(__name__)

_DEVICE_ID = re.compile(r"[0-9a-f]{32}")  # never "keyring", "lock", "recovery": see records


@dataclass(frozen=True)
class EnrollmentRequest:
    """A pending request, as published (unauthenticated until its code is typed)."""

    device_id: str
    name: str
    public_key: bytes
    requested_at: str
    body: bytes
    mac: bytes


def request_name(device_id: str) -> str:
    return layout.REQUESTS_PREFIX + device_id


def request_enrollment(
    store: ObjectStore, devices: DeviceStore, passphrase: bytes | None, device_name: str
) -> str:
    """Publish this machine's public key; returns the code to type on an enrolled device.

    Running it again (same machine) republishes the same request and shows the same code.
    """
    fs_id = fs_id_of(read_header(store))
    if devices.has(fs_id):
        identity = devices.load(fs_id, passphrase)
        if store.head(record_name(identity.device_id)) is not None:
            identity.wipe()
            raise UsageError(f"this machine is already enrolled for filesystem {fs_id.hex()}")
    else:
        identity = devices.create(fs_id, device_name, passphrase)
    try:
        body = canonical(
            {
                "format": 1,
                "kind": "enrollment-request",
                "fs_id": fs_id.hex(),
                "device_id": identity.device_id,
                "name": identity.name,
                "public_key": b64(identity.public),
                "requested_at": now(),
            }
        )
        code = codes.enrollment_code(identity.private_key, fs_id, identity.device_id)
        mac = codes.request_mac(code, fs_id, identity.device_id, body)
        doc = {"body": body.decode(), "mac": b64(mac)}
        store.put(request_name(identity.device_id), canonical(doc))
        return code
    finally:
        identity.wipe()


def _parse_request(fs_id: bytes, name: str, raw: bytes) -> EnrollmentRequest:
    doc = json.loads(raw)
    body = doc["body"].encode()
    fields = json.loads(body)
    device_id = str(fields["device_id"])
    if fields["fs_id"] != fs_id.hex() or name != request_name(device_id):
        raise ValueError("request for another filesystem or name")
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError("malformed device id")
    public = unb64(fields["public_key"])
    X25519PublicKey.from_public_bytes(public)  # ValueError unless a 32-byte key
    return EnrollmentRequest(
        device_id,
        validate_device_name(str(fields["name"])),
        public,
        str(fields["requested_at"]),
        body,
        unb64(doc["mac"]),
    )


def list_requests(store: ObjectStore, fs_id: bytes) -> list[EnrollmentRequest]:
    """Pending requests; malformed ones are skipped with a warning (anyone can write them)."""
    found = []
    for info in store.list(layout.REQUESTS_PREFIX):
        try:
            raw = read_capped(store, info.name, layout.SMALL_CAP)
            found.append(_parse_request(fs_id, info.name, raw))
        except ObjectMissingError:
            continue
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            RecursionError,  # deeply nested JSON
            IntegrityError,  # also: larger than a request can be
            UsageError,
        ):
            log.warning("ignoring malformed enrollment request %s", info.name)
    return found


def find_request(requests: list[EnrollmentRequest], what: str) -> EnrollmentRequest:
    """A pending request by exact id or unique id prefix (4+ characters)."""
    what = what.strip().lower()
    found = [r for r in requests if r.device_id == what]
    if not found and len(what) >= 4:
        found = [r for r in requests if r.device_id.startswith(what)]
    if len(found) != 1:
        kind = "no pending request" if not found else f"{len(found)} pending requests"
        raise UsageError(f"{kind} match {what!r}; see encfs-cloud device list")
    return found[0]


def verify_request(fs_id: bytes, request: EnrollmentRequest, code: str) -> None:
    """AbortedError unless `code` authenticates `request` (a malformed code included)."""
    codes.decode(code, codes.CODE_CHARS, "verification code", AbortedError)
    if not codes.request_mac_ok(code, fs_id, request.device_id, request.body, request.mac):
        raise AbortedError(
            "the verification code does not match this request; nothing was enrolled"
        )


def approve(
    store: ObjectStore,
    unlocked: Unlocked,
    devices: DeviceStore,
    code: str,
    device_id: str | None = None,
) -> K.DeviceEntry:
    """Enroll the device whose request the typed `code` authenticates.

    The code is what the new device showed; a request it does not authenticate (a typo, or one
    the bucket owner forged or altered) is refused with AbortedError.
    """
    refresh(store, devices, unlocked)  # wrap the newest generation, not the one we unlocked with
    fs_id = unlocked.fs_id
    matches = [
        r
        for r in list_requests(store, fs_id)
        if (device_id is None or r.device_id == device_id)
        and codes.request_mac_ok(code, fs_id, r.device_id, r.body, r.mac)
    ]
    if not matches:
        raise AbortedError(
            "no pending request matches this code; check it against the new device "
            "(encfs-cloud device request shows it again)"
        )
    req = matches[0]
    keys = unlocked.keys
    # The newest state this device has seen becomes the new device's starting point, so it
    # refuses a bucket rolled back before it (it has no history of its own yet).
    seen = devices.load_state(fs_id)
    start = {
        "seq": seen.commit_seq or 0,
        "hash": (seen.commit_hash or b"").hex(),
        "keyring": unlocked.keyring.version,
    }
    covered = K.key_check(keys) + start_bytes(start)
    confirm = codes.enrollment_confirm(code, fs_id, req.device_id, covered)
    entry = K.DeviceEntry(req.device_id, req.name, now(), req.public_key, keys.current)
    ring = enroll_device(store, keys, fs_id, unlocked.device.device_id, entry, confirm, start)
    store.delete(request_name(req.device_id))
    remember(devices, fs_id, keys, ring)
    unlocked.keyring = ring
    return entry


def deny(store: ObjectStore, device_id: str) -> None:
    store.delete(request_name(device_id))


def check_not_last(store: ObjectStore, own_device_id: str | None) -> None:
    """Refuse to wipe the only key left (no other device, no recovery key): data lost for good.

    Reads object names only, so it works without unlocking; it guards against a slip of the
    user, not against the bucket owner (who can destroy everything anyway).
    """
    others = [
        o.name
        for o in store.list(layout.KEYS_PREFIX)
        if _DEVICE_ID.fullmatch(o.name[len(layout.KEYS_PREFIX) :])
        and o.name != record_name(own_device_id or "")
    ]
    if others or store.head(RECOVERY_NAME) or store.head(RECOVERY_NEXT_NAME):
        return
    raise AbortedError(
        "this is the last enrolled device and there is no recovery key: wiping it makes "
        "the filesystem unreadable forever; add --force to wipe anyway"
    )


def list_devices(store: ObjectStore, unlocked: Unlocked) -> list[K.DeviceEntry]:
    ring, _ = load_keyring(store, unlocked.keys, unlocked.fs_id)
    unlocked.keyring = ring
    return list(ring.devices)


def find_device(ring: K.Keyring, what: str) -> K.DeviceEntry:
    """A device by exact id, unique id prefix (4+ characters) or unique name."""
    found = [d for d in ring.devices if d.device_id == what]
    if not found and len(what) >= 4:
        found = [d for d in ring.devices if d.device_id.startswith(what.lower())]
    if not found:
        found = [d for d in ring.devices if d.name == what]
    if len(found) != 1:
        kind = "no device" if not found else f"{len(found)} devices"
        raise UsageError(f"{kind} match {what!r}; use the id from encfs-cloud device list")
    return found[0]


def rename_device(
    store: ObjectStore, unlocked: Unlocked, devices: DeviceStore, device_id: str, new_name: str
) -> None:
    name = validate_device_name(new_name)
    refresh(store, devices, unlocked)
    refuse_if_uncommitted(unlocked.keys)
    fs_id, keys = unlocked.fs_id, unlocked.keys
    with keyring_lock(store, unlocked.device.device_id):
        ring, etag = load_keyring(store, keys, fs_id)
        old = find_device(ring, device_id)
        entries = [
            K.DeviceEntry(d.device_id, name, d.enrolled_at, d.public_key, d.generation)
            if d.device_id == old.device_id
            else d
            for d in ring.devices
        ]
        new = K.Keyring(
            ring.version + 1,
            ring.generation,
            ring.recovery_public,
            ring.recovery_created_at,
            entries,
            dict(ring.starts),
        )
        store_keyring(store, keys, fs_id, new, etag)
    remember(devices, fs_id, keys, new)
    unlocked.keyring = new


def revoke_device(
    store: ObjectStore, unlocked: Unlocked, devices: DeviceStore, device_id: str
) -> int:
    """Remove a device and start a new generation it never sees; returns the new generation."""
    if device_id == unlocked.device.device_id:
        raise UsageError("a device cannot revoke itself; revoke it from another device or wipe it")
    return start_generation(store, unlocked, devices, remove=device_id).generation


def remove_self(store: ObjectStore, unlocked: Unlocked, devices: DeviceStore) -> int:
    """`wipe`: leave the keyring, with a new generation this device's key never opens.

    A copy of the device folder taken before the wipe (a backup, a disk image) must not read
    what is written afterwards. The new generation is wrapped for the others only; this
    process holds it until it exits, and the caller wipes the local key right after.
    """
    ring = start_generation(store, unlocked, devices, remove=unlocked.device.device_id)
    return ring.generation


def rotate_recovery_key(store: ObjectStore, unlocked: Unlocked, devices: DeviceStore) -> str:
    """A new recovery key and a new generation the old key never opens. Returns its text.

    The old key, with an old copy of keys/recovery (the bucket owner may keep one), still opens
    the generations that existed before; everything written afterwards is sealed under the new
    one, and `recover` refuses a key that is not the keyring's.
    """
    text, rec = K.new_recovery_key()
    try:
        public = K.recovery_public(rec)
        confirm = K.recovery_confirm(rec, unlocked.fs_id, K.key_check(unlocked.keys))
    finally:
        rec.wipe()
    start_generation(store, unlocked, devices, recovery=NewRecovery(public, confirm))
    return text


def change_passphrase(
    devices: DeviceStore, fs_id: bytes, old: bytes | None, new: bytes | None
) -> None:
    """`passwd`: re-seal this device's key; nothing in the bucket changes."""
    devices.change_passphrase(fs_id, old, new)
