"""Commit bodies: zstd round trip, zlib bodies of earlier versions still load, damage is refused."""

from __future__ import annotations

import json
import stat
import struct
import zlib
from pathlib import Path

import pytest

from encfs_cloud import layout
from encfs_cloud.errors import IntegrityError
from encfs_cloud.keys import vault
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.memory import MemoryStore
from encfs_cloud.tree import journal
from encfs_cloud.tree.metadata import ROOT_INODE, Metadata
from encfs_cloud.tree.namespace import Namespace


def _tree() -> Metadata:
    md = Metadata()
    ns = Namespace(md)
    ns.ensure_root(0, 0)
    folder = ns.create(ROOT_INODE, b"folder", stat.S_IFDIR | 0o755, 0, 0)
    for i in range(300):
        ns.create(folder.id, b"file-%03d" % i, stat.S_IFREG | 0o644, 0, 0)
    return md


def _names(md: Metadata) -> list[bytes]:
    return sorted(bytes(r[0]) for r in md.db.execute("SELECT name FROM dentries"))


def _bucket(tmp_path: Path) -> tuple[MemoryStore, Sealer]:
    store = MemoryStore()
    unlocked, _ = vault.init_filesystem(store, DeviceStore(tmp_path / "dev"), None, "laptop")
    return store, Sealer(unlocked.fs_id, unlocked.keys)


def _zlib_payload(info: journal.CommitInfo, body: bytes) -> bytes:
    """A commit as versions before zstd wrote it: no "z" in the header, a zlib body."""
    header = json.dumps(
        {
            "seq": info.seq,
            "kind": info.kind,
            "prev": info.prev_hash.hex(),
            "snapshot": info.snapshot_seq,
            "time_ns": info.time_ns,
        }
    ).encode()
    return struct.pack(">I", len(header)) + header + zlib.compress(body, 1)


def _snapshot_info() -> journal.CommitInfo:
    return journal.CommitInfo(1, journal.KIND_SNAPSHOT, b"", 1, 0)


def test_zstd_commit_round_trip_names_its_compression() -> None:
    md = _tree()
    body = journal.export_snapshot(md)
    payload = journal.encode_commit(_snapshot_info(), body)
    (hlen,) = struct.unpack_from(">I", payload)
    assert json.loads(payload[4 : 4 + hlen])["z"] == "zstd"
    assert payload[4 + hlen : 4 + hlen + 4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    assert len(payload) < len(body) / 2
    info, back = journal.decode_commit(layout.commit_name(1), payload)
    assert info == _snapshot_info() and back == body
    assert _names(journal.load_snapshot(back)) == _names(md)


def test_zlib_snapshot_and_delta_of_earlier_versions_replay(tmp_path: Path) -> None:
    store, sealer = _bucket(tmp_path)
    md = _tree()
    ns = Namespace(md)
    snap = _zlib_payload(_snapshot_info(), journal.export_snapshot(md))
    sealed = sealer.seal_object(layout.commit_name(1), "commit", snap)
    store.put(layout.commit_name(1), sealed, if_none_match=True)
    ns.create(ROOT_INODE, b"added later", stat.S_IFREG | 0o644, 0, 0)
    info = journal.CommitInfo(2, journal.KIND_DELTA, journal.commit_hash(sealed), 1, 0)
    delta = _zlib_payload(info, journal.export_delta(md))
    store.put(
        layout.commit_name(2),
        sealer.seal_object(layout.commit_name(2), "commit", delta),
        if_none_match=True,
    )
    replayed, head, _ = journal.replay(store, sealer)
    assert head.seq == 2 and _names(replayed) == _names(md)
    assert b"added later" in _names(replayed)


@pytest.mark.parametrize("where", ["compressed body", "sealed object"])
def test_tampered_compressed_body_is_refused(tmp_path: Path, where: str) -> None:
    store, sealer = _bucket(tmp_path)
    name = layout.commit_name(1)
    payload = bytearray(journal.encode_commit(_snapshot_info(), journal.export_snapshot(_tree())))
    if where == "compressed body":
        # Sealed after the damage, as a device holding the keys could: only the decoder sees it.
        payload[len(payload) // 2] ^= 0xFF
        payload[-6:] = bytes(6)
        sealed = bytearray(sealer.seal_object(name, "commit", bytes(payload)))
        expect = "malformed|mismatch"
    else:
        sealed = bytearray(sealer.seal_object(name, "commit", bytes(payload)))
        sealed[len(sealed) // 2] ^= 0x01
        expect = "failed authentication"
    store.put(name, bytes(sealed), if_none_match=True)
    with pytest.raises(IntegrityError, match=expect):
        journal.replay(store, sealer)


def test_unknown_compression_is_refused() -> None:
    payload = journal.encode_commit(_snapshot_info(), b"body")
    (hlen,) = struct.unpack_from(">I", payload)
    header = json.loads(payload[4 : 4 + hlen])
    header["z"] = "lz9"
    raw = json.dumps(header).encode()
    forged = struct.pack(">I", len(raw)) + raw + payload[4 + hlen :]
    with pytest.raises(IntegrityError, match="unknown compression"):
        journal.decode_commit(layout.commit_name(1), forged)


def test_snapshot_is_sealed_compacted_with_every_row(tmp_path: Path) -> None:
    store, sealer = _bucket(tmp_path)
    md = _tree()
    ns = Namespace(md)
    for i in range(0, 300, 2):  # deletions leave free and half-empty pages behind
        ns.unlink(md.lookup(ROOT_INODE, b"folder") or 0, b"file-%03d" % i)
    body = journal.export_snapshot(md)
    compact = journal.compact_snapshot(body)
    assert len(compact) < len(body)
    name = layout.commit_name(1)
    sealed = journal.seal_commit(sealer, _snapshot_info(), body)
    assert journal.decode_commit(name, sealer.open_object(name, "commit", sealed))[1] == compact
    store.put(name, sealed, if_none_match=True)
    replayed, _, _ = journal.replay(store, sealer)
    for table in ("inodes", "dentries", "xattrs", "chunks", "counters"):
        query = f"SELECT * FROM {table} ORDER BY 1, 2"
        assert replayed.db.execute(query).fetchall() == md.db.execute(query).fetchall()
    assert replayed.db.execute("PRAGMA freelist_count").fetchone() == (0,)
    with pytest.raises(IntegrityError, match="malformed"):
        journal.compact_snapshot(b"not a database" * 300)


def test_a_snapshot_past_the_compaction_limit_is_sealed_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, sealer = _bucket(tmp_path)
    body = journal.export_snapshot(_tree())
    monkeypatch.setattr(journal, "COMPACT_MAX_BYTES", len(body) - 1)
    sealed = journal.seal_commit(sealer, _snapshot_info(), body)
    name = layout.commit_name(1)
    assert journal.decode_commit(name, sealer.open_object(name, "commit", sealed))[1] == body


def test_new_filesystems_name_the_feature_and_older_headers_still_open(tmp_path: Path) -> None:
    store, _ = _bucket(tmp_path)
    assert vault.read_header(store)["features"] == ["zstd-commits"]
    header = json.loads(store.get(layout.HEADER_NAME))
    header["features"] = []  # as filesystems made before zstd commits have it
    store.put(layout.HEADER_NAME, json.dumps(header).encode())
    assert vault.read_header(store)["features"] == []
