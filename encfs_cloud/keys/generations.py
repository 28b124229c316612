"""Starting a key generation: revocation, recovery-key rotation, a device removing itself."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from encfs_cloud import layout
from encfs_cloud.crypto.aead import SecretKey
from encfs_cloud.errors import AbortedError, IntegrityError, ObjectMissingError, UsageError
from encfs_cloud.keys import master as K
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.records import (
    RECOVERY_NAME,
    RECOVERY_NEXT_NAME,
    decode_record,
    device_record,
    keyring_lock,
    load_keyring,
    now,
    parse_header,
    record_name,
    record_start,
    recovery_record,
    seal_header,
    store_keyring,
    verify_header,
)
from encfs_cloud.keys.trust import remember
from encfs_cloud.keys.vault import Unlocked, refresh
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.capped import read_capped, read_capped_with_etag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewRecovery:
    """A recovery key replacing the current one (its secret never reaches this module)."""

    public: bytes
    confirm: bytes  # recovery_confirm over generation 1's key check


def newest_commit(store: ObjectStore) -> int:
    """The highest commit number in the bucket (0 if none)."""
    seqs = (layout.commit_seq(o.name) for o in store.list(layout.META_PREFIX))
    return max((s for s in seqs if s is not None), default=0)


def _old_confirm(
    store: ObjectStore, name: str, subject: str
) -> tuple[bytes, dict[str, Any] | None]:
    # The confirmation tag covers generation 1 (and the enrollment starting point) only, so it
    # stays valid across generations: copy both, or a device that has not unlocked yet could
    # no longer check its record.
    try:
        raw = read_capped(store, name, layout.KEY_RECORD_CAP)
        return decode_record(raw, subject)[2], record_start(raw)
    except (ObjectMissingError, IntegrityError):
        return b"", None


def start_generation(
    store: ObjectStore,
    unlocked: Unlocked,
    devices: DeviceStore,
    *,
    remove: str | None = None,
    recovery: NewRecovery | None = None,
) -> K.Keyring:
    """Make generation N+1, wrap it for every device but `remove` and for the recovery key.

    The keyring that commits it records where it starts in the commit chain (the newest
    commit + 1): replay refuses any later commit sealed under an older generation, so a
    device holding only the older keys cannot append to the chain. Order matters for crashes:
    every remaining record (ours first) and the recovery record get the new generation, then
    the keyring commits it, then the removed record goes. Until the keyring commits, nobody
    seals with the new generation (unlock drops uncommitted ones).
    """
    fs_id = unlocked.fs_id
    refresh(store, devices, unlocked)
    me = unlocked.device.device_id
    with keyring_lock(store, me):
        if store.head(RECOVERY_NEXT_NAME) is not None:
            raise AbortedError(
                "a recovery key rotation was interrupted; run recovery-key --rotate again"
            )
        ring, etag = load_keyring(store, unlocked.keys, fs_id)
        if remove is not None and ring.device(remove) is None:
            raise UsageError(f"device {remove} is not enrolled")
        new_keys = unlocked.keys.copy()
        try:
            gen = K.add_generation(new_keys)
            new_keys.keyring_floor = ring.version + 1
            remaining = sorted(
                (d for d in ring.devices if d.device_id != remove),
                key=lambda d: d.device_id != me,
            )
            remaining = [
                K.DeviceEntry(d.device_id, d.name, d.enrolled_at, d.public_key, gen)
                for d in remaining
            ]
            for entry in remaining:
                name = record_name(entry.device_id)
                confirm, start = _old_confirm(store, name, entry.device_id)
                store.put(name, device_record(new_keys, fs_id, entry, confirm, start))
            if recovery is None:
                rec_public, rec_created = ring.recovery_public, ring.recovery_created_at
                confirm, _ = _old_confirm(store, RECOVERY_NAME, K.RECOVERY_ID)
                rec_blob = recovery_record(new_keys, fs_id, rec_public, confirm)
                store.put(RECOVERY_NAME, rec_blob)
            else:
                # The old record stays where it is until the keyring commits: a crash leaves
                # the old key working and the new one in recovery.next (recovery tries both).
                rec_public, rec_created = recovery.public, now()
                rec_blob = recovery_record(new_keys, fs_id, rec_public, recovery.confirm)
                store.put(RECOVERY_NEXT_NAME, rec_blob)
            starts = {**ring.starts, gen: newest_commit(store) + 1}
            new = K.Keyring(ring.version + 1, gen, rec_public, rec_created, remaining, starts)
            try:
                store_keyring(store, new_keys, fs_id, new, etag)
            except BaseException:
                if recovery is not None:
                    store.delete(RECOVERY_NEXT_NAME)
                raise
            # Committed: from here on this process must seal with the new generation, whatever
            # the clean-up below does.
            unlocked.keys.add(gen, SecretKey(new_keys.key(gen).material))
            unlocked.keys.starts = dict(starts)
            unlocked.keys.keyring_floor = new_keys.keyring_floor
            unlocked.keys.uncommitted = False
            unlocked.keyring = new
        finally:
            new_keys.wipe()
        remember(devices, fs_id, unlocked.keys, new)
        if recovery is not None:
            store.put(RECOVERY_NAME, rec_blob)
            store.delete(RECOVERY_NEXT_NAME)
        if remove is not None:
            store.delete(record_name(remove))
            store.delete(layout.REQUESTS_PREFIX + remove)
        # Re-tag the header under the new generation, which the removed key never held.
        # Verify first: re-tagging whatever the bucket holds would launder a modified header.
        raw, header_etag = read_capped_with_etag(store, layout.HEADER_NAME, layout.HEADER_CAP)
        header = parse_header(raw, store.url)
        verify_header(unlocked.keys, header)
        store.put(layout.HEADER_NAME, seal_header(unlocked.keys, header), if_match=header_etag)
    remember(devices, fs_id, unlocked.keys, new, gen)
    return new


def settle_start(
    store: ObjectStore, devices: DeviceStore, unlocked: Unlocked, sealed_gen: int, written_seq: int
) -> bool:
    """Move a generation's start past commits this writer sealed before it learned of it.

    A mount adopts a new generation at its next key check (at most 30 s late); commits it
    wrote meanwhile under the older generation would fall after the recorded start and be
    refused at replay. Only the writer knows they are its own, and it holds the new generation
    by now, so it (and nobody without that generation) moves the start. `written_seq` is the
    newest commit it sealed under `sealed_gen`. Returns True if a start moved.
    """
    late = {g for g, s in unlocked.keys.starts.items() if g > sealed_gen and s <= written_seq}
    newest = max(late, default=0)
    if not newest or unlocked.keys.current < newest:
        return False
    fs_id = unlocked.fs_id
    with keyring_lock(store, unlocked.device.device_id):
        ring, etag = load_keyring(store, unlocked.keys, fs_id)
        if ring.generation != unlocked.keys.current:
            raise AbortedError("the key generation changed again; retry at the next check")
        starts = {
            g: written_seq + 1 if g > sealed_gen and s <= written_seq else s
            for g, s in ring.starts.items()
        }
        if starts == ring.starts:
            return False
        new = K.Keyring(
            ring.version + 1,
            ring.generation,
            ring.recovery_public,
            ring.recovery_created_at,
            list(ring.devices),
            starts,
        )
        store_keyring(store, unlocked.keys, fs_id, new, etag)
    unlocked.keys.starts = dict(starts)
    unlocked.keyring = new
    remember(devices, fs_id, unlocked.keys, new)
    log.info("generation %d now starts at commit %d", newest, written_seq + 1)
    return True
