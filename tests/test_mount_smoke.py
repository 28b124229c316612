"""The shortest end-to-end path: init, mount, write, unmount, mount again, read."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures_mount import Device, needs_fuse


@needs_fuse
def test_roundtrip_survives_remount(device: Device, any_source: str, tmp_path: Path) -> None:
    device.init(any_source)
    payload = bytes(range(256)) * 8000  # ~2 MiB: spans chunks
    with device.mounted(any_source, tmp_path / "mnt") as mnt:
        (mnt / "dir").mkdir()
        (mnt / "dir" / "file.bin").write_bytes(payload)
        (mnt / "small.txt").write_text("hello")
    with device.mounted(any_source, tmp_path / "mnt") as mnt:
        assert (mnt / "dir" / "file.bin").read_bytes() == payload
        assert (mnt / "small.txt").read_text() == "hello"
        assert sorted(p.name for p in mnt.iterdir()) == ["dir", "small.txt"]
