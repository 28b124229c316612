"""The local device key store: a sealed X25519 key and a small state file per filesystem."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hmac
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs_cloud import layout
from encfs_cloud.crypto import aead
from encfs_cloud.crypto.aead import SecretKey
from encfs_cloud.crypto.passkdf import KdfParams
from encfs_cloud.errors import (
    DeviceKeyMissingError,
    FormatError,
    IntegrityError,
    UsageError,
    WrongPassphraseError,
)
from encfs_cloud.keys.privfiles import (
    check_private_dir,
    fsync_dir,
    make_private_dir,
    read_private,
    write_atomic,
)

ENV_MACHINE_ID = "ENCFS_CLOUD_MACHINE_ID"
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
KEY_FILE = "device.key"
STATE_FILE = "state.json"
STATE_LOCK_FILE = "state.lock"
FALLBACK_MACHINE_FILE = "machine-secret"  # only where the OS has no machine id
_KIND = "encfs-cloud device key"


class DeviceIdentity:
    """This device's id, name and X25519 key pair for one filesystem; never printed."""

    __slots__ = ("_private", "device_id", "kdf", "name", "public")

    def __init__(
        self, device_id: str, name: str, private_key: X25519PrivateKey, kdf: KdfParams | None
    ) -> None:
        self.device_id = device_id
        self.name = name
        self._private: X25519PrivateKey | None = private_key
        self.public = private_key.public_key().public_bytes_raw()
        self.kdf = kdf

    @property
    def private_key(self) -> X25519PrivateKey:
        if self._private is None:
            raise ValueError("device key has been wiped")
        return self._private

    def wipe(self) -> None:
        # OpenSSL owns the key's memory; dropping the last reference is all Python can do.
        self._private = None

    def __repr__(self) -> str:
        return f"<DeviceIdentity {self.device_id} {self.name!r} redacted>"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("device keys are not picklable")


@dataclass
class DeviceState:
    """What this device has seen of a filesystem; refuses rollbacks and substituted keys."""

    commit_seq: int | None = None
    commit_hash: bytes | None = None
    key_check: bytes | None = None
    keyring_version: int = 0
    generation_checks: dict[int, bytes] = field(default_factory=dict)
    header_generation: int = 0  # the newest generation the header was seen tagged under
    # How to reach the store (keys/connection.py) and what probing it found (keys/storefit.py).
    connection: dict[str, str] = field(default_factory=dict)
    store_profile: dict[str, Any] | None = None


def validate_device_name(name: str) -> str:
    name = name.strip()
    if not 0 < len(name) <= 64 or not name.isprintable():
        raise UsageError("a device name is 1 to 64 printable characters")
    return name


def _wipe_tree(folder: Path) -> None:
    """Overwrite and remove every file below `folder` (symlinks only removed), then it."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            _wipe_tree(entry)
            continue
        if entry.is_file() and not entry.is_symlink():
            _overwrite(entry)
        entry.unlink()
    folder.rmdir()


def _overwrite(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        left = os.fstat(fd).st_size
        while left > 0:  # in pieces: a spooled pack can be megabytes
            left -= os.write(fd, os.urandom(min(left, 1 << 20)))
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class DeviceStore:
    """`$XDG_DATA_HOME/encfs-cloud/<fs id hex>/` holding `device.key` and `state.json`."""

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
            root = Path(xdg) / "encfs-cloud"
        self.root = root

    def folder(self, fs_id: bytes) -> Path:
        return self.root / fs_id.hex()

    # --- the machine binding -------------------------------------------------------------

    def _machine_secret(self) -> bytes:
        value = os.environ.get(ENV_MACHINE_ID, "").strip()
        for path in () if value else MACHINE_ID_FILES:
            try:
                value = Path(path).read_text().strip()
            except OSError:
                continue
            if value:
                break
        if not value:
            value = self._fallback_machine_secret()
        return aead.digest(b"encfs-cloud/v1/machine\0" + value.encode())

    def _fallback_machine_secret(self) -> str:
        # Containers often lack a machine id; a random file beside the keys still keeps a single
        # copied fs folder from opening elsewhere.
        make_private_dir(self.root)
        path = self.root / FALLBACK_MACHINE_FILE
        if not path.exists():
            with contextlib.suppress(FileExistsError):  # another process made it first
                write_atomic(path, os.urandom(16).hex().encode(), exclusive=True)
        return read_private(path).decode().strip()

    def _file_key(self, pass_key: bytes, ad: bytes) -> SecretKey:
        ikm = bytearray(self._machine_secret()) + bytearray(pass_key)
        try:
            info = b"encfs-cloud/v1/device-key-file\0" + ad
            hkdf = HKDF(algorithm=hashes.SHA256(), length=aead.KEY_LEN, salt=None, info=info)
            return SecretKey(hkdf.derive(bytes(ikm)))
        finally:
            ikm[:] = bytes(len(ikm))

    def _machine_check(self, fs_id: bytes, device_id: str) -> bytes:
        info = b"encfs-cloud/v1/machine-check\0" + fs_id + device_id.encode()
        hkdf = HKDF(algorithm=hashes.SHA256(), length=8, salt=None, info=info)
        return hkdf.derive(self._machine_secret())

    # --- the device key --------------------------------------------------------------------

    def has(self, fs_id: bytes) -> bool:
        return (self.folder(fs_id) / KEY_FILE).exists()

    def needs_passphrase(self, fs_id: bytes) -> bool:
        return self._read_key_file(fs_id).get("kdf") is not None

    def device_id(self, fs_id: bytes) -> str:
        """This machine's device id for the filesystem, read without unsealing the key."""
        device_id = self._read_key_file(fs_id).get("device_id")
        if not isinstance(device_id, str):
            raise FormatError(f"device key file {self._key_path(fs_id)} is unreadable")
        return device_id

    def create(self, fs_id: bytes, device_name: str, passphrase: bytes | None) -> DeviceIdentity:
        if self.has(fs_id):
            raise UsageError(
                f"this machine already has a device key for filesystem {fs_id.hex()}; "
                "wipe it first (encfs-cloud wipe SOURCE)"
            )
        name = validate_device_name(device_name)
        identity = DeviceIdentity(layout.random_id(), name, X25519PrivateKey.generate(), None)
        make_private_dir(self.root)
        make_private_dir(self.folder(fs_id))
        return self._seal(fs_id, identity, passphrase, _now(), exclusive=True)

    def load(self, fs_id: bytes, passphrase: bytes | None) -> DeviceIdentity:
        doc = self._read_key_file(fs_id)
        try:
            device_id, name = str(doc["device_id"]), str(doc["name"])
            kdf = None if doc["kdf"] is None else KdfParams.from_json(doc["kdf"])
            check = base64.b64decode(doc["machine_check"], validate=True)
            sealed = base64.b64decode(doc["sealed"], validate=True)
            created = str(doc["created_at"])
            if doc["format"] != 1 or doc["kind"] != _KIND or doc["fs_id"] != fs_id.hex():
                raise ValueError("not a device key for this filesystem")
        except (KeyError, ValueError, TypeError) as exc:
            path = self._key_path(fs_id)
            raise FormatError(f"device key file {path} is unreadable: {exc}") from None
        if kdf is not None:
            kdf.check()
        if not hmac.compare_digest(check, self._machine_check(fs_id, device_id)):
            raise DeviceKeyMissingError(
                f"the device key for filesystem {fs_id.hex()} was made on another machine "
                "(a copied key is refused); enroll this machine with encfs-cloud device request"
            )
        if kdf is not None and not passphrase:
            raise WrongPassphraseError(f"the device key for {fs_id.hex()} needs its passphrase")
        ad = self._ad(fs_id, device_id, name, kdf, created)
        pass_key = kdf.derive(passphrase) if kdf is not None and passphrase else b""
        key = self._file_key(pass_key, ad)
        try:
            raw = bytearray(aead.open_sealed(key, sealed, ad))
        except IntegrityError:
            if kdf is None:
                path = self._key_path(fs_id)
                raise IntegrityError(f"device key file {path} was modified") from None
            raise WrongPassphraseError(f"wrong passphrase for filesystem {fs_id.hex()}") from None
        finally:
            key.wipe()
        try:
            private = X25519PrivateKey.from_private_bytes(bytes(raw))
        finally:
            raw[:] = bytes(len(raw))
        return DeviceIdentity(device_id, name, private, kdf)

    def change_passphrase(self, fs_id: bytes, old: bytes | None, new: bytes | None) -> None:
        identity = self.load(fs_id, old)
        created = str(self._read_key_file(fs_id)["created_at"])
        try:
            self._seal(fs_id, identity, new, created, exclusive=False)
        finally:
            identity.wipe()

    def wipe(self, fs_id: bytes) -> None:
        """Overwrite every file of the filesystem's folder with random bytes, then remove it.

        On SSDs and copy-on-write filesystems an overwrite may land elsewhere; the key is still
        sealed (machine + passphrase), so this is defence in depth, not the only line. Once no
        filesystem is left, the fallback machine secret and the root folder go too.
        """
        folder = self.folder(fs_id)
        if not folder.is_dir() or folder.is_symlink():
            return
        _wipe_tree(folder)  # the key, the state, and the spool of sealed objects
        fsync_dir(self.root)
        left = list(self.root.iterdir())
        if all(e.name == FALLBACK_MACHINE_FILE and e.is_file() for e in left):
            for entry in left:
                _overwrite(entry)
                entry.unlink()
            with contextlib.suppress(OSError):  # another process may have just enrolled
                self.root.rmdir()

    # --- local state ---------------------------------------------------------------------

    def load_state(self, fs_id: bytes) -> DeviceState:
        path = self.folder(fs_id) / STATE_FILE
        if not path.exists():
            return DeviceState()
        check_private_dir(self.folder(fs_id))
        try:
            doc = json.loads(read_private(path))
            seq, chash, check = doc["commit_seq"], doc["commit_hash"], doc["key_check"]
            return DeviceState(
                commit_seq=None if seq is None else int(seq),
                commit_hash=None if chash is None else bytes.fromhex(chash),
                key_check=None if check is None else bytes.fromhex(check),
                keyring_version=int(doc["keyring_version"]),
                generation_checks={
                    int(g): bytes.fromhex(v) for g, v in doc["generation_checks"].items()
                },
                header_generation=int(doc.get("header_generation", 0)),
                connection={str(k): str(v) for k, v in doc.get("connection", {}).items()},
                store_profile=doc.get("store_profile"),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise FormatError(f"device state {path} is unreadable: {exc}") from None

    @contextlib.contextmanager
    def state_lock(self, fs_id: bytes) -> Iterator[None]:
        """Excludes other processes (a mount and a CLI command) between load and save."""
        make_private_dir(self.root)
        make_private_dir(self.folder(fs_id))
        path = self.folder(fs_id) / STATE_LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update_state(self, fs_id: bytes, change: Callable[[DeviceState], None]) -> DeviceState:
        """load_state, `change`, save_state as one step against other processes."""
        with self.state_lock(fs_id):
            state = self.load_state(fs_id)
            change(state)
            self.save_state(fs_id, state)
            return state

    def save_state(self, fs_id: bytes, state: DeviceState) -> None:
        make_private_dir(self.root)
        make_private_dir(self.folder(fs_id))
        doc = {
            "format": 1,
            "commit_seq": state.commit_seq,
            "commit_hash": None if state.commit_hash is None else state.commit_hash.hex(),
            "key_check": None if state.key_check is None else state.key_check.hex(),
            "keyring_version": state.keyring_version,
            "generation_checks": {str(g): v.hex() for g, v in state.generation_checks.items()},
            "header_generation": state.header_generation,
            "connection": state.connection,
            "store_profile": state.store_profile,
        }
        write_atomic(self.folder(fs_id) / STATE_FILE, _canonical(doc), exclusive=False)

    # --- helpers -------------------------------------------------------------------------

    def _key_path(self, fs_id: bytes) -> Path:
        return self.folder(fs_id) / KEY_FILE

    @staticmethod
    def _ad(fs_id: bytes, device_id: str, name: str, kdf: KdfParams | None, created: str) -> bytes:
        # Everything stored next to the sealed key is authenticated with it, so no field (above
        # all the KDF parameters) can be changed without the open failing.
        kdf_json = _canonical(None if kdf is None else kdf.to_json())
        return aead.associated_data(fs_id, "device-key-file", device_id, name, kdf_json, created)

    def _seal(
        self,
        fs_id: bytes,
        identity: DeviceIdentity,
        passphrase: bytes | None,
        created: str,
        *,
        exclusive: bool,
    ) -> DeviceIdentity:
        kdf = KdfParams.default() if passphrase else None
        ad = self._ad(fs_id, identity.device_id, identity.name, kdf, created)
        pass_key = kdf.derive(passphrase) if kdf is not None and passphrase else b""
        key = self._file_key(pass_key, ad)
        raw = bytearray(identity.private_key.private_bytes_raw())
        try:
            sealed = aead.seal(key, raw, ad)
        finally:
            raw[:] = bytes(len(raw))
            key.wipe()
        doc = {
            "format": 1,
            "kind": _KIND,
            "fs_id": fs_id.hex(),
            "device_id": identity.device_id,
            "name": identity.name,
            "created_at": created,
            "kdf": None if kdf is None else kdf.to_json(),
            "machine_check": base64.b64encode(
                self._machine_check(fs_id, identity.device_id)
            ).decode(),
            "sealed": base64.b64encode(sealed).decode(),
        }
        write_atomic(self._key_path(fs_id), _canonical(doc) + b"\n", exclusive=exclusive)
        return DeviceIdentity(identity.device_id, identity.name, identity.private_key, kdf)

    def _read_key_file(self, fs_id: bytes) -> dict[str, Any]:
        path = self._key_path(fs_id)
        if not path.exists() and not path.is_symlink():
            raise DeviceKeyMissingError(
                f"no device key for filesystem {fs_id.hex()} on this machine ({path})"
            )
        check_private_dir(self.folder(fs_id))
        try:
            doc = json.loads(read_private(path))
        except ValueError as exc:
            raise FormatError(f"device key file {path} is unreadable: {exc}") from None
        if not isinstance(doc, dict):
            raise FormatError(f"device key file {path} is unreadable")
        return doc
