"""The write path's buffers: random writes against a bytearray model, reused pack buffers."""

from __future__ import annotations

import os
import random

import trio

from encfs_cloud import layout
from encfs_cloud.data.cache import ChunkCache
from encfs_cloud.data.filedata import FileData
from encfs_cloud.data.uploader import FULL_PACK, UPLOAD_SLOTS, Pack, Uploader
from encfs_cloud.keys.master import new_master_keys
from encfs_cloud.keys.sealed import Sealer, sealed_chunk_len
from encfs_cloud.store.memory import MemoryStore
from encfs_cloud.tree.metadata import Metadata

CHUNK = layout.CHUNK_SIZE
INO = 7


class CountingUploader(Uploader):
    """Records every pack buffer it seals into (kept alive, so ids stay distinct)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.buffers: list[bytearray] = []

    def _pack_buffer(self, size: int) -> bytearray:
        buf = super()._pack_buffer(size)
        self.buffers.append(buf)
        return buf


class Rig:
    def __init__(self, dirty_limit: int = 8 << 20) -> None:
        self.md = Metadata()
        self.store = MemoryStore()
        self.sealer = Sealer(os.urandom(16), new_master_keys())
        self.limiter = trio.CapacityLimiter(4)
        self.cache = ChunkCache(32 << 20, dirty_limit)
        self.up = CountingUploader(
            self.md, self.cache, self.sealer, self.store, limiter=self.limiter
        )
        self.data = FileData(self.md, self.cache, self.sealer, self.store, self.up, self.limiter)

    async def land_everything(self) -> None:
        self.up.flush_dirty()
        self.up.close_pack()
        await self.up.wait_packs(list(self.up.pending.values()), 60)

    async def cold_read(self, size: int) -> bytes:
        """The file as the bucket holds it: through an empty cache, nothing pinned."""
        cache = ChunkCache(32 << 20, 8 << 20)
        fresh = FileData(self.md, cache, self.sealer, self.store, self.up, self.limiter)
        return await fresh.read(INO, size, 0, size)


def _offset(rng: random.Random, size: int) -> int:
    """Mostly near chunk boundaries and the end of file, where the buffer logic branches."""
    kind = rng.random()
    if kind < 0.4:
        edge = rng.randrange(0, size // CHUNK + 2) * CHUNK
        return max(0, edge + rng.randrange(-4096, 4097))
    if kind < 0.6:
        return max(0, size + rng.randrange(-5000, 3 * CHUNK))
    return rng.randrange(0, max(size, 1) + CHUNK)


def _length(rng: random.Random) -> int:
    kind = rng.random()
    if kind < 0.25:
        return CHUNK  # the kernel's writeback size
    if kind < 0.35:
        return rng.randrange(CHUNK, 3 * CHUNK)
    if kind < 0.7:
        return rng.randrange(1, 8192)
    return rng.randrange(1, CHUNK)


async def _random_writes(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    rig = Rig(dirty_limit=6 << 20)  # small: the writer meets back-pressure mid-run
    model = bytearray()
    size = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.up.run)
        rig.data.nursery = nursery
        for step in range(steps):
            op = rng.random()
            if op < 0.7:
                off = min(_offset(rng, size), 14 * CHUNK)
                data = rng.randbytes(_length(rng))
                size = await rig.data.write(INO, size, off, data)
                if len(model) < off:
                    model.extend(bytes(off - len(model)))
                model[off : off + len(data)] = data
            elif op < 0.8:
                new = rng.choice([0, rng.randrange(0, size + 1), size + rng.randrange(1, CHUNK)])
                new = rng.choice([new, new - new % CHUNK])  # also exactly on a chunk boundary
                await rig.data.truncate(INO, size, new)
                size = new
                del model[new:]
                model.extend(bytes(new - len(model)))
            elif op < 0.9:
                off = rng.randrange(0, size + 2)
                n = rng.randrange(1, 3 * CHUNK)
                got = await rig.data.read(INO, size, off, n)
                assert got == bytes(model[off : off + n]), f"seed {seed} step {step}: read"
            else:  # an fsync: everything dirty goes out and lands
                await rig.land_everything()
            assert len(model) == size
        await rig.land_everything()
        assert await rig.data.read(INO, size, 0, size) == bytes(model), f"seed {seed}"
        assert await rig.cold_read(size) == bytes(model), f"seed {seed}: stored"
        nursery.cancel_scope.cancel()


def test_random_writes_read_back_as_a_bytearray_model_says() -> None:
    for seed in (1, 2, 3, int(os.environ.get("ENCFS_WRITE_SEED") or random.randrange(1 << 32))):
        trio.run(_random_writes, seed, 120)


def test_misaligned_sequential_writes_read_back() -> None:
    """The kernel's writeback split one write: every later 1 MiB write straddles two chunks."""

    async def main() -> None:
        rig = Rig()
        rng = random.Random(5)
        expected = bytearray()
        size = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.up.run)
            for n in (CHUNK // 3, *([CHUNK] * 20), 12345):
                piece = rng.randbytes(n)
                size = await rig.data.write(INO, size, size, piece)
                expected += piece
                # Dirty data reads back before it is uploaded.
                assert await rig.data.read(INO, size, size - n, n) == piece
            await rig.land_everything()
            assert await rig.cold_read(size) == bytes(expected)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_full_pack_buffers_are_reused_then_released() -> None:
    async def main() -> None:
        rig = Rig(dirty_limit=64 << 20)
        body = os.urandom(48 * CHUNK)  # six full packs of eight chunks
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.up.run)
            size = 0
            for off in range(0, len(body), CHUNK):
                size = await rig.data.write(INO, size, off, body[off : off + CHUNK])
                await trio.sleep(0)  # let uploads start as they would between FUSE requests
            await rig.land_everything()
            full = [b for b in rig.up.buffers if len(b) == FULL_PACK]
            assert len(full) == 6
            distinct = {id(b) for b in full}
            assert len(distinct) < len(full), "no pack buffer was reused"
            assert len(distinct) <= UPLOAD_SLOTS
            # Nothing is filled or uploaded any more: the mount holds no spare buffer.
            assert rig.up.pending == {} and rig.up.open_pack is None
            assert rig.up._free_blobs == []
            assert await rig.cold_read(size) == body
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_short_pack_gets_a_buffer_of_its_own_size() -> None:
    rig = Rig()
    rig.up._free_blobs.append(bytearray(FULL_PACK))
    pack = Pack(layout.random_id(), rig.sealer.keys.current)
    pack.entries.append(((INO, 0), 1, b"x" * 100))
    pack.size = sealed_chunk_len(100)
    blob = rig.up._build_pack(pack)
    assert len(blob) == layout.pack_class(pack.size) < FULL_PACK
    assert len(rig.up._free_blobs) == 1, "the full-size spare stays for a full pack"


def test_streamed_whole_chunks_are_not_kept_clean_once_landed() -> None:
    cache = ChunkCache(32 << 20, 8 << 20)
    whole = os.urandom(CHUNK)
    cache.put_inflight((INO, 0), whole)  # one 1 MiB write
    cache.landed((INO, 0), 1, whole)
    assert cache.get((INO, 0), 1) is None and cache.clean_bytes == 0
    # A chunk that started empty and was filled to its end in pieces: streamed too.
    buf = cache.dirty_buffer((INO, 1), b"")
    buf += os.urandom(CHUNK)
    cache.resized((INO, 1), 0)
    cache.landed((INO, 1), 1, cache.take_dirty((INO, 1)))
    assert cache.get((INO, 1), 1) is None
    # Rewritten from its old content (a working set), or short (a small file): kept.
    old = os.urandom(CHUNK)
    rmw = cache.dirty_buffer((INO, 2), old)
    rmw[10:20] = bytes(10)
    cache.landed((INO, 2), 1, cache.take_dirty((INO, 2)))
    assert cache.get((INO, 2), 1) == rmw
    small = cache.dirty_buffer((INO, 3), b"")
    small += b"tail"
    cache.resized((INO, 3), 0)
    cache.landed((INO, 3), 1, cache.take_dirty((INO, 3)))
    assert cache.get((INO, 3), 1) == b"tail"
    # A whole chunk replaced while in flight: the newer one lands, the old id is forgotten.
    first, second = os.urandom(CHUNK), bytearray(os.urandom(CHUNK))
    cache.put_inflight((INO, 4), first)
    cache.put_inflight((INO, 4), bytes(second))
    assert cache._streamed == {id(cache.inflight[(INO, 4)])}
    cache.forget(INO)
    assert cache._streamed == set() and cache._fresh == set()
