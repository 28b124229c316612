"""Pure layout math: chunk indices, object names, size classes and padding."""

from __future__ import annotations

import os
import struct

CHUNK_SIZE = 1 << 20  # plaintext bytes per chunk
CHUNK_PAD = 4096  # a chunk's plaintext is padded to this, hiding exact small-file sizes
# Packs above 256 KiB are padded to a multiple of one sealed full chunk's room (1 MiB + 4 KiB):
# eight whole chunks (8 MiB + 224 bytes) fill the 8-step class to within 0.4 %.
PACK_STEP = CHUNK_SIZE + CHUNK_PAD
PACK_TARGET = 8 * PACK_STEP  # a pack is closed once the next chunk would not fit in this
FORMAT_VERSION = 2  # 2: chunk digests and generation start points (issue 10)

HEADER_NAME = "encfs-cloud"
LEASE_NAME = "lease"
DATA_PREFIX = "data/"
META_PREFIX = "meta/"
KEYS_PREFIX = "keys/"
REQUESTS_PREFIX = "requests/"
MOUNTS_PREFIX = "mounts/"  # one sealed object per live mount: the newest commit it applied

# The largest object of each kind that is read whole, from the sizes docs/format.md gives with
# a wide margin: a larger one is refused before it is read, so a hostile bucket cannot make a
# command or the mount hold gigabytes. (Commits have no cap: a snapshot grows with the tree.)
HEADER_CAP = 64 << 10  # ~350 B
KEY_RECORD_CAP = 1 << 20  # ~400 B per generation: room for 2,500 generations
KEYRING_CAP = 4 << 20  # ~200 B per device: room for 20,000 devices
SMALL_CAP = 64 << 10  # keys/lock, requests/<id> (~500 B)
LEASE_CAP = 64 << 10  # exactly one size class

# Every pack and commit object is padded to one of these sizes (or a multiple of the last),
# so object sizes say little about how much a user stores.
SIZE_CLASSES = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20, 16 << 20)


def chunk_range(offset: int, length: int) -> range:
    """Indices of the chunks that bytes [offset, offset+length) touch."""
    if length <= 0:
        return range(0)
    return range(offset // CHUNK_SIZE, (offset + length - 1) // CHUNK_SIZE + 1)


def chunk_count(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


def padded_chunk_len(plain_len: int) -> int:
    return max(CHUNK_PAD, (plain_len + CHUNK_PAD - 1) // CHUNK_PAD * CHUNK_PAD)


def size_class(length: int) -> int:
    """The smallest size class that holds `length` bytes."""
    for cls in SIZE_CLASSES:
        if length <= cls:
            return cls
    top = SIZE_CLASSES[-1]
    return (length + top - 1) // top * top


def pack_class(length: int) -> int:
    """The padded size of a pack holding `length` bytes of sealed chunks.

    Small packs (closed early by a commit) use the object classes up to 256 KiB; above that
    whole steps, so padding costs less than one chunk per pack instead of up to three quarters.
    """
    for cls in SIZE_CLASSES[:2]:
        if length <= cls:
            return cls
    return (length + PACK_STEP - 1) // PACK_STEP * PACK_STEP


def random_id() -> str:
    return os.urandom(16).hex()


def pack_name(pack_id: str) -> str:
    return DATA_PREFIX + pack_id


def commit_name(seq: int) -> str:
    return f"{META_PREFIX}{seq:016x}"


def commit_seq(name: str) -> int | None:
    if not name.startswith(META_PREFIX):
        return None
    tail = name[len(META_PREFIX) :]
    if len(tail) != 16:
        return None
    try:
        return int(tail, 16)
    except ValueError:
        return None


def frame(payload: bytes, target: int) -> bytes:
    """Length-prefix `payload` and zero-pad it to `target` bytes (the padding is sealed too)."""
    body = struct.pack(">Q", len(payload)) + payload
    if len(body) > target:
        raise ValueError("payload larger than target")
    return body + bytes(target - len(body))


def unframe(body: bytes) -> bytes:
    if len(body) < 8:
        raise ValueError("frame too short")
    (n,) = struct.unpack(">Q", body[:8])
    if n > len(body) - 8:
        raise ValueError("frame length out of range")
    return body[8 : 8 + n]
