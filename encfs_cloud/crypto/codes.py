"""Codes a person copies: Crockford base32, recovery-key text, enrollment codes and their MACs."""

from __future__ import annotations

import hmac
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs_cloud.crypto import aead
from encfs_cloud.errors import AbortedError, RecoveryKeyError, UsageError

# Crockford base32: no I, L, O, U, so no character reads as another (I/L/O are read as 1/1/0).
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ALIASES = {"I": "1", "L": "1", "O": "0"}
RECOVERY_ENTROPY = 16  # 128 random bits ...
RECOVERY_CHECK = 4  # ... and a 32-bit checksum: 160 bits, 32 characters, 8 groups of 4
RECOVERY_CHARS = 32
CODE_CHARS = 12  # enrollment codes: 60 bits, 3 groups of 4


def hkdf(ikm: bytes | bytearray, info: bytes, length: int = aead.KEY_LEN) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(bytes(ikm))


def hmac_sha256(key: bytes | bytearray, message: bytes) -> bytes:
    mac = crypto_hmac.HMAC(bytes(key), hashes.SHA256())
    mac.update(message)
    return mac.finalize()


def hmac_ok(key: bytes | bytearray, message: bytes, tag: bytes) -> bool:
    mac = crypto_hmac.HMAC(bytes(key), hashes.SHA256())
    mac.update(message)
    try:
        mac.verify(tag)
    except InvalidSignature:
        return False
    return True


def encode(raw: bytes, chars: int) -> str:
    """The low `5 * chars` bits of `raw`, in groups of 4 characters joined by '-'."""
    number = int.from_bytes(raw, "big")
    text = "".join(ALPHABET[(number >> (5 * i)) & 31] for i in reversed(range(chars)))
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def decode(text: str, chars: int, what: str, exc: type[Exception]) -> int:
    """Tolerant of case, spaces and dashes; `exc` names what the caller raises on a bad code."""
    cleaned = "".join(_ALIASES.get(c, c) for c in text.upper() if c not in " -\t\r\n")
    if len(cleaned) != chars:
        raise exc(f"{what} has {len(cleaned)} characters, expected {chars}")
    number = 0
    for c in cleaned:
        pos = ALPHABET.find(c)
        if pos < 0:
            raise exc(f"{what} contains {c!r}, which is not one of {ALPHABET}")
        number = number << 5 | pos
    return number


# --- recovery key text -----------------------------------------------------------------------


def _checksum(entropy: bytes) -> bytes:
    return aead.digest(b"encfs-cloud/v1/recovery-checksum\0" + entropy)[:RECOVERY_CHECK]


def new_recovery_text() -> tuple[str, bytes]:
    """(printed text, the 128-bit entropy it carries)."""
    entropy = os.urandom(RECOVERY_ENTROPY)
    return encode(entropy + _checksum(entropy), RECOVERY_CHARS), entropy


def parse_recovery_text(text: str) -> bytes:
    """The entropy behind a recovery key; RecoveryKeyError on a typo (before any KDF runs)."""
    number = decode(text, RECOVERY_CHARS, "recovery key", RecoveryKeyError)
    raw = number.to_bytes(RECOVERY_ENTROPY + RECOVERY_CHECK, "big")
    entropy, check = raw[:RECOVERY_ENTROPY], raw[RECOVERY_ENTROPY:]
    if not hmac.compare_digest(check, _checksum(entropy)):
        raise RecoveryKeyError("recovery key has a typo (checksum mismatch); check every group")
    return entropy


# --- enrollment codes ------------------------------------------------------------------------


def enrollment_code(device_private: X25519PrivateKey, fs_id: bytes, device_id: str) -> str:
    """The 60-bit code a new device shows and the user types on the approving device.

    Derived from the device's private key and never written to the bucket, it is a secret the
    two devices share through the user: it MACs the request (the bucket owner cannot swap in
    its own public key) and the approver MACs the key commitment with it (the bucket owner
    cannot hand the new device a fake master key). Guessing it offline from the request MAC
    costs 2^60 work, far beyond the minutes between request and approval; a 6-digit code
    derived from public request contents could be matched by grinding keys in a second.
    """
    info = b"encfs-cloud/v1/enrollment-code\0" + aead.associated_data(fs_id, "code", device_id)
    return encode(hkdf(device_private.private_bytes_raw(), info, 8), CODE_CHARS)


def _code_key(code: str, fs_id: bytes, device_id: str, purpose: str) -> bytes:
    number = decode(code, CODE_CHARS, "verification code", UsageError)
    ad = aead.associated_data(fs_id, purpose, device_id)
    return hkdf(number.to_bytes(8, "big"), b"encfs-cloud/v1/code-key\0" + ad)


def request_mac(code: str, fs_id: bytes, device_id: str, body: bytes) -> bytes:
    return hmac_sha256(_code_key(code, fs_id, device_id, "request"), body)


def request_mac_ok(code: str, fs_id: bytes, device_id: str, body: bytes, tag: bytes) -> bool:
    return hmac_ok(_code_key(code, fs_id, device_id, "request"), body, tag)


def check_request_mac(code: str, fs_id: bytes, device_id: str, body: bytes, tag: bytes) -> None:
    if not request_mac_ok(code, fs_id, device_id, body, tag):
        raise AbortedError("the verification code does not match this request; not approved")


def confirm_message(fs_id: bytes, subject: str, check: bytes) -> bytes:
    return aead.associated_data(fs_id, "key-confirm", subject, check)


def enrollment_confirm(code: str, fs_id: bytes, device_id: str, check: bytes) -> bytes:
    """A MAC of the key commitment under the enrollment code: only the approver can make it."""
    key = _code_key(code, fs_id, device_id, "confirm")
    return hmac_sha256(key, confirm_message(fs_id, device_id, check))


def enrollment_confirm_ok(
    code: str, fs_id: bytes, device_id: str, check: bytes, tag: bytes
) -> bool:
    key = _code_key(code, fs_id, device_id, "confirm")
    return hmac_ok(key, confirm_message(fs_id, device_id, check), tag)
