"""Key hierarchy: generations, ECIES wrapping, recovery key, commitments, keyring, header tag."""

from __future__ import annotations

import pickle
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from encfs_cloud.crypto import aead, codes
from encfs_cloud.errors import IntegrityError, RecoveryKeyError, UsageError
from encfs_cloud.keys import master as K
from encfs_cloud.keys import records
from encfs_cloud.keys.sealed import Sealer, chunk_digest

FS = bytes(range(16))
OTHER_FS = bytes(16)


def test_generations_subkeys_and_restrict() -> None:
    keys = K.new_master_keys()
    assert keys.generations == (1,) and keys.current == 1
    a = keys.subkey("chunk")
    assert keys.subkey("chunk", 1) is a  # cached
    assert bytes(keys.subkey("commit").material) != bytes(a.material)
    assert K.add_generation(keys) == 2 and keys.current == 2
    assert bytes(keys.subkey("chunk").material) != bytes(a.material)
    assert keys.subkey("chunk", 1) is a
    with pytest.raises(IntegrityError):
        keys.key(7)
    K.add_generation(keys)
    dropped = keys.key(3)
    keys.restrict(2)
    assert list(keys.generations) == [1, 2] and keys.current == 2 and dropped.wiped


def test_commitment_purposes_are_not_keys() -> None:
    keys = K.new_master_keys()
    with pytest.raises(ValueError):
        keys.subkey("commitment/key-check")
    check = K.key_check(keys)
    assert check == K.key_check(keys) and len(check) == 32
    assert check != bytes(keys.key(1).material)
    assert check != K.key_check(K.new_master_keys())


def test_keys_never_printed_or_pickled() -> None:
    keys = K.new_master_keys()
    K.add_generation(keys)
    secrets = [bytes(keys.key(g).material) for g in keys.generations]
    secrets.append(bytes(keys.subkey("chunk").material))
    for text in (repr(keys), str(keys), f"{keys}", repr(keys.key(1)), str(keys.subkey("chunk"))):
        assert "redacted" in text
        for s in secrets:
            assert s.hex() not in text and repr(s) not in text
    with pytest.raises(TypeError):
        pickle.dumps(keys)


def test_wipe_zeroes_everything() -> None:
    keys = K.new_master_keys()
    K.add_generation(keys)
    sub = keys.subkey("chunk")
    held = [keys.key(1), keys.key(2), sub]
    buffers = [k._buf for k in held]
    keys.wipe()
    assert all(k.wiped for k in held)
    assert all(buf == bytearray(32) for buf in buffers)


def test_device_wrap_roundtrip_all_generations() -> None:
    keys = K.new_master_keys()
    K.add_generation(keys)
    K.add_generation(keys)
    dev = X25519PrivateKey.generate()
    blob = K.wrap_for_device(keys, FS, "dev1", dev.public_key().public_bytes_raw())
    got = K.unwrap_for_device(blob, FS, "dev1", dev)
    assert got.generations == (1, 2, 3) and got.current == 3
    for g in got.generations:
        assert bytes(got.key(g).material) == bytes(keys.key(g).material)
    # Two wraps of the same keys differ (fresh ephemeral key and nonce).
    assert blob != K.wrap_for_device(keys, FS, "dev1", dev.public_key().public_bytes_raw())


def test_device_wrap_refuses_any_change() -> None:
    keys = K.new_master_keys()
    dev = X25519PrivateKey.generate()
    blob = K.wrap_for_device(keys, FS, "dev1", dev.public_key().public_bytes_raw())
    with pytest.raises(IntegrityError):
        K.unwrap_for_device(blob, OTHER_FS, "dev1", dev)
    with pytest.raises(IntegrityError):
        K.unwrap_for_device(blob, FS, "dev2", dev)
    with pytest.raises(IntegrityError):
        K.unwrap_for_device(blob, FS, "dev1", X25519PrivateKey.generate())
    for pos in range(0, len(blob), 7):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            K.unwrap_for_device(bytes(bad), FS, "dev1", dev)
    with pytest.raises(IntegrityError):
        K.unwrap_for_device(blob[:-1], FS, "dev1", dev)
    # A low-order ephemeral point would give an all-zero shared secret.
    with pytest.raises(IntegrityError):
        K.unwrap_for_device(blob[:4] + bytes(32) + blob[36:], FS, "dev1", dev)


def test_revoked_generation_is_unreadable_with_old_material() -> None:
    keys = K.new_master_keys()
    dev = X25519PrivateKey.generate()
    old = K.unwrap_for_device(
        K.wrap_for_device(keys, FS, "d", dev.public_key().public_bytes_raw()), FS, "d", dev
    )
    ad1 = aead.object_ad(FS, "meta/1", "commit", 1)
    before = aead.seal(keys.subkey("commit", 1), b"old data", ad1)
    gen = K.add_generation(keys)
    ad2 = aead.object_ad(FS, "meta/2", "commit", gen)
    after = aead.seal(keys.subkey("commit", gen), b"new data", ad2)
    assert aead.open_sealed(old.subkey("commit", 1), before, ad1) == b"old data"
    with pytest.raises(IntegrityError):
        old.subkey("commit", gen)
    for g in old.generations:  # no key it holds opens the new object
        with pytest.raises(IntegrityError):
            aead.open_sealed(old.subkey("commit", g), after, ad2)


def test_recovery_key_format_and_tolerant_parse() -> None:
    text, key = K.new_recovery_key()
    assert re.fullmatch(r"([0-9A-HJKMNP-TV-Z]{4}-){7}[0-9A-HJKMNP-TV-Z]{4}", text)
    material = bytes(key.material)
    for variant in (text, text.lower(), text.replace("-", ""), " " + text.replace("-", " ") + "\n"):
        assert bytes(K.parse_recovery_key(variant).material) == material
    # Crockford aliases: O reads as 0, I and L as 1.
    aliased = text.replace("0", "O").replace("1", "l")
    assert bytes(K.parse_recovery_key(aliased).material) == material


def test_recovery_key_typo_caught_by_checksum_before_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    text, _ = K.new_recovery_key()

    def no_kdf(*_: object) -> None:
        raise AssertionError("a KDF ran on a recovery key with a bad checksum")

    monkeypatch.setattr(K, "_recovery_secret", no_kdf)
    plain = text.replace("-", "")
    for pos in range(len(plain)):
        wrong = codes.ALPHABET[(codes.ALPHABET.index(plain[pos]) + 1) % 32]
        typo = plain[:pos] + wrong + plain[pos + 1 :]
        with pytest.raises(RecoveryKeyError, match="typo"):
            K.parse_recovery_key(typo)
    swapped = plain[1] + plain[0] + plain[2:]
    if swapped != plain:
        with pytest.raises(RecoveryKeyError):
            K.parse_recovery_key(swapped)
    with pytest.raises(RecoveryKeyError):
        K.parse_recovery_key(plain[:-1])
    with pytest.raises(RecoveryKeyError):
        K.parse_recovery_key(plain[:-1] + "U")


def test_recovery_wrap() -> None:
    keys = K.new_master_keys()
    K.add_generation(keys)
    _, rec = K.new_recovery_key()
    blob = K.wrap_for_recovery(keys, FS, K.recovery_public(rec))
    got = K.unwrap_for_recovery(blob, FS, rec)
    assert got.generations == (1, 2)
    assert K.key_check(got, 2) == K.key_check(keys, 2)
    _, other = K.new_recovery_key()
    with pytest.raises(RecoveryKeyError):
        K.unwrap_for_recovery(blob, FS, other)
    with pytest.raises(RecoveryKeyError):
        K.unwrap_for_recovery(blob, OTHER_FS, rec)
    check = K.key_check(keys)
    tag = K.recovery_confirm(rec, FS, check)
    assert K.recovery_confirm_ok(rec, FS, check, tag)
    assert not K.recovery_confirm_ok(other, FS, check, tag)
    assert not K.recovery_confirm_ok(rec, FS, K.key_check(K.new_master_keys()), tag)


def test_enrollment_codes() -> None:
    dev = X25519PrivateKey.generate()
    code = codes.enrollment_code(dev, FS, "d1")
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}", code)
    assert code == codes.enrollment_code(dev, FS, "d1")
    assert code != codes.enrollment_code(dev, FS, "d2")
    body = b'{"request":1}'
    tag = codes.request_mac(code, FS, "d1", body)
    assert codes.request_mac_ok(code.lower().replace("-", " "), FS, "d1", body, tag)
    assert not codes.request_mac_ok(code, FS, "d1", body + b" ", tag)
    assert not codes.request_mac_ok(code, FS, "d2", body, tag)
    other = codes.enrollment_code(X25519PrivateKey.generate(), FS, "d1")
    assert not codes.request_mac_ok(other, FS, "d1", body, tag)
    with pytest.raises(UsageError):
        codes.request_mac("12345", FS, "d1", body)
    check = K.key_check(K.new_master_keys())
    confirm = codes.enrollment_confirm(code, FS, "d1", check)
    assert codes.enrollment_confirm_ok(code, FS, "d1", check, confirm)
    assert not codes.enrollment_confirm_ok(other, FS, "d1", check, confirm)


def _ring(gen: int = 1, version: int = 1) -> K.Keyring:
    entry = K.DeviceEntry("ab" * 16, "laptop", "2024-01-01T00:00:00Z", bytes(32), gen)
    starts = {g: g for g in range(1, gen + 1)}
    return K.Keyring(version, gen, bytes(range(32)), "2024-01-01T00:00:00Z", [entry], starts)


def test_keyring_roundtrip_and_tamper() -> None:
    keys = K.new_master_keys()
    ring = _ring()
    blob = K.seal_keyring(keys, FS, ring)
    assert K.keyring_head(blob) == (1, 1)
    assert K.open_keyring(keys, FS, blob) == ring
    assert b"laptop" not in blob  # names are sealed, not just MACed
    with pytest.raises(IntegrityError):
        K.open_keyring(keys, OTHER_FS, blob)
    with pytest.raises(IntegrityError):
        K.open_keyring(K.new_master_keys(), FS, blob)
    bumped = blob[:4] + (2).to_bytes(8, "big") + blob[12:]  # claims a newer version
    with pytest.raises(IntegrityError):
        K.open_keyring(keys, FS, bumped)
    for pos in range(16, len(blob), 11):
        bad = bytearray(blob)
        bad[pos] ^= 0x80
        with pytest.raises(IntegrityError):
            K.open_keyring(keys, FS, bytes(bad))


def test_header_tag() -> None:
    keys = K.new_master_keys()
    body = b'{"format":1}'
    tag = records.header_tag(keys, body)
    assert records.check_header_tag(keys, body, tag) == 1
    with pytest.raises(IntegrityError, match="header was modified"):
        records.check_header_tag(keys, b'{"format":2}', tag)
    with pytest.raises(IntegrityError):
        records.check_header_tag(K.new_master_keys(), body, tag)
    with pytest.raises(IntegrityError):
        records.check_header_tag(keys, body, tag[:-1])
    K.add_generation(keys)
    assert records.check_header_tag(keys, body, tag) == 1
    assert records.check_header_tag(keys, body, records.header_tag(keys, body)) == 2


def test_chunks_are_sealed_under_per_pack_subkeys_and_digests() -> None:
    keys = K.new_master_keys()
    sealer = Sealer(FS, keys)
    pack_a, pack_b = "ab" * 16, "cd" * 16
    data = b"some chunk" * 100
    blob = sealer.seal_chunk(7, 0, 3, data, pack_a)
    digest = chunk_digest(data)
    assert bytes(sealer.open_chunk(7, 0, 3, 1, len(data), blob, digest, pack_a)) == data
    with pytest.raises(IntegrityError):  # moved into another pack: another key
        sealer.open_chunk(7, 0, 3, 1, len(data), blob, digest, pack_b)
    other = sealer.seal_chunk(7, 0, 3, b"other bytes".ljust(len(data)), pack_a)
    # Under the current generation only its holders can seal: no digest is computed on read.
    assert sealer.open_chunk(7, 0, 3, 1, len(data), other, digest, pack_a)
    K.add_generation(keys)  # generation 1 is now retired: its chunks must match their digest
    assert bytes(sealer.open_chunk(7, 0, 3, 1, len(data), blob, digest, pack_a)) == data
    with pytest.raises(IntegrityError, match="not the one its metadata names"):
        sealer.open_chunk(7, 0, 3, 1, len(data), other, digest, pack_a)
    assert keys.pack_subkey(1, pack_a).material != keys.pack_subkey(1, pack_b).material
    for i in range(300):  # the cache of pack keys stays bounded
        keys.pack_subkey(1, f"{i:032x}")
    assert len(keys._packs) == 256
    keys.wipe()
    assert not keys._packs
