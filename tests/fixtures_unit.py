"""Fixtures for tests that run the library without FUSE: a fast KDF, a store per backend and
a real Volume run for a test body."""

from __future__ import annotations

import stat
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path

import pytest
import trio

from encfs_cloud.daemon.options import VolumeOptions
from encfs_cloud.daemon.volume import Volume
from encfs_cloud.keys import vault
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.local import LocalStore
from encfs_cloud.store.memory import MemoryStore
from encfs_cloud.tree.metadata import ROOT_INODE
from encfs_cloud.tree.namespace import Namespace


@pytest.fixture
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device keys with a cheap KDF and a fixed machine identity (use with usefixtures)."""
    monkeypatch.setenv("ENCFS_CLOUD_TEST_FAST_KDF", "1")
    monkeypatch.setenv("ENCFS_CLOUD_MACHINE_ID", "test-machine")


@pytest.fixture
def devices(tmp_path: Path) -> DeviceStore:
    """This test's device folder (a module may define its own `devices`)."""
    return DeviceStore(tmp_path / "xdg-data" / "encfs-cloud")


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """A fresh store of each in-process backend (a module may define its own `store`)."""
    s: ObjectStore = (
        MemoryStore() if request.param == "memory" else LocalStore(str(tmp_path / "bucket"))
    )
    yield s
    s.close()


def with_volume(
    store: ObjectStore,
    devices: DeviceStore,
    body: Callable[[Volume], object],
    **options: object,
) -> Volume:
    """Run `body(volume)` (a coroutine function) on a real Volume, then flush and close it."""
    vol = Volume(store, vault.unlock(store, devices, None), devices, VolumeOptions(**options))  # type: ignore[arg-type]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(vol.run)
            await body(vol)  # type: ignore[misc]
            await vol.flush()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        vol.wipe()
    return vol


def file_writer(
    files: dict[bytes, bytes], *, commit_each: bool = False
) -> Callable[[Volume], Coroutine[None, None, None]]:
    """A `with_volume` body that creates each file in the root and writes it whole;
    `commit_each`: flush after every file (a commit per file)."""

    async def body(vol: Volume) -> None:
        ns = Namespace(vol.md)
        for name, data in files.items():
            node = ns.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0)
            node.size = await vol.data.write(node.id, 0, 0, data)
            vol.md.put_inode(node)
            if commit_each:
                await vol.flush()

    return body
