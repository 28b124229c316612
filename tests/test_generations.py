"""Key generations as a one-way ratchet: start points, a late writer, keyring floors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from encfs_cloud import layout
from encfs_cloud.errors import AbortedError, IntegrityError, RecoveryKeyError, RollbackError
from encfs_cloud.keys import enrollment, records, vault
from encfs_cloud.keys import master as K
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.generations import settle_start
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.memory import MemoryStore
from encfs_cloud.tree.journal import (
    KIND_DELTA,
    KIND_SNAPSHOT,
    CommitInfo,
    Head,
    commit_hash,
    export_delta,
    export_snapshot,
    replay,
    seal_commit,
)
from encfs_cloud.tree.metadata import Metadata

PW = b"pass phrase"


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCFS_CLOUD_TEST_FAST_KDF", "1")
    monkeypatch.setenv("ENCFS_CLOUD_MACHINE_ID", "test-machine")


def _machine(tmp_path: Path, name: str) -> DeviceStore:
    return DeviceStore(tmp_path / f"xdg-{name}" / "encfs-cloud")


def _enroll(store: MemoryStore, ua: vault.Unlocked, a: DeviceStore, b: DeviceStore) -> str:
    code = enrollment.request_enrollment(store, b, None, "phone")
    return enrollment.approve(store, ua, a, code).device_id


def _commit(store: MemoryStore, keys: K.MasterKeys, fs_id: bytes, head: Head | None) -> Head:
    """Write the next commit (a snapshot first, then empty deltas) sealed with `keys`."""
    md = Metadata()
    seq = 1 if head is None else head.seq + 1
    info = CommitInfo(
        seq,
        KIND_SNAPSHOT if head is None else KIND_DELTA,
        b"" if head is None else head.hash,
        seq if head is None else head.snapshot_seq,
        time.time_ns(),
    )
    body = export_snapshot(md) if head is None else export_delta(md)
    sealed = seal_commit(Sealer(fs_id, keys), info, body)
    store.put(layout.commit_name(seq), sealed, if_none_match=True)
    return Head(seq, commit_hash(sealed), info.snapshot_seq, 0, 0)


def test_late_writer_settles_the_start_and_a_revoked_key_cannot_append(tmp_path: Path) -> None:
    store = MemoryStore()
    a, b = _machine(tmp_path, "a"), _machine(tmp_path, "b")
    ua, _ = vault.init_filesystem(store, a, PW, "laptop")
    b_id = _enroll(store, ua, a, b)
    stolen = vault.unlock(store, b, None).keys.copy()
    head = _commit(store, ua.keys, ua.fs_id, None)
    writer = vault.unlock(store, a, PW)  # a mount that has not yet seen the revocation
    assert enrollment.revoke_device(store, ua, a, b_id) == 2
    assert ua.keys.starts == {1: 1, 2: head.seq + 1}
    # The mount commits once more under generation 1: past the start, refused at replay.
    late = _commit(store, writer.keys, writer.fs_id, head)
    fresh = vault.unlock(store, a, PW)
    with pytest.raises(IntegrityError, match="retired key"):
        replay(store, Sealer(fresh.fs_id, fresh.keys))
    # It adopts generation 2 and moves the start past its own commit; nobody else could.
    assert not settle_start(store, b, vault.unlock(store, a, PW), 2, late.seq)
    assert vault.refresh(store, a, writer)
    assert settle_start(store, a, writer, 1, late.seq)
    assert writer.keys.starts[2] == late.seq + 1
    fresh = vault.unlock(store, a, PW)
    _, replayed, _ = replay(store, Sealer(fresh.fs_id, fresh.keys))
    assert replayed.seq == late.seq
    # The revoked key appends after that: refused, whatever it chains to.
    _commit(store, stolen, fresh.fs_id, replayed)
    with pytest.raises(IntegrityError, match="retired key"):
        replay(store, Sealer(fresh.fs_id, fresh.keys))
    store.delete(layout.commit_name(late.seq + 1))
    # Generation 2 commits, then a generation 1 commit after it: a drop along the chain.
    g2 = _commit(store, fresh.keys, fresh.fs_id, replayed)
    fresh.keys.starts = {1: 1}  # even without the start points, the chain may not go down
    _commit(store, stolen, fresh.fs_id, g2)
    with pytest.raises(IntegrityError, match="older than the commit before it"):
        replay(store, Sealer(fresh.fs_id, fresh.keys))


def test_keyring_resealed_under_an_old_generation_is_refused(tmp_path: Path) -> None:
    store = MemoryStore()
    a, b, c = (_machine(tmp_path, n) for n in "abc")
    ua, _ = vault.init_filesystem(store, a, PW, "laptop")
    b_id = _enroll(store, ua, a, b)
    _enroll(store, ua, a, c)
    stolen = vault.unlock(store, b, None).keys.copy()
    old = K.open_keyring(stolen, ua.fs_id, store.get(records.KEYRING_NAME))
    enrollment.revoke_device(store, ua, a, b_id)
    version, gen = K.keyring_head(store.get(records.KEYRING_NAME))
    assert gen == 2
    header = records.parse_header(store.get(layout.HEADER_NAME))
    store.put(layout.HEADER_NAME, records.seal_header(stolen, header))
    # An older keyring under generation 1 looks like an interrupted revocation: accepted (the
    # documented limit for a device that never saw generation 2).
    store.put(records.KEYRING_NAME, K.seal_keyring(stolen, ua.fs_id, old))
    assert vault.unlock(store, c, None).keys.current == 1
    fake = K.Keyring(
        version + 1, 1, old.recovery_public, old.recovery_created_at, old.devices, {1: 1}
    )
    store.put(records.KEYRING_NAME, K.seal_keyring(stolen, ua.fs_id, fake))
    with pytest.raises(IntegrityError, match="re-sealed"):
        vault.unlock(store, _machine(tmp_path, "c"), None)


def test_keyring_start_points_are_authenticated_and_consistent() -> None:
    keys = K.new_master_keys()
    fs_id = bytes(16)
    ring = K.Keyring(1, 1, bytes(32), "2024-01-01T00:00:00Z", [], {1: 1})
    assert K.open_keyring(keys, fs_id, K.seal_keyring(keys, fs_id, ring)).starts == {1: 1}
    for starts in ({}, {1: 1, 2: 5}):  # the current one missing, or one from the future
        bad = K.Keyring(1, 1, bytes(32), "2024-01-01T00:00:00Z", [], starts)
        with pytest.raises(IntegrityError, match="start points"):
            K.open_keyring(keys, fs_id, K.seal_keyring(keys, fs_id, bad))
    keys.starts = {1: 1, 2: 10, 3: 20}
    assert [keys.required_generation(s) for s in (1, 9, 10, 19, 20, 99)] == [1, 1, 2, 2, 3, 3]


def test_rotation_starts_a_generation_and_recover_refuses_the_old_key(tmp_path: Path) -> None:
    store = MemoryStore()
    a = _machine(tmp_path, "a")
    ua, old_text = vault.init_filesystem(store, a, PW, "laptop")
    old_record = store.get(records.RECOVERY_NAME)
    new_text = enrollment.rotate_recovery_key(store, ua, a)
    assert ua.keys.current == 2 and ua.keyring.generation == 2
    assert store.head(records.RECOVERY_NEXT_NAME) is None
    store.put(records.RECOVERY_NAME, old_record)
    with pytest.raises(RecoveryKeyError, match="rotated"):
        vault.unlock_with_recovery(store, _machine(tmp_path, "x"), old_text, None, "x")
    enrollment.rotate_recovery_key(store, ua, a)  # puts a current record back
    with pytest.raises(RecoveryKeyError):
        vault.unlock_with_recovery(store, _machine(tmp_path, "y"), new_text, None, "y")


class _CrashAt(MemoryStore):
    """A store whose put of one name fails once, like a crash at that point."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: str | None = None

    def put(
        self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        if name == self.fail:
            self.fail = None
            raise OSError("crash")
        return super().put(name, data, if_none_match=if_none_match, if_match=if_match)


def test_interrupted_revocation_blocks_keyring_changes_until_finished(tmp_path: Path) -> None:
    store = _CrashAt()
    a, b, c, d = (_machine(tmp_path, n) for n in "abcd")
    ua, _ = vault.init_filesystem(store, a, PW, "laptop")
    b_id = _enroll(store, ua, a, b)
    _enroll(store, ua, a, c)
    store.fail = records.KEYRING_NAME
    with pytest.raises(OSError):
        enrollment.revoke_device(store, ua, a, b_id)
    # C's record already wraps the uncommitted generation 2: a keyring change under 1 now
    # would make C refuse every later keyring, so it is refused until the revocation is redone.
    uc = vault.unlock(store, c, None)
    assert uc.keys.current == 1 and uc.keys.uncommitted
    with pytest.raises(AbortedError, match="interrupted"):
        _enroll(store, uc, c, d)
    again = vault.unlock(store, a, PW)
    assert enrollment.revoke_device(store, again, a, b_id) == 2 and not again.keys.uncommitted
    uc = vault.unlock(store, c, None)
    assert uc.keys.current == 2 and not uc.keys.uncommitted
    _enroll(store, uc, c, d)
    assert vault.unlock(store, d, None).keys.current == 2


def test_spooled_commits_from_before_a_revocation_settle_at_the_next_mount(
    tmp_path: Path,
) -> None:
    from encfs_cloud.daemon.options import VolumeOptions
    from encfs_cloud.daemon.volume import Volume
    from encfs_cloud.data import spool

    store = MemoryStore()
    a, b = _machine(tmp_path, "a"), _machine(tmp_path, "b")
    ua, _ = vault.init_filesystem(store, a, PW, "laptop")
    b_id = _enroll(store, ua, a, b)
    head = _commit(store, ua.keys, ua.fs_id, None)
    # An unmount that could not upload its last commit (sealed under generation 1) spooled it.
    info = CommitInfo(head.seq + 1, KIND_DELTA, head.hash, head.snapshot_seq, time.time_ns())
    late = seal_commit(Sealer(ua.fs_id, ua.keys), info, export_delta(Metadata()))
    spool.save(a.folder(ua.fs_id), [(layout.commit_name(info.seq), late)])
    enrollment.revoke_device(store, vault.unlock(store, a, PW), a, b_id)  # starts at seq 2
    vol = Volume(store, vault.unlock(store, a, PW), a, VolumeOptions())
    try:
        assert vol.committer.head.seq == info.seq  # uploaded, and the start moved past it
        assert vol.unlocked.keys.starts[2] == info.seq + 1
    finally:
        vol.wipe()


def test_header_never_goes_back_a_generation_on_a_device_that_saw_newer(tmp_path: Path) -> None:
    store = MemoryStore()
    a, b = _machine(tmp_path, "a"), _machine(tmp_path, "b")
    ua, _ = vault.init_filesystem(store, a, PW, "laptop")
    b_id = _enroll(store, ua, a, b)
    stolen = vault.unlock(store, b, None).keys.copy()
    enrollment.revoke_device(store, ua, a, b_id)
    assert vault.unlock(store, a, PW).keys.current == 2  # A saw the header under generation 2
    header = records.parse_header(store.get(layout.HEADER_NAME))
    store.put(layout.HEADER_NAME, records.seal_header(stolen, header))  # B re-tags it under 1
    with pytest.raises(RollbackError, match="re-tagged with a retired key"):
        vault.unlock(store, a, PW)
