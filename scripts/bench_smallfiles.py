"""Cold read of many small files over the memory store, with and without the disk cache.

    .venv/bin/python scripts/bench_smallfiles.py --files 3000 [--profile]

Writes the files once, then for each case mounts a fresh Volume (an empty disk cache, or
none) and reads every file in directory order; prints the read's wall time per case.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import stat
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from encfs_cloud.daemon.options import VolumeOptions
from encfs_cloud.daemon.volume import Volume
from encfs_cloud.keys import vault
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.store.memory import MemoryStore
from encfs_cloud.tree.metadata import ROOT_INODE
from encfs_cloud.tree.namespace import Namespace


def run_volume(
    store: MemoryStore,
    devices: DeviceStore,
    body: Callable[[Volume], Awaitable[None]],
    **opts: object,
) -> None:
    """Run `body(volume)` on a real Volume, flush and close it."""
    vol = Volume(store, vault.unlock(store, devices, None), devices, VolumeOptions(**opts))  # type: ignore[arg-type]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(vol.run)
            await body(vol)
            await vol.flush()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        vol.wipe()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=3000)
    p.add_argument("--profile", action="store_true", help="cProfile the disk-cache read")
    args = p.parse_args(argv)
    os.environ.setdefault("ENCFS_CLOUD_TEST_FAST_KDF", "1")
    os.environ.setdefault("ENCFS_CLOUD_MACHINE_ID", "bench-machine")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(root / "cache-home")
        devices = DeviceStore(root / "data" / "encfs-cloud")
        store = MemoryStore()
        vault.init_filesystem(store, devices, None, "bench")
        files = {f"f{n:05d}".encode(): os.urandom(500 + (n * 37) % 3500) for n in range(args.files)}

        async def write(vol: Volume) -> None:
            ns = Namespace(vol.md)
            for name, data in files.items():
                node = ns.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0)
                node.size = await vol.data.write(node.id, 0, 0, data)
                vol.md.put_inode(node)

        run_volume(store, devices, write, disk_cache_size=0)
        for label, opts in (
            ("no disk cache", {"disk_cache_size": 0}),
            ("disk cache", {"cache_dir": root / "cold-1"}),
            ("disk cache", {"cache_dir": root / "cold-2"}),
            ("no disk cache", {"disk_cache_size": 0}),
        ):
            took: list[float] = []

            async def read(vol: Volume, took: list[float] = took) -> None:
                start = time.perf_counter()
                for _, name, node in vol.md.list_entries(ROOT_INODE, 0):
                    got = await vol.data.read(node.id, node.size, 0, node.size)
                    assert got == files[name]
                took.append(time.perf_counter() - start)

            prof = cProfile.Profile() if args.profile and "cache_dir" in opts else None
            if prof:
                prof.enable()
            run_volume(store, devices, read, **opts)
            if prof:
                prof.disable()
                pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(30)
            print(f"{label:14s} {args.files} files cold, directory order: {took[0]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
