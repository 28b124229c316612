"""salvage: every intact file copied out identically, the damaged ones listed."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

from encfs_cloud import layout
from tests.fixtures_mount import needs_fuse
from tests.test_fsck import (
    BIG,
    Base,
    Fs,
    Opened,
    build_base,
    copy_fs,
    corrupt_chunk,
    flip_byte,
    open_fs,
)

pytestmark = needs_fuse


@pytest.fixture(scope="module")
def salvage_base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return build_base(tmp_path_factory)


@pytest.fixture
def fs(salvage_base: Base, tmp_path: Path) -> Fs:
    return copy_fs(salvage_base, tmp_path)


@pytest.fixture
def opened(fs: Fs) -> Iterator[Opened]:
    with open_fs(fs) as it:
        yield it


def salvage(fs: Fs, dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return fs.device.run("salvage", fs.source, str(dest), *args)


def tree(root: Path, skip: Collection[str] = ()) -> dict[str, tuple[object, ...]]:
    """Everything salvage promises to keep, per relative path (hard links by first name)."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if rel in skip:
                continue
            st = path.lstat()
            first = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else rel
            if stat.S_ISLNK(st.st_mode):
                what: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                what = path.read_bytes()
            else:
                what = None
            mode = None if stat.S_ISLNK(st.st_mode) else st.st_mode
            out[rel] = (mode, st.st_mtime_ns, what, first if first != rel else None)
    return out


def test_intact_filesystem_saved_identically(fs: Fs, tmp_path: Path) -> None:
    done = salvage(fs, tmp_path / "out")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""
    assert tree(tmp_path / "out") == tree(fs.reference)


def test_damaged_file_listed_all_others_saved(fs: Fs, opened: Opened, tmp_path: Path) -> None:
    corrupt_chunk(fs, opened.chunk("docs/report.bin", 2))
    done = salvage(fs, tmp_path / "out")
    assert done.returncode == 32, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["lost: /docs/report.bin: chunk 2 fails authentication"]
    assert tree(tmp_path / "out") == tree(fs.reference, skip={"docs/report.bin"})
    # --partial keeps what is readable, under a name that cannot be mistaken for the file.
    partial = salvage(fs, tmp_path / "partial", "--partial")
    assert partial.returncode == 32
    kept = (tmp_path / "partial" / "docs" / "report.bin.salvage-partial").read_bytes()
    assert kept[: 2 << 20] == BIG[: 2 << 20] and kept[2 << 20 :] != BIG[2 << 20 :]
    assert not (tmp_path / "partial" / "docs" / "report.bin").exists()


def test_damaged_newest_commits_fall_back_to_the_snapshot(fs: Fs, tmp_path: Path) -> None:
    first = fs.base.first_session_head
    second = [p for p in (fs.bucket / "meta").iterdir() if int(p.name, 16) > first]
    assert second, "the second session should have written delta commits"
    for commit in second:
        flip_byte(commit, 200)
    done = salvage(fs, tmp_path / "out")
    assert done.returncode == 32, done.stdout + done.stderr
    assert f"salvaged the state of commit {first}" in done.stderr
    assert done.stdout.startswith("lost: (newest changes): changes after metadata commit")
    # The first session's files are all there; the second session's late.txt is not.
    assert tree(tmp_path / "out") == tree(fs.reference, skip={"late.txt"})


def test_missing_data_object(fs: Fs, opened: Opened, tmp_path: Path) -> None:
    ref = opened.chunk("private.key")
    (fs.bucket / layout.pack_name(ref.pack)).unlink()
    done = salvage(fs, tmp_path / "out")
    assert done.returncode == 32
    assert "lost: /private.key: chunk 0 is in a data object that is missing" in done.stdout
