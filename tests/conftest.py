"""Shared pytest setup: fixture modules live in tests/fixtures_*.py and are listed here."""

pytest_plugins: list[str] = [
    "tests.fixtures_mount",
    "tests.fixtures_s3",
    "tests.fixtures_servers",
    "tests.fixtures_unit",
]
