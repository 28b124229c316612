"""Fixtures for tests that run the library without FUSE: a fast KDF and a store per backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.local import LocalStore
from encfs_cloud.store.memory import MemoryStore


@pytest.fixture
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device keys with a cheap KDF and a fixed machine identity (use with usefixtures)."""
    monkeypatch.setenv("ENCFS_CLOUD_TEST_FAST_KDF", "1")
    monkeypatch.setenv("ENCFS_CLOUD_MACHINE_ID", "test-machine")


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """A fresh store of each in-process backend (a module may define its own `store`)."""
    s: ObjectStore = (
        MemoryStore() if request.param == "memory" else LocalStore(str(tmp_path / "bucket"))
    )
    yield s
    s.close()
