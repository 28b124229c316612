"""Bucket objects of the vault: the header, key records, the keyring and its lock."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from encfs_cloud import layout
from encfs_cloud.crypto import codes
from encfs_cloud.crypto.passkdf import MIN_ITERATIONS, MIN_LANES, MIN_MEMORY_KIB
from encfs_cloud.errors import (
    AbortedError,
    DeviceRevokedError,
    FormatError,
    IntegrityError,
    LeaseHeldError,
    NoFilesystemError,
    ObjectMissingError,
    PreconditionFailedError,
)
from encfs_cloud.keys import master as K
from encfs_cloud.keys.device import DeviceIdentity
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.capped import read_capped, read_capped_with_etag

log = logging.getLogger(__name__)

MAGIC = "encfs-cloud"
CIPHER = "AES-256-GCM"
# Listed in the header of every filesystem made since: a release without the feature refuses
# the filesystem ("made by a newer encfs-cloud; upgrade") instead of meeting commits it cannot
# read. "zstd-commits": commit bodies in zstd (tree/journal.py, 2026-12-03).
SUPPORTED_FEATURES: frozenset[str] = frozenset({"zstd-commits"})
KEYRING_NAME = layout.KEYS_PREFIX + "keyring"
RECOVERY_NAME = layout.KEYS_PREFIX + "recovery"
RECOVERY_NEXT_NAME = layout.KEYS_PREFIX + "recovery.next"  # during a recovery-key rotation
LOCK_NAME = layout.KEYS_PREFIX + "lock"
LOCK_STALE_SECONDS = 600


def record_name(device_id: str) -> str:
    return layout.KEYS_PREFIX + device_id


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise IntegrityError("a key record field is malformed")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise IntegrityError("a key record field is malformed") from None


# --- header -----------------------------------------------------------------------------------


def new_header(fs_id: bytes) -> dict[str, Any]:
    return {
        "magic": MAGIC,
        "format": layout.FORMAT_VERSION,
        "fs_id": fs_id.hex(),
        "cipher": CIPHER,
        "chunk_size": layout.CHUNK_SIZE,
        "features": sorted(SUPPORTED_FEATURES),
        "kdf": {
            "name": "argon2id",
            "min_memory_kib": MIN_MEMORY_KIB,
            "min_iterations": MIN_ITERATIONS,
            "min_lanes": MIN_LANES,
        },
    }


def header_body(header: dict[str, Any]) -> bytes:
    """The bytes the header tag covers: canonical JSON of everything but the tag."""
    return canonical({k: v for k, v in header.items() if k != "auth"})


def seal_header(keys: K.MasterKeys, header: dict[str, Any]) -> bytes:
    body = {k: v for k, v in header.items() if k != "auth"}
    return canonical({**body, "auth": b64(header_tag(keys, header_body(body)))})


def fs_id_of(header: dict[str, Any]) -> bytes:
    return bytes.fromhex(header["fs_id"])


def read_header(store: ObjectStore) -> dict[str, Any]:
    """The parsed, checked header; NOT yet authenticated (that needs the keys: see unlock)."""
    try:
        raw = read_capped(store, layout.HEADER_NAME, layout.HEADER_CAP)
    except ObjectMissingError:
        raise NoFilesystemError(
            f"no encfs-cloud filesystem at {store.url}; create one with encfs-cloud init"
        ) from None
    return parse_header(raw, store.url)


def parse_header(raw: bytes, where: str = "this store") -> dict[str, Any]:
    foreign = FormatError(f"{where} is not an encfs-cloud filesystem")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting is no header
        raise foreign from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise foreign
    fmt = header.get("format")
    if type(fmt) is not int or fmt < 1:
        raise foreign
    features = header.get("features")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise foreign
    unknown = sorted(set(features) - SUPPORTED_FEATURES)
    if fmt > layout.FORMAT_VERSION or unknown:
        extra = f", features {', '.join(unknown)}" if unknown else ""
        raise FormatError(
            f"this filesystem was made by a newer encfs-cloud (format {fmt}{extra}); upgrade"
        )
    if fmt < layout.FORMAT_VERSION:
        # Format 2 added chunk digests and generation start points; there is no in-place
        # upgrade: copy the files out with the older release.
        raise FormatError(
            f"this filesystem has format {fmt}, which this encfs-cloud no longer opens "
            f"(it reads format {layout.FORMAT_VERSION}); copy the files out with an older release"
        )
    try:
        fs_id = bytes.fromhex(header["fs_id"])
        kdf = header["kdf"]
        floors_ok = (
            kdf["name"] == "argon2id"
            and int(kdf["min_memory_kib"]) >= MIN_MEMORY_KIB
            and int(kdf["min_iterations"]) >= MIN_ITERATIONS
            and int(kdf["min_lanes"]) >= MIN_LANES
        )
        if len(fs_id) != 16 or not isinstance(header["auth"], str):
            raise ValueError("bad fs_id or tag")
    except (KeyError, ValueError, TypeError):
        raise foreign from None
    if header.get("cipher") != CIPHER:
        raise FormatError(f"unsupported cipher {header.get('cipher')!r} (only {CIPHER})")
    if header.get("chunk_size") != layout.CHUNK_SIZE:
        raise FormatError(f"unsupported chunk size {header.get('chunk_size')!r}")
    if not floors_ok:
        raise FormatError("header asks for KDF parameters below the floors; refusing")
    return header


def verify_header(keys: K.MasterKeys, header: dict[str, Any]) -> int:
    return check_header_tag(keys, header_body(header), unb64(header["auth"]))


# --- header authentication -------------------------------------------------------------------


def header_tag(keys: K.MasterKeys, header_bytes: bytes) -> bytes:
    """generation u32 || HMAC-SHA256 under the current generation's header subkey."""
    gen = keys.current
    return K.GEN.pack(gen) + codes.hmac_sha256(
        keys.subkey("vault/header", gen).material, header_bytes
    )


def check_header_tag(keys: K.MasterKeys, header_bytes: bytes, tag: bytes) -> int:
    """Returns the generation that authenticated the header; IntegrityError otherwise."""
    if len(tag) != K.GEN.size + 32:
        raise IntegrityError("header was modified (bad tag)")
    gen = int.from_bytes(tag[: K.GEN.size], "big")
    if gen not in keys.generations or not codes.hmac_ok(
        keys.subkey("vault/header", gen).material, header_bytes, tag[K.GEN.size :]
    ):
        raise IntegrityError("header was modified")
    return gen


# --- key records ------------------------------------------------------------------------------


def encode_record(
    kind: str,
    subject: str,
    keys: K.MasterKeys,
    wrapped: bytes,
    confirm: bytes,
    start: dict[str, Any] | None = None,
) -> bytes:
    """keys/<id> and keys/recovery: JSON around the ECIES blob and the key confirmation tag.

    `start` (the head and keyring version the approver had seen) is covered by `confirm`: a
    new device takes it as the state it has seen, so it refuses a bucket rolled back before it.
    """
    doc: dict[str, Any] = {
        "format": 1,
        "kind": kind,
        "id": subject,
        "generation": keys.current,
        "wrapped": b64(wrapped),
        "confirm": b64(confirm),
    }
    if start is not None:
        doc["start"] = start
    return canonical(doc)


def record_start(raw: bytes) -> dict[str, Any] | None:
    """The enrollment starting point a key record carries (not yet trusted), or None."""
    try:
        start = json.loads(raw).get("start")
        if start is None:
            return None
        return {
            "seq": int(start["seq"]),
            "hash": str(start["hash"]),
            "keyring": int(start["keyring"]),
        }
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise IntegrityError("a key record's starting point is malformed") from None


def start_bytes(start: dict[str, Any] | None) -> bytes:
    """What the confirmation tag covers after the key check (nothing without a start)."""
    return b"" if start is None else canonical(start)


def decode_record(raw: bytes, subject: str) -> tuple[int, bytes, bytes]:
    """(generation, wrapped, confirm) of a key record, not yet trusted."""
    try:
        doc = json.loads(raw)
        if doc["format"] != 1 or doc["id"] != subject:
            raise ValueError("wrong format or subject")
        return int(doc["generation"]), unb64(doc["wrapped"]), unb64(doc["confirm"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise IntegrityError(f"key record for {subject} was modified") from None


def device_record(
    keys: K.MasterKeys,
    fs_id: bytes,
    entry: K.DeviceEntry,
    confirm: bytes,
    start: dict[str, Any] | None = None,
) -> bytes:
    wrapped = K.wrap_for_device(keys, fs_id, entry.device_id, entry.public_key)
    return encode_record("device-key", entry.device_id, keys, wrapped, confirm, start)


def recovery_record(keys: K.MasterKeys, fs_id: bytes, public: bytes, confirm: bytes) -> bytes:
    wrapped = K.wrap_for_recovery(keys, fs_id, public)
    return encode_record("recovery-key", K.RECOVERY_ID, keys, wrapped, confirm)


def own_confirm(identity: DeviceIdentity, fs_id: bytes, check: bytes) -> bytes:
    code = codes.enrollment_code(identity.private_key, fs_id, identity.device_id)
    return codes.enrollment_confirm(code, fs_id, identity.device_id, check)


def entry_for(identity: DeviceIdentity, generation: int) -> K.DeviceEntry:
    return K.DeviceEntry(identity.device_id, identity.name, now(), identity.public, generation)


# --- keyring ----------------------------------------------------------------------------------


def load_keyring(store: ObjectStore, keys: K.MasterKeys, fs_id: bytes) -> tuple[K.Keyring, str]:
    try:
        blob, etag = read_capped_with_etag(store, KEYRING_NAME, layout.KEYRING_CAP)
    except ObjectMissingError:
        raise IntegrityError("the keyring is missing from the bucket") from None
    _, gen = K.keyring_head(blob)
    if gen not in keys.generations:
        raise DeviceRevokedError(
            f"this device cannot open the keyring of filesystem {fs_id.hex()} (sealed under key "
            f"generation {gen}, which it does not hold): it was revoked, or the keys changed "
            "since it unlocked (unlock again)"
        )
    return K.open_keyring(keys, fs_id, blob), etag


def store_keyring(
    store: ObjectStore, keys: K.MasterKeys, fs_id: bytes, ring: K.Keyring, etag: str
) -> None:
    """The commit point of every keyring change: a compare-and-swap on the old etag."""
    try:
        store.put(KEYRING_NAME, K.seal_keyring(keys, fs_id, ring), if_match=etag)
    except PreconditionFailedError:
        raise AbortedError(
            "the keyring changed while we edited it; nothing committed, retry"
        ) from None


@contextmanager
def keyring_lock(store: ObjectStore, holder: str) -> Iterator[None]:
    """Serialises keyring changes between devices (a stale lock is taken over after 10 min)."""
    body = canonical({"holder": holder, "taken_at": int(time.time())})
    try:
        store.put(LOCK_NAME, body, if_none_match=True)
    except PreconditionFailedError:
        try:
            # Cut at the cap, an oversize lock fails to parse and counts as stale.
            raw, etag = store.get_with_etag(LOCK_NAME, layout.SMALL_CAP + 1)
            other = json.loads(raw)
            age = time.time() - float(other["taken_at"])
        except ObjectMissingError:
            etag, age, other = "", 0.0, {}
        except (ValueError, KeyError, TypeError, RecursionError):
            age, other = LOCK_STALE_SECONDS + 1.0, {}
        if not etag or age <= LOCK_STALE_SECONDS:
            raise LeaseHeldError(
                f"device {other.get('holder', '?')} is changing the keyring; retry in a minute"
            ) from None
        try:
            store.put(LOCK_NAME, body, if_match=etag)
        except PreconditionFailedError:
            raise LeaseHeldError("another device took the keyring lock; retry") from None
    try:
        yield
    finally:
        try:
            store.delete(LOCK_NAME)
        except Exception as exc:  # the lock goes stale on its own; never mask the real error
            log.warning("could not release %s: %s", LOCK_NAME, exc)
