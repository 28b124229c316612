"""Argon2id parameters for device passphrases: defaults, floors, ceilings and derivation."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from encfs_cloud.crypto import aead
from encfs_cloud.errors import FormatError

ENV_FAST_KDF = "ENCFS_CLOUD_TEST_FAST_KDF"
# Argon2id floors (OWASP's minimum: 19 MiB, t=2, p=1): a file asking for less is refused, so a
# tampered or badly written file cannot make a passphrase cheap to guess. The ceilings stop a
# crafted file from making us allocate gigabytes.
MIN_MEMORY_KIB = 19 * 1024
MIN_ITERATIONS = 2
MIN_LANES = 1
MIN_SALT = 16
MAX_MEMORY_KIB = 1024 * 1024  # 1 GiB
MAX_ITERATIONS = 64
MAX_LANES = 64
# 64 MiB, t=3, p=2: about 0.25 s on two cores; a guess costs an attacker the same.
DEFAULT_MEMORY_KIB = 64 * 1024
DEFAULT_ITERATIONS = 3
DEFAULT_LANES = 2


@dataclass(frozen=True)
class KdfParams:
    memory_kib: int
    iterations: int
    lanes: int
    salt: bytes

    @classmethod
    def default(cls) -> KdfParams:
        salt = os.urandom(MIN_SALT)
        if os.environ.get(ENV_FAST_KDF) == "1":
            return cls(MIN_MEMORY_KIB, MIN_ITERATIONS, MIN_LANES, salt)
        return cls(DEFAULT_MEMORY_KIB, DEFAULT_ITERATIONS, DEFAULT_LANES, salt)

    def check(
        self,
        min_memory_kib: int = MIN_MEMORY_KIB,
        min_iterations: int = MIN_ITERATIONS,
        min_lanes: int = MIN_LANES,
    ) -> None:
        """FormatError unless every parameter is within [floor, ceiling]."""
        ok = (
            max(min_memory_kib, MIN_MEMORY_KIB) <= self.memory_kib <= MAX_MEMORY_KIB
            and max(min_iterations, MIN_ITERATIONS) <= self.iterations <= MAX_ITERATIONS
            and max(min_lanes, MIN_LANES) <= self.lanes <= MAX_LANES
            and len(self.salt) >= MIN_SALT
        )
        if not ok:
            raise FormatError(
                f"device key KDF parameters below the floors or out of range (argon2id "
                f"m={self.memory_kib} KiB t={self.iterations} p={self.lanes}); refusing"
            )

    def derive(self, passphrase: bytes) -> bytes:
        kdf = Argon2id(
            salt=self.salt,
            length=aead.KEY_LEN,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        )
        return kdf.derive(passphrase)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": "argon2id",
            "memory_kib": self.memory_kib,
            "iterations": self.iterations,
            "lanes": self.lanes,
            "salt": base64.b64encode(self.salt).decode(),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> KdfParams:
        if obj.get("name") != "argon2id":
            raise FormatError(f"device key uses an unknown KDF {obj.get('name')!r}")
        return cls(
            int(obj["memory_kib"]),
            int(obj["iterations"]),
            int(obj["lanes"]),
            base64.b64decode(obj["salt"], validate=True),
        )
