"""AEAD sealing, HKDF subkeys and associated-data builders; pure functions, no I/O."""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs_cloud.errors import IntegrityError

KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
SEAL_OVERHEAD = NONCE_LEN + TAG_LEN


class SecretKey:
    """A key held in a zeroable `bytearray`; never printed, compared in constant time."""

    __slots__ = ("_aead", "_buf", "_wiped")

    def __init__(self, material: bytes | bytearray) -> None:
        if len(material) != KEY_LEN:
            raise ValueError("a key is 32 bytes")
        self._buf = bytearray(material)
        self._aead: AESGCM | None = None
        self._wiped = False

    @classmethod
    def generate(cls) -> SecretKey:
        return cls(os.urandom(KEY_LEN))

    @property
    def material(self) -> bytearray:
        if self._wiped:
            raise ValueError("key has been wiped")
        return self._buf

    def aead(self) -> AESGCM:
        if self._aead is None:
            self._aead = AESGCM(self.material)
        return self._aead

    def wipe(self) -> None:
        for i in range(len(self._buf)):
            self._buf[i] = 0
        self._aead = None
        self._wiped = True

    @property
    def wiped(self) -> bool:
        return self._wiped

    def __repr__(self) -> str:
        return "<SecretKey redacted>"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("keys are not picklable")


def seal(key: SecretKey, plaintext: bytes | bytearray | memoryview, ad: bytes) -> bytes:
    """Encrypt and authenticate: returns nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_LEN)
    return nonce + key.aead().encrypt(nonce, bytes(plaintext), ad)


def seal_into(
    key: SecretKey, plaintext: bytes | bytearray | memoryview, ad: bytes, out: memoryview
) -> None:
    """Like `seal`, writing nonce || ciphertext || tag into `out` (exactly that long)."""
    nonce = os.urandom(NONCE_LEN)
    out[:NONCE_LEN] = nonce
    key.aead().encrypt_into(nonce, plaintext, ad, out[NONCE_LEN:])


def open_sealed(key: SecretKey, blob: bytes | bytearray | memoryview, ad: bytes) -> bytes:
    """Check and decrypt what `seal` made; raises IntegrityError on any change."""
    if len(blob) < SEAL_OVERHEAD:
        raise IntegrityError("sealed object too short")
    view = memoryview(blob)
    try:
        return key.aead().decrypt(view[:NONCE_LEN], view[NONCE_LEN:], ad)
    except InvalidTag:
        raise IntegrityError("authentication failed") from None


def derive(key: SecretKey, purpose: str, context: bytes = b"") -> SecretKey:
    """An HKDF-SHA256 subkey of `key` for one purpose (and optional context)."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_LEN,
        salt=None,
        info=b"encfs-cloud/v1/" + purpose.encode() + b"\0" + context,
    )
    out = bytearray(hkdf.derive(bytes(key.material)))
    try:
        return SecretKey(out)
    finally:
        out[:] = bytes(len(out))


def digest(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def _field(value: bytes | str | int) -> bytes:
    if isinstance(value, int):
        raw = struct.pack(">Q", value)
    elif isinstance(value, str):
        raw = value.encode()
    else:
        raw = value
    return struct.pack(">I", len(raw)) + raw


def associated_data(fs_id: bytes, kind: str, *fields: bytes | str | int) -> bytes:
    """Length-prefixed binding of a sealed blob to its filesystem, kind and identity."""
    return b"encfs-cloud/v1" + _field(fs_id) + _field(kind) + b"".join(_field(f) for f in fields)


def chunk_ad(fs_id: bytes, inode: int, index: int, version: int, generation: int) -> bytes:
    """A chunk is bound to (inode, index, version), never to the pack that holds it."""
    return associated_data(fs_id, "chunk", inode, index, version, generation)


def object_ad(fs_id: bytes, name: str, kind: str, generation: int) -> bytes:
    return associated_data(fs_id, kind, name, generation)
