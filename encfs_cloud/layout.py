"""Pure layout math: chunk indices, object names, size classes and padding."""

from __future__ import annotations

import os
import struct

CHUNK_SIZE = 1 << 20  # plaintext bytes per chunk
CHUNK_PAD = 4096  # a chunk's plaintext is padded to this, hiding exact small-file sizes
PACK_TARGET = 8 << 20  # a pack is closed once it holds this much
FORMAT_VERSION = 1

HEADER_NAME = "encfs-cloud"
LEASE_NAME = "lease"
DATA_PREFIX = "data/"
META_PREFIX = "meta/"
KEYS_PREFIX = "keys/"
REQUESTS_PREFIX = "requests/"
MOUNTS_PREFIX = "mounts/"  # one sealed object per live mount: the newest commit it applied

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
