"""Shared pytest setup: fixture modules live in tests/fixtures_*.py and are listed here."""

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
