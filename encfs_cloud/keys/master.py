"""Master-key generations, device and recovery wrapping, key commitments, keyring, header tag."""

from __future__ import annotations

import base64
import hmac
import json
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from encfs_cloud.crypto import aead, codes
from encfs_cloud.crypto.aead import SecretKey
from encfs_cloud.errors import FormatError, IntegrityError, RecoveryKeyError

RECOVERY_ID = "recovery"  # the "device id" the recovery key is wrapped under
_WRAP_MAGIC = b"EKW1"  # ECIES blob: magic || ephemeral public (32) || nonce || ct || tag
# What a wrap seals: magic || current u32 || keyring floor u64 || count u32 ||
# (generation u32 || 32-byte key)*
_KEYS_MAGIC = b"EKG2"
_KEYS_HEAD = struct.Struct(">4sIQI")
_KEYRING_MAGIC = b"EKR1"  # keyring blob: magic || version u64 || generation u32 || sealed json
_KEYRING_HEAD = struct.Struct(">4sQI")
GEN = struct.Struct(">I")  # a generation number on the wire
PUBLIC_LEN = 32
MAX_GENERATION = 1 << 31
_COMMITMENT = "commitment/"  # purposes reserved for values that are not keys
_PACK_KEYS_CACHED = 256


class MasterKeys:
    """Every master-key generation this device holds; `current` seals everything new.

    Subkeys are cached (sealing a chunk must not run HKDF every time) and owned by this object:
    callers must not wipe them. Safe to share between worker threads.
    """

    __slots__ = (
        "_cache",
        "_current",
        "_gens",
        "_keys",
        "_lock",
        "_packs",
        "keyring_floor",
        "starts",
        "uncommitted",
    )

    def __init__(self, keys: Mapping[int, SecretKey], current: int | None = None) -> None:
        if not keys or any(not 0 < g < MAX_GENERATION for g in keys):
            raise ValueError("generations are numbered from 1")
        self._keys = dict(keys)
        self._current = max(self._keys) if current is None else current
        if self._current not in self._keys:
            raise ValueError("the current generation must be held")
        # Readers on worker threads see an immutable tuple, never a dict being resized.
        self._gens = tuple(sorted(self._keys))
        self._cache: dict[tuple[str, int], SecretKey] = {}
        self._packs: OrderedDict[tuple[int, str], SecretKey] = OrderedDict()
        self._lock = threading.Lock()
        # generation → the first commit that must be sealed under it (from the keyring): replay
        # refuses a commit sealed under an older generation from there on. Not secret.
        self.starts: dict[int, int] = {}
        # The keyring version that committed `current`: a keyring of that version or newer
        # sealed under an older generation was re-sealed by someone who lacks `current` (a
        # revoked device). Travels inside every wrap of `current`, so only its holders set it.
        self.keyring_floor = 0
        # True once `restrict` dropped a generation the keyring never committed (an
        # interrupted revocation): the keyring must not change before that is finished.
        self.uncommitted = False

    @property
    def current(self) -> int:
        return self._current

    @property
    def generations(self) -> tuple[int, ...]:
        return self._gens

    def key(self, gen: int) -> SecretKey:
        try:
            return self._keys[gen]
        except KeyError:
            raise IntegrityError(f"unknown key generation {gen}") from None

    def subkey(self, purpose: str, gen: int | None = None) -> SecretKey:
        if purpose.startswith(_COMMITMENT) or "\0" in purpose:
            # key_check values are stored in the clear on the device: no key may equal one.
            raise ValueError(f"{purpose!r} is not a key purpose")
        gen = self._current if gen is None else gen
        sub = self._cache.get((purpose, gen))  # the hot path (every chunk) takes no lock
        if sub is not None:
            return sub
        with self._lock:
            sub = self._cache.get((purpose, gen))
            if sub is None:
                sub = aead.derive(self.key(gen), purpose, GEN.pack(gen))
                self._cache[(purpose, gen)] = sub
            return sub

    def pack_subkey(self, gen: int, pack: str) -> SecretKey:
        """The chunk key of one pack: bounds the seals under any one key by design.

        A pack holds at most 2,049 sealed chunks, so random 96-bit nonces never come near
        their collision bound, with nothing to count. The most recent packs' keys are cached;
        an evicted one is dropped, not zeroed (a reader thread may still hold it).
        """
        with self._lock:
            sub = self._packs.get((gen, pack))
            if sub is not None:
                self._packs.move_to_end((gen, pack))
                return sub
        sub = aead.derive(self.subkey("chunk", gen), "pack", bytes.fromhex(pack))
        with self._lock:
            self._packs[(gen, pack)] = sub
            while len(self._packs) > _PACK_KEYS_CACHED:
                self._packs.popitem(last=False)
        return sub

    def add(self, gen: int, key: SecretKey) -> None:
        """Adopt a fresh generation and make it current (used by `add_generation`)."""
        with self._lock:
            if gen in self._keys or gen <= max(self._keys):
                raise ValueError("a new generation must be newer than every held one")
            self._keys[gen] = key
            self._gens = tuple(sorted(self._keys))
            self._current = gen

    def restrict(self, newest: int) -> None:
        """Forget (and zero) generations newer than `newest`, which becomes current.

        A generation is only committed once the keyring names it; newer ones left by an
        interrupted revocation must not seal anything, or a retry would strand that data.
        """
        with self._lock:
            if newest not in self._keys:
                raise IntegrityError(f"unknown key generation {newest}")
            for gen in [g for g in self._keys if g > newest]:
                self._keys.pop(gen).wipe()
                self.uncommitted = True
                self.keyring_floor = 0  # it was the dropped generation's
                for ck in [ck for ck in self._cache if ck[1] == gen]:
                    self._cache.pop(ck).wipe()
                for pk in [pk for pk in self._packs if pk[0] == gen]:
                    self._packs.pop(pk).wipe()
            self._gens = tuple(sorted(self._keys))
            self._current = newest

    def copy(self) -> MasterKeys:
        keys = MasterKeys({g: SecretKey(k.material) for g, k in self._keys.items()}, self._current)
        keys.starts = dict(self.starts)
        keys.keyring_floor = self.keyring_floor
        keys.uncommitted = self.uncommitted
        return keys

    def required_generation(self, seq: int) -> int:
        """The oldest generation a commit with this number may be sealed under."""
        return max((g for g, start in self.starts.items() if start <= seq), default=0)

    def wipe(self) -> None:
        with self._lock:
            for sub in [*self._cache.values(), *self._packs.values()]:
                sub.wipe()
            self._packs.clear()
            for key in self._keys.values():
                key.wipe()
            self._cache.clear()

    def __repr__(self) -> str:
        return f"<MasterKeys generations={list(self.generations)} current={self._current} redacted>"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("keys are not picklable")


def new_master_keys() -> MasterKeys:
    return MasterKeys({1: SecretKey.generate()})


def add_generation(keys: MasterKeys) -> int:
    """A fresh random generation (for revocation); it seals everything from now on."""
    gen = max(keys.generations) + 1
    keys.add(gen, SecretKey.generate())
    return gen


# --- serialising generations (only ever inside an AEAD) -------------------------------------


def _pack_keys(keys: MasterKeys) -> bytearray:
    gens = keys.generations
    out = bytearray(_KEYS_HEAD.pack(_KEYS_MAGIC, keys.current, keys.keyring_floor, len(gens)))
    for gen in gens:
        out += GEN.pack(gen) + keys.key(gen).material
    return out


def _unpack_keys(raw: bytes) -> MasterKeys:
    head = _KEYS_HEAD.size
    if len(raw) < head or raw[:4] != _KEYS_MAGIC:
        raise IntegrityError("wrapped keys are malformed")
    _, current, floor, count = _KEYS_HEAD.unpack_from(raw)
    if len(raw) != head + count * (4 + aead.KEY_LEN):
        raise IntegrityError("wrapped keys are malformed")
    keys: dict[int, SecretKey] = {}
    for i in range(count):
        off = head + i * (4 + aead.KEY_LEN)
        (gen,) = GEN.unpack_from(raw, off)
        keys[gen] = SecretKey(bytearray(raw[off + 4 : off + 4 + aead.KEY_LEN]))
    try:
        opened = MasterKeys(keys, current)
    except ValueError as exc:
        raise IntegrityError(f"wrapped keys are malformed: {exc}") from None
    opened.keyring_floor = floor
    return opened


# --- ECIES to a device's X25519 public key ---------------------------------------------------


def _ecies_key(shared: bytes, ad: bytes) -> SecretKey:
    return SecretKey(codes.hkdf(shared, b"encfs-cloud/v1/ecies\0" + ad))


def wrap_for_device(keys: MasterKeys, fs_id: bytes, device_id: str, device_public: bytes) -> bytes:
    """Seal every generation to one device: ephemeral X25519, HKDF, AES-256-GCM."""
    peer = X25519PublicKey.from_public_bytes(device_public)
    eph = X25519PrivateKey.generate()
    eph_public = eph.public_key().public_bytes_raw()
    # The KDF input and the AEAD both bind the filesystem, the device and both public keys, so a
    # record cannot be moved to another device, filesystem or re-targeted key.
    ad = aead.associated_data(fs_id, "wrapped-keys", device_id, eph_public, device_public)
    wrap_key = _ecies_key(eph.exchange(peer), ad)
    plain = _pack_keys(keys)
    try:
        return _WRAP_MAGIC + eph_public + aead.seal(wrap_key, plain, ad)
    finally:
        plain[:] = bytes(len(plain))
        wrap_key.wipe()


def unwrap_for_device(
    blob: bytes, fs_id: bytes, device_id: str, device_private: X25519PrivateKey
) -> MasterKeys:
    """Open what `wrap_for_device` made; IntegrityError on any change."""
    if len(blob) < 4 + PUBLIC_LEN + aead.SEAL_OVERHEAD or blob[:4] != _WRAP_MAGIC:
        raise IntegrityError("wrapped key record is malformed")
    eph_public = bytes(blob[4 : 4 + PUBLIC_LEN])
    own_public = device_private.public_key().public_bytes_raw()
    ad = aead.associated_data(fs_id, "wrapped-keys", device_id, eph_public, own_public)
    try:
        shared = device_private.exchange(X25519PublicKey.from_public_bytes(eph_public))
    except ValueError:  # a low-order point gives an all-zero secret; cryptography refuses it
        raise IntegrityError("wrapped key record is malformed") from None
    wrap_key = _ecies_key(shared, ad)
    try:
        return _unpack_keys(aead.open_sealed(wrap_key, blob[4 + PUBLIC_LEN :], ad))
    finally:
        wrap_key.wipe()


# --- recovery key ----------------------------------------------------------------------------


def _recovery_secret(entropy: bytes) -> SecretKey:
    return SecretKey(codes.hkdf(entropy, b"encfs-cloud/v1/recovery-key"))


def new_recovery_key() -> tuple[str, SecretKey]:
    """128 random bits + 32-bit checksum, as 8 groups of 4 Crockford base32 characters."""
    text, entropy = codes.new_recovery_text()
    return text, _recovery_secret(entropy)


def parse_recovery_key(text: str) -> SecretKey:
    """Tolerates case, spaces and dashes (and I/L/O for 1/1/0); checks the checksum first."""
    return _recovery_secret(codes.parse_recovery_text(text))


def _recovery_private(recovery: SecretKey) -> X25519PrivateKey:
    # The recovery key acts as one more device: any enrolled device can wrap a new generation to
    # its public key while the printed secret stays offline (revocation needs that).
    sub = aead.derive(recovery, "recovery-x25519")
    try:
        return X25519PrivateKey.from_private_bytes(bytes(sub.material))
    finally:
        sub.wipe()


def recovery_public(recovery: SecretKey) -> bytes:
    return _recovery_private(recovery).public_key().public_bytes_raw()


def wrap_for_recovery(keys: MasterKeys, fs_id: bytes, recovery_public_key: bytes) -> bytes:
    return wrap_for_device(keys, fs_id, RECOVERY_ID, recovery_public_key)


def unwrap_for_recovery(blob: bytes, fs_id: bytes, recovery: SecretKey) -> MasterKeys:
    try:
        return unwrap_for_device(blob, fs_id, RECOVERY_ID, _recovery_private(recovery))
    except IntegrityError:
        raise RecoveryKeyError(
            "this recovery key does not open this filesystem (or its record was modified)"
        ) from None


# --- commitments against key substitution ----------------------------------------------------


def key_check(keys: MasterKeys, gen: int = 1) -> bytes:
    """An HKDF commitment to one generation, stored on the device to spot a substituted key."""
    sub = aead.derive(keys.key(gen), _COMMITMENT + "key-check", GEN.pack(gen))
    try:
        return bytes(sub.material)
    finally:
        sub.wipe()


def fingerprint(keys: MasterKeys, gen: int) -> str:
    """8 hex digits of a generation's key check: devices holding the same one show the same."""
    raw = key_check(keys, gen)[:4].hex()
    return f"{raw[:4]}-{raw[4:]}"


def recovery_confirm(recovery: SecretKey, fs_id: bytes, check: bytes) -> bytes:
    sub = aead.derive(recovery, "recovery-confirm", fs_id)
    try:
        return codes.hmac_sha256(sub.material, codes.confirm_message(fs_id, RECOVERY_ID, check))
    finally:
        sub.wipe()


def recovery_confirm_ok(recovery: SecretKey, fs_id: bytes, check: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(recovery_confirm(recovery, fs_id, check), tag)


# --- the keyring -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceEntry:
    device_id: str
    name: str
    enrolled_at: str  # ISO 8601, UTC
    public_key: bytes
    generation: int  # the newest generation wrapped for it


@dataclass
class Keyring:
    """Who is enrolled; sealed under the current generation, bumped on every change."""

    version: int
    generation: int
    recovery_public: bytes
    recovery_created_at: str
    devices: list[DeviceEntry] = field(default_factory=list)
    # generation → the first commit sequence number that must be sealed under it. Fixed when
    # the generation is made (the bucket's newest commit + 1) and only ever moved forward.
    starts: dict[int, int] = field(default_factory=lambda: {1: 1})

    def device(self, device_id: str) -> DeviceEntry | None:
        return next((d for d in self.devices if d.device_id == device_id), None)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _keyring_json(ring: Keyring) -> bytes:
    body = {
        "version": ring.version,
        "generation": ring.generation,
        "recovery": {
            "public_key": _b64(ring.recovery_public),
            "created_at": ring.recovery_created_at,
        },
        "starts": {str(g): seq for g, seq in sorted(ring.starts.items())},
        "devices": [
            {
                "id": d.device_id,
                "name": d.name,
                "enrolled_at": d.enrolled_at,
                "public_key": _b64(d.public_key),
                "generation": d.generation,
            }
            for d in ring.devices
        ],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def keyring_head(blob: bytes) -> tuple[int, int]:
    """(version, generation) of a sealed keyring, read before opening it (not yet trusted)."""
    if len(blob) < _KEYRING_HEAD.size or blob[:4] != _KEYRING_MAGIC:
        raise IntegrityError("keyring is malformed")
    _, version, gen = _KEYRING_HEAD.unpack_from(blob)
    return version, gen


def seal_keyring(keys: MasterKeys, fs_id: bytes, ring: Keyring) -> bytes:
    """Sealed under `ring.generation` with the version in the associated data."""
    ad = aead.associated_data(fs_id, "keyring", ring.version, ring.generation)
    sealed = aead.seal(keys.subkey("vault/keyring", ring.generation), _keyring_json(ring), ad)
    return _KEYRING_HEAD.pack(_KEYRING_MAGIC, ring.version, ring.generation) + sealed


def open_keyring(keys: MasterKeys, fs_id: bytes, blob: bytes) -> Keyring:
    version, gen = keyring_head(blob)
    ad = aead.associated_data(fs_id, "keyring", version, gen)
    try:
        raw = aead.open_sealed(keys.subkey("vault/keyring", gen), blob[_KEYRING_HEAD.size :], ad)
    except IntegrityError:
        raise IntegrityError("keyring was modified") from None
    try:
        body = json.loads(raw)
        ring = Keyring(
            version=int(body["version"]),
            generation=int(body["generation"]),
            recovery_public=base64.b64decode(body["recovery"]["public_key"]),
            recovery_created_at=str(body["recovery"]["created_at"]),
            devices=[
                DeviceEntry(
                    device_id=str(d["id"]),
                    name=str(d["name"]),
                    enrolled_at=str(d["enrolled_at"]),
                    public_key=base64.b64decode(d["public_key"]),
                    generation=int(d["generation"]),
                )
                for d in body["devices"]
            ],
            starts={int(g): int(seq) for g, seq in body["starts"].items()},
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"keyring is not understood: {exc}") from None
    if (ring.version, ring.generation) != (version, gen):
        raise IntegrityError("keyring was modified")
    if ring.generation not in ring.starts or any(g > ring.generation for g in ring.starts):
        raise IntegrityError("keyring was modified (generation start points)")
    return ring
