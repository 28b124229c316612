"""What a device trusts: key checks, keyring generations and versions, its remembered state."""

from __future__ import annotations

import hmac
from typing import Any

from encfs_cloud.errors import AbortedError, IntegrityError, RollbackError
from encfs_cloud.keys import master as K
from encfs_cloud.keys.device import DeviceState, DeviceStore


def check_generations(keys: K.MasterKeys, state: DeviceState, ring: K.Keyring) -> None:
    """Refuse a generation that differs from one seen before, or an older keyring."""
    if ring.version < state.keyring_version:
        raise RollbackError(
            f"the keyring is version {ring.version} but this device has seen "
            f"{state.keyring_version}: the bucket was rolled back"
        )
    if state.generation_checks and max(state.generation_checks) > ring.generation:
        raise RollbackError("the key generation went backwards: the bucket was rolled back")
    for gen in keys.generations:
        seen = state.generation_checks.get(gen)
        if seen is not None and not same(seen, K.key_check(keys, gen)):
            raise IntegrityError(f"key generation {gen} is not the one this device saw before")


def check_keyring_generation(keys: K.MasterKeys, ring: K.Keyring) -> None:
    """Refuse a keyring sealed under an older generation than our key record commits.

    A record that wraps generation N+1 says from which keyring version on the keyring is sealed
    under N+1; only holders of N+1 can write that. A newer-or-equal keyring under an older
    generation was re-sealed by someone without N+1: a revoked device hiding its revocation.
    (An older keyring under the older generation is an interrupted revocation: restricted.)
    """
    if ring.generation < keys.current and ring.version >= keys.keyring_floor:
        raise IntegrityError(
            f"the keyring (version {ring.version}) is sealed under key generation "
            f"{ring.generation}, but generation {keys.current} was committed at keyring version "
            f"{keys.keyring_floor}: it was re-sealed by a device without the newest key "
            "(a revoked device hiding its revocation)"
        )


def adopt_keyring(keys: K.MasterKeys, ring: K.Keyring) -> None:
    """Make `keys` follow a trusted keyring: committed generations and their start points."""
    keys.restrict(ring.generation)
    keys.starts = dict(ring.starts)


def refuse_if_uncommitted(keys: K.MasterKeys) -> None:
    """A keyring change under the older generation would make the records that already wrap
    the uncommitted one refuse every later keyring (their floor): finish the change first."""
    if keys.uncommitted:
        raise AbortedError(
            "a revocation (or recovery-key rotation, or wipe) was interrupted and left a newer "
            "key generation uncommitted: run it again first"
        )


def same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def remember(
    devices: DeviceStore,
    fs_id: bytes,
    keys: K.MasterKeys,
    ring: K.Keyring,
    header_generation: int = 0,
) -> None:
    """Record the key commitments and keyring version this device has now seen."""
    checks = {gen: K.key_check(keys, gen) for gen in keys.generations}

    def change(state: DeviceState) -> None:
        state.key_check = checks[1]
        state.keyring_version = max(state.keyring_version, ring.version)
        state.generation_checks.update(checks)
        state.header_generation = max(state.header_generation, header_generation)

    devices.update_state(fs_id, change)


def check_header_generation(state: DeviceState, gen: int) -> None:
    """The header never goes back to an older generation's tag on a device that saw newer."""
    if gen < state.header_generation:
        raise RollbackError(
            f"the header is tagged under key generation {gen}, but this device has seen it "
            f"under {state.header_generation}: re-tagged with a retired key, or rolled back"
        )


def seed_state(devices: DeviceStore, fs_id: bytes, start: dict[str, Any]) -> None:
    """Take the approver's newest commit and keyring version as what this device has seen."""

    def seed(state: DeviceState) -> None:
        if start["seq"] > (state.commit_seq or 0):
            state.commit_seq = start["seq"]
            state.commit_hash = bytes.fromhex(start["hash"]) if start["hash"] else None
        state.keyring_version = max(state.keyring_version, start["keyring"])

    devices.update_state(fs_id, seed)
