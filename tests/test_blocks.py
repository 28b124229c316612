"""st_blocks accounting: stored chunks and chunks waiting for upload count, holes do not."""

from __future__ import annotations

from encfs_cloud import layout
from encfs_cloud.data.cache import ChunkCache
from encfs_cloud.data.filedata import FileData
from encfs_cloud.tree.metadata import ChunkRef, Metadata

BLOCK = 4096
CHUNK = layout.CHUNK_SIZE


def make() -> tuple[Metadata, ChunkCache, FileData]:
    md = Metadata()
    md.add_pack("p", 1)
    cache = ChunkCache(64 << 20, 16 << 20)
    # Only the metadata and the cache take part in the accounting; nothing is read or sent.
    data = FileData(md, cache, None, None, None, None)  # type: ignore[arg-type]
    return md, cache, data


def test_stored_blocks_per_inode_in_one_query() -> None:
    md, _, _ = make()
    md.set_chunk(5, 0, ChunkRef("p", 0, 10, CHUNK, 1, 1, bytes(32)))
    md.set_chunk(5, 3, ChunkRef("p", 10, 10, 100, 1, 1, bytes(32)))
    md.set_chunk(6, 9, ChunkRef("p", 20, 10, BLOCK + 1, 1, 1, bytes(32)))
    assert md.stored_blocks([5, 6, 7], BLOCK) == {5: CHUNK // BLOCK + 1, 6: 2}
    assert md.stored_blocks([], BLOCK) == {}


def test_waiting_chunks_replace_or_add_and_holes_count_nothing() -> None:
    md, cache, data = make()
    size = 8 * CHUNK
    assert data.allocated_blocks(5, size, BLOCK) == 0, "a file of holes"
    md.set_chunk(5, 0, ChunkRef("p", 0, 10, CHUNK, 1, 1, bytes(32)))
    md.set_chunk(5, 3, ChunkRef("p", 10, 10, 100, 1, 1, bytes(32)))
    stored = CHUNK // BLOCK + 1
    assert data.allocated_blocks(5, size, BLOCK) == stored
    cache.dirty_buffer((5, 3), bytes(5000))  # rewritten, longer, not yet uploaded
    cache.put_inflight((5, 7), bytes(10))  # new, being uploaded
    cache.dirty_buffer((6, 0), bytes(CHUNK))  # another file's: not ours
    expected = stored - 1 + 2 + 1
    assert data.allocated_blocks(5, size, BLOCK) == expected
    # A huge sparse size walks the pending set instead of the chunk indices: same answer.
    assert data.allocated_blocks(5, 1 << 40, BLOCK) == expected
    assert data.allocated_blocks(5, size, BLOCK, stored=stored) == expected
