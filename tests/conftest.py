"""Shared pytest setup: fixture modules live in tests/fixtures_*.py and are listed here."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins: list[str] = [
    "tests.fixtures_mount",
    "tests.fixtures_s3",
    "tests.fixtures_servers",
    "tests.fixtures_tls",
    "tests.fixtures_unit",
]


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The sealed disk cache defaults to $XDG_CACHE_HOME: keep every test's in its tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` leaves the tests marked slow to `make stress` (ENCFS_STRESS=1): long
    randomized runs and the end-to-end cases whose ground other tests already cover."""
    if os.environ.get("ENCFS_STRESS"):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
