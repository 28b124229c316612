"""POSIX behaviour of a real mount, step by step against a local directory (ext4 or tmpfs)."""

from __future__ import annotations

import errno
import mmap
import os
import random
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_mount import needs_fuse
from tests.posix_ops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    MountedFs,
    R,
    Twin,
    identities,
    renameat2,
    shared_mount,
    write,
)

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedFs]:
    with shared_mount(tmp_path_factory.mktemp("posix")) as mounted:
        yield mounted


@pytest.fixture
def twin(fs: MountedFs, tmp_path: Path, request: pytest.FixtureRequest) -> Twin:
    return fs.twin(request.node.name, tmp_path / "ref")


def test_files_and_directories(twin: Twin) -> None:
    twin.do(lambda r: write(r / "f", b"hello", 0o640), "create 0640")
    twin.do(lambda r: (r / "f").read_bytes(), "read")
    twin.fails(lambda r: os.open(r / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY), errno.EEXIST)
    twin.do(lambda r: os.makedirs(r / "a" / "b" / "c", mode=0o750), "makedirs")
    twin.fails(lambda r: os.mkdir(r / "a"), errno.EEXIST, "mkdir existing")
    twin.fails(lambda r: os.rmdir(r / "a"), errno.ENOTEMPTY, "rmdir non-empty")
    twin.fails(lambda r: os.rmdir(r / "f"), errno.ENOTDIR, "rmdir a file")
    twin.fails(lambda r: os.unlink(r / "a"), errno.EISDIR, "unlink a directory")
    twin.fails(lambda r: os.open(r / "nope", os.O_RDONLY), errno.ENOENT, "open missing")
    twin.fails(lambda r: os.open(r / "a", os.O_WRONLY), errno.EISDIR, "open dir for writing")
    twin.fails(lambda r: os.stat(r / "f" / "x"), errno.ENOTDIR, "path through a file")
    twin.fails(lambda r: os.mkdir(r / "nope" / "x"), errno.ENOENT, "mkdir in missing dir")
    twin.do(lambda r: sorted(os.listdir(r)), "listdir")
    twin.do(lambda r: os.rmdir(r / "a" / "b" / "c"), "rmdir")
    twin.do(lambda r: os.unlink(r / "f"), "unlink")
    twin.fails(lambda r: os.unlink(r / "f"), errno.ENOENT, "unlink twice")
    twin.same_tree()


def test_directory_nlink_counts_subdirectories(twin: Twin) -> None:
    twin.do(lambda r: [os.mkdir(r / d) for d in ("p", "p/s1", "p/s2", "q")])
    twin.do(lambda r: write(r / "p" / "file", b""), "a file adds no link")
    assert twin.stat("p")["nlink"] == 4
    twin.do(lambda r: os.rename(r / "p" / "s1", r / "q" / "s1"), "move a subdir")
    assert (twin.stat("p")["nlink"], twin.stat("q")["nlink"]) == (3, 3)
    twin.do(lambda r: os.rmdir(r / "p" / "s2"))
    assert twin.stat("p")["nlink"] == 2
    assert twin.stat(".")["nlink"] == 4


def test_symlinks(twin: Twin) -> None:
    twin.do(lambda r: os.mkdir(r / "dir"))
    twin.do(lambda r: write(r / "dir" / "f", b"through the link"))
    twin.do(lambda r: os.symlink("dir", r / "to-dir"))
    twin.do(lambda r: os.symlink("dir/f", r / "to-file"))
    twin.do(lambda r: os.symlink("../" * 40 + "no/such/target", r / "dangling"))
    assert twin.do(lambda r: os.readlink(r / "to-file")) == "dir/f"
    assert stat.S_ISLNK(twin.stat("to-file")["type"])
    assert twin.stat("dangling")["size"] == len("../" * 40 + "no/such/target")
    twin.do(lambda r: (r / "to-file").read_bytes(), "read through")
    twin.do(lambda r: sorted(os.listdir(r / "to-dir")), "list through")
    twin.fails(lambda r: os.stat(r / "dangling"), errno.ENOENT, "stat dangling")
    twin.fails(lambda r: os.readlink(r / "dir" / "f"), errno.EINVAL, "readlink a file")
    twin.fails(lambda r: os.symlink("x", r / "to-dir"), errno.EEXIST, "symlink over a name")
    twin.do(lambda r: os.unlink(r / "to-dir"), "unlink a link to a dir")
    twin.same_tree()


def test_hard_links(twin: Twin) -> None:
    twin.do(lambda r: os.mkdir(r / "d"))
    twin.do(lambda r: write(r / "a", b"shared"))
    twin.do(lambda r: os.link(r / "a", r / "d" / "b"))
    assert twin.stat("a")["nlink"] == twin.stat("d/b")["nlink"] == 2
    twin.do(lambda r: os.stat(r / "a").st_ino == os.stat(r / "d" / "b").st_ino, "same inode")
    twin.do(lambda r: write(r / "d" / "b", b"changed through b"))
    twin.do(lambda r: (r / "a").read_bytes(), "read the change through a")
    twin.fails(lambda r: os.link(r / "d", r / "d2"), errno.EPERM, "link a directory")
    twin.fails(lambda r: os.link(r / "a", r / "d" / "b"), errno.EEXIST, "link over a name")
    twin.do(lambda r: os.rename(r / "a", r / "d" / "b"), "rename onto its own other name")
    assert twin.stat("a")["nlink"] == 2
    twin.do(lambda r: os.unlink(r / "a"))
    assert twin.stat("d/b")["nlink"] == 1
    twin.same_tree()


def test_rename_rules(twin: Twin) -> None:
    twin.do(lambda r: [os.mkdir(r / d) for d in ("d1", "d2", "d1/sub", "empty", "full")])
    twin.do(lambda r: [write(r / f, f.encode()) for f in ("f1", "f2", "full/x")])
    twin.do(lambda r: os.rename(r / "f1", r / "f2"), "file over file")
    twin.do(lambda r: os.rename(r / "d2", r / "empty"), "dir over empty dir")
    twin.fails(lambda r: os.rename(r / "d1", r / "full"), errno.ENOTEMPTY, "dir over non-empty")
    twin.fails(lambda r: os.rename(r / "f2", r / "full"), errno.EISDIR, "file over dir")
    twin.fails(lambda r: os.rename(r / "d1", r / "f2"), errno.ENOTDIR, "dir over file")
    twin.fails(lambda r: os.rename(r / "d1", r / "d1" / "sub" / "in"), errno.EINVAL, "into self")
    twin.fails(lambda r: os.rename(r / "nope", r / "x"), errno.ENOENT, "missing source")
    twin.refuses(errno.EEXIST, renameat2, R("f2"), R("full/x"), RENAME_NOREPLACE)
    twin.do(lambda r: renameat2(r / "f2", r / "f3", RENAME_NOREPLACE), "RENAME_NOREPLACE free")
    twin.do(lambda r: renameat2(r / "f3", r / "d1" / "sub", RENAME_EXCHANGE), "exchange f/dir")
    assert twin.stat("d1")["nlink"] == 2 and twin.stat(".")["nlink"] == 6
    assert stat.S_ISDIR(twin.stat("f3")["type"])
    twin.refuses(errno.ENOENT, renameat2, R("f3"), R("absent"), RENAME_EXCHANGE)
    twin.refuses(errno.EINVAL, renameat2, R("d1"), R("d1/sub"), RENAME_EXCHANGE)
    twin.same_tree()


def test_rename_directory_of_1000_files(twin: Twin, fs: MountedFs) -> None:
    def populate(root: Path) -> None:
        (root / "big").mkdir()
        for i in range(1000):
            (root / "big" / f"file-{i:04d}").write_bytes(b"%d" % i)

    twin.do(populate, "1,000 files")
    twin.do(lambda r: os.mkdir(r / "elsewhere"))
    twin.do(lambda r: os.rename(r / "big", r / "elsewhere" / "moved"), "rename the directory")
    listing = twin.do(lambda r: sorted(os.listdir(r / "elsewhere" / "moved")), "listing")
    assert len(listing) == 1000
    twin.do(lambda r: [(r / "elsewhere/moved" / n).read_bytes() for n in listing], "contents")
    twin.fails(lambda r: os.stat(r / "big"), errno.ENOENT, "old name is gone")


def test_unlink_and_rmdir_of_open_files(twin: Twin) -> None:
    f = twin.open("f", os.O_RDWR | os.O_CREAT)
    try:
        f.do(lambda fd: os.write(fd, b"before unlink"))
        twin.do(lambda r: os.unlink(r / "f"))
        assert f.do(lambda fd: os.fstat(fd).st_nlink) == 0
        f.do(lambda fd: os.pwrite(fd, b"after", 20), "write after unlink")
        f.do(lambda fd: os.pread(fd, 100, 0), "read after unlink")
        f.do(lambda fd: os.ftruncate(fd, 8))
        f.do(lambda fd: (os.fstat(fd).st_size, os.pread(fd, 100, 0)))
    finally:
        f.close()
    twin.do(lambda r: os.listdir(r), "nothing left")
    twin.do(lambda r: write(r / "victim", b"replaced but open"))
    v = twin.open("victim", os.O_RDONLY)
    try:
        twin.do(lambda r: write(r / "new", b"new"))
        twin.do(lambda r: os.rename(r / "new", r / "victim"), "rename over an open file")
        v.do(lambda fd: os.pread(fd, 100, 0), "the replaced file still reads")
    finally:
        v.close()
    twin.do(lambda r: os.mkdir(r / "gone"))
    d = twin.open("gone", os.O_RDONLY | os.O_DIRECTORY)
    try:
        twin.do(lambda r: os.rmdir(r / "gone"))
        d.do(lambda fd: os.fstat(fd).st_nlink, "fstat of a removed directory")
        d.do(lambda fd: os.open("x", os.O_CREAT | os.O_WRONLY, dir_fd=fd), "create in it")
    finally:
        d.close()
    twin.same_tree()


def test_truncate_up_and_down_and_sparse_writes(twin: Twin) -> None:
    pattern = bytes(range(251)) * 12_000  # ~2.9 MiB, no repeat at chunk boundaries
    twin.do(lambda r: write(r / "f", pattern))
    for size in (3 * MiB + 17, MiB + 5, MiB, 4095, 0, 2 * MiB + 100, 10):
        twin.do(lambda r, size=size: os.truncate(r / "f", size), f"truncate {size}")
        twin.do(lambda r: (r / "f").read_bytes(), f"content after truncate {size}")
    f = twin.open("f", os.O_RDWR)
    try:
        f.do(lambda fd: os.pwrite(fd, b"far", 7 * MiB + 12345), "write far past EOF")
        f.do(lambda fd: os.pwrite(fd, b"mid", 3 * MiB - 1), "write in the hole")
        f.do(lambda fd: os.fstat(fd).st_size)
        f.do(lambda fd: os.pread(fd, 64, 5 * MiB), "a hole reads as zeros")
        f.do(lambda fd: os.ftruncate(fd, 3 * MiB + 1), "shrink into the hole")
        f.do(lambda fd: os.ftruncate(fd, 8 * MiB), "grow again")
    finally:
        f.close()
    twin.same_tree()


def test_random_writes(twin: Twin) -> None:
    rng = random.Random(20240601)
    f = twin.open("r", os.O_RDWR | os.O_CREAT)
    try:
        for step in range(150):
            off = rng.randrange(0, 3 * MiB)
            data = rng.randbytes(rng.choice((1, 7, 4096, 5000, 70_000, 300_000)))
            f.do(lambda fd, off=off, data=data: os.pwrite(fd, data, off), f"write {step}")
            if step % 25 == 24:
                size = rng.randrange(0, 3 * MiB)
                f.do(lambda fd, size=size: os.ftruncate(fd, size), f"truncate {size}")
            if step % 10 == 9:
                off = rng.randrange(0, 3 * MiB)
                f.do(lambda fd, off=off: os.pread(fd, 200_000, off), f"read at {off}")
    finally:
        f.close()
    twin.same_tree()


def test_o_append(twin: Twin) -> None:
    twin.do(lambda r: write(r / "log", b"start\n"))
    f = twin.open("log", os.O_WRONLY | os.O_APPEND)
    try:
        f.do(lambda fd: os.write(fd, b"one\n"))
        f.do(lambda fd: os.lseek(fd, 0, os.SEEK_SET))
        f.do(lambda fd: os.write(fd, b"two\n"), "O_APPEND ignores the offset")
    finally:
        f.close()
    twin.do(lambda r: (r / "log").read_bytes())


def test_shared_mmap(twin: Twin) -> None:
    twin.do(lambda r: write(r / "m", b"\0" * (2 * MiB + 100)))
    f = twin.open("m", os.O_RDWR)
    try:

        def poke(fd: int) -> bytes:
            with mmap.mmap(fd, 2 * MiB + 100) as m:
                m[10:15] = b"hello"
                m[MiB - 2 : MiB + 3] = b"acros"  # spans a chunk boundary
                m[2 * MiB + 90 :] = b"tail-bytes"
                m.flush()
                return m[:20]

        f.do(poke, "write through mmap")
    finally:
        f.close()
    twin.do(lambda r: (r / "m").read_bytes(), "reread")


def test_chmod_chown_utimens(twin: Twin) -> None:
    twin.do(lambda r: write(r / "f", b"x"))
    twin.do(lambda r: os.mkdir(r / "d"))
    for mode in (0o4755, 0o2711, 0o1777, 0o000, 0o640):
        twin.do(lambda r, mode=mode: os.chmod(r / "f", mode), f"chmod {mode:o}")
        twin.stat("f")
    twin.do(lambda r: os.chown(r / "f", 1234, 5678), "chown")
    twin.do(lambda r: os.chmod(r / "f", 0o6755))
    twin.do(lambda r: os.chown(r / "f", 4321, -1), "chown clears set-id bits")
    assert twin.stat("f")["mode"] == 0o755
    ns = (1_234_567_890_123_456_789, 987_654_321_987_654_321)
    twin.do(lambda r: os.utime(r / "f", ns=ns), "utimens")
    twin.do(lambda r: (os.stat(r / "f").st_atime_ns, os.stat(r / "f").st_mtime_ns), "exact ns")
    twin.do(lambda r: os.utime(r / "d", ns=(5, 7)))
    twin.do(lambda r: (os.stat(r / "d").st_atime_ns, os.stat(r / "d").st_mtime_ns))
    # A set-group-id directory hands its group and the bit itself down.
    twin.do(lambda r: (os.chown(r / "d", 0, 4242), os.chmod(r / "d", 0o2775)))
    twin.do(lambda r: (write(r / "d" / "inherits", b""), os.mkdir(r / "d" / "sub")))
    twin.stat("d/inherits")
    twin.stat("d/sub")
    twin.same_tree()


def test_timestamp_rules(twin: Twin) -> None:
    twin.do(lambda r: [os.mkdir(r / d) for d in ("A", "C", "A/B")])
    twin.do(lambda r: write(r / "A" / "f", b"data"))

    def pwrite(root: Path) -> None:
        fd = os.open(root / "A" / "f", os.O_WRONLY)
        os.pwrite(fd, b"Q", 1)
        os.close(fd)

    assert twin.stamps(pwrite, ["A/f"], what="write") == {"A/f": (True, True)}
    assert twin.stamps(lambda r: os.chmod(r / "A/f", 0o600), ["A/f"]) == {"A/f": (False, True)}
    assert twin.stamps(lambda r: os.chown(r / "A/f", 7, 7), ["A/f"]) == {"A/f": (False, True)}
    twin.stamps(lambda r: os.setxattr(r / "A/f", "user.k", b"v"), ["A/f"], what="setxattr")
    twin.stamps(lambda r: (r / "A/f").read_bytes(), ["A/f"], what="read")
    twin.stamps(lambda r: os.truncate(r / "A/f", 1), ["A/f"], what="truncate")
    twin.stamps(lambda r: open(r / "A/f", "w").close(), ["A/f"], what="O_TRUNC")
    moved = twin.stamps(
        lambda r: os.rename(r / "A/f", r / "C/f"), ["A/f", "A", "C"], ["C/f", "A", "C"], "rename"
    )
    assert moved == {"C/f": (False, True), "A": (True, True), "C": (True, True)}
    twin.stamps(
        lambda r: os.rename(r / "A/B", r / "C/B"), ["A/B", "A", "C"], ["C/B", "A", "C"], "mv dir"
    )
    twin.stamps(lambda r: os.link(r / "C/f", r / "A/g"), ["C/f", "A", "C"], what="link")
    twin.stamps(lambda r: os.unlink(r / "A/g"), ["C/f", "A"], what="unlink")
    twin.stamps(lambda r: os.mkdir(r / "A/n"), ["A"], what="mkdir")
    twin.stamps(lambda r: os.symlink("t", r / "A/s"), ["A"], what="symlink")
    twin.stamps(lambda r: os.rmdir(r / "A/n"), ["A"], what="rmdir")


def test_blocks_statfs_access(twin: Twin, fs: MountedFs) -> None:
    for size in (1, 4096, 4097, 3 * MiB + 1):
        twin.do(lambda r, size=size: write(r / f"f{size}", b"z" * size))
        st = os.stat(twin.mine / f"f{size}")
        assert st.st_blocks * 512 >= size, f"st_blocks {st.st_blocks} too small for {size}"
        assert st.st_blksize > 0
    vfs = os.statvfs(fs.mnt)
    assert vfs.f_namemax == 255 and vfs.f_bsize > 0 and vfs.f_frsize > 0
    assert 0 < vfs.f_bavail <= vfs.f_bfree <= vfs.f_blocks
    assert 0 < vfs.f_favail <= vfs.f_files
    # A sparse file larger than ext4 allows (so the mount alone): df must still answer.
    os.truncate(twin.mine / "f1", 1 << 52)
    vfs = os.statvfs(fs.mnt)
    assert vfs.f_blocks * vfs.f_frsize >= 1 << 52 and 0 < vfs.f_bavail <= vfs.f_blocks
    os.truncate(twin.mine / "f1", 1)
    twin.do(lambda r: os.chmod(r / "f1", 0o644))
    twin.do(lambda r: write(r / "exe", b"#!/bin/sh\n", 0o755))
    for rel in ("f1", "exe", "missing"):
        for how in (os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK):
            twin.do(lambda r, rel=rel, how=how: os.access(r / rel, how), f"access {rel} {how}")


def test_blocks_count_what_was_written_not_holes(twin: Twin, fs: MountedFs) -> None:
    """st_blocks comes from the chunks stored: `du` of a sparse file shows its real usage.

    Allocation granularity differs (4 KiB blocks on ext4, up to a 1 MiB chunk here), so the
    sides are compared by property: a hole counts nothing, written data is always covered.
    """
    gib = 1 << 30

    def blocks(rel: str) -> dict[str, int]:
        return {
            side: os.stat(root / rel).st_blocks * 512
            for side, root in zip("ml", twin.roots, strict=True)
        }

    twin.do(lambda r: (write(r / "sparse", b""), os.truncate(r / "sparse", gib)))
    assert blocks("sparse") == {"m": 0, "l": 0}, "a file of holes takes no space"
    f = twin.open("sparse", os.O_RDWR)
    try:
        f.do(lambda fd: os.pwrite(fd, b"x" * 4096, 512 * MiB + 8192), "one 4 KiB write")
        f.do(os.fsync)
    finally:
        f.close()
    for side, used in blocks("sparse").items():
        assert 4096 <= used < 2 * MiB, f"{side}: 1 GiB file with one 4 KiB write uses {used}"
    for size in (1, 4096, 4097, 3 * MiB + 1):
        twin.do(lambda r, size=size: write(r / f"dense{size}", b"d" * size))
        for side, used in blocks(f"dense{size}").items():
            assert size <= used < size + 2 * MiB, f"{side}: {size} bytes written, {used} used"

    def du(*args: str) -> list[int]:
        return [
            int(
                subprocess.check_output(["du", "-B1", *args, root / "sparse"], text=True).split()[0]
            )
            for root in twin.roots
        ]

    assert du("--apparent-size") == [gib, gib]
    assert all(used < 2 * MiB for used in du()), f"du says {du()}"
    before = blocks("sparse")["m"], blocks("dense4097")["m"]
    fs.remount()  # now every chunk comes from the replayed metadata, none from the cache
    assert (blocks("sparse")["m"], blocks("dense4097")["m"]) == before
    twin.do(lambda r: os.truncate(r / "sparse", 512 * MiB), "truncate below the data")
    assert blocks("sparse") == {"m": 0, "l": 0}


def test_xattrs(twin: Twin) -> None:
    twin.do(lambda r: write(r / "f", b""))
    twin.do(lambda r: os.mkdir(r / "d"))
    twin.do(lambda r: os.symlink("f", r / "s"))
    for p in (R("f"), R("d")):
        twin.call(os.setxattr, p, "user.one", b"1")
        twin.call(os.setxattr, p, "user.bin", bytes(range(256)))
        twin.call(os.setxattr, p, "user.empty", b"")
        twin.do(lambda r, p=p: sorted(os.listxattr(r / p)), "listxattr")
        twin.call(os.getxattr, p, "user.bin")
        twin.refuses(errno.EEXIST, os.setxattr, p, "user.one", b"x", os.XATTR_CREATE)
        twin.refuses(errno.ENODATA, os.setxattr, p, "user.two", b"x", os.XATTR_REPLACE)
        twin.call(os.setxattr, p, "user.one", b"11", os.XATTR_REPLACE)
        twin.call(os.setxattr, p, "user.two", b"2", os.XATTR_CREATE)
        twin.call(os.removexattr, p, "user.one")
        twin.refuses(errno.ENODATA, os.removexattr, p, "user.one")
        twin.refuses(errno.ENODATA, os.getxattr, p, "user.nope")
    twin.refuses(errno.EPERM, os.setxattr, R("s"), "user.x", b"1", follow_symlinks=False)
    twin.same_tree()


def test_fifo_fsync_and_name_lengths(twin: Twin) -> None:
    twin.do(lambda r: os.mkfifo(r / "pipe", 0o620))
    assert stat.S_ISFIFO(twin.stat("pipe")["type"])

    def through_fifo(root: Path) -> bytes:
        reader = os.open(root / "pipe", os.O_RDONLY | os.O_NONBLOCK)
        writer = os.open(root / "pipe", os.O_WRONLY)
        os.write(writer, b"via fifo")
        os.close(writer)
        data = os.read(reader, 100)
        os.close(reader)
        return data

    twin.do(through_fifo, "a fifo on the mount is a real pipe")
    f = twin.open("synced", os.O_RDWR | os.O_CREAT)
    try:
        f.do(lambda fd: os.write(fd, b"durable"))
        assert f.do(os.fsync, "fsync") is None
        assert f.do(os.fdatasync, "fdatasync") is None
    finally:
        f.close()
    long_name = "n" * 255
    twin.do(lambda r: write(r / long_name, b"255"), "a 255-byte name")
    twin.do(lambda r: os.mkdir(r / ("é" * 127)), "254 bytes of utf-8")
    twin.fails(lambda r: write(r / (long_name + "x"), b""), errno.ENAMETOOLONG, "256 bytes")
    twin.fails(lambda r: os.mkdir(r / ("é" * 128)), errno.ENAMETOOLONG, "256 bytes of utf-8")
    twin.fails(lambda r: os.rename(r / long_name, r / ("m" * 256)), errno.ENAMETOOLONG)
    twin.same_tree()


def test_large_file_at_unaligned_offsets(twin: Twin) -> None:
    rng = random.Random(7)
    blob = rng.randbytes(5 * MiB + 333_333)
    f = twin.open("big", os.O_RDWR | os.O_CREAT)
    try:
        pos = 0
        while pos < len(blob):
            step = rng.choice((99_991, 131_071, 1_048_573))
            f.do(lambda fd, pos=pos, step=step: os.pwrite(fd, blob[pos : pos + step], pos))
            pos += step
        for off in (0, MiB - 1, MiB, 2 * MiB - 7, 3 * MiB + 12345, len(blob) - 10, len(blob) + 5):
            got = f.do(lambda fd, off=off: os.pread(fd, MiB + 3, off), f"read at {off}")
            assert got == blob[off : off + MiB + 3]
    finally:
        f.close()
    twin.same_tree()


def test_everything_survives_remount(twin: Twin, fs: MountedFs) -> None:
    twin.do(lambda r: [os.makedirs(r / d) for d in ("a/b/c", "x")])
    twin.do(lambda r: write(r / "a" / "file", bytes(range(256)) * 9000))
    twin.do(lambda r: os.link(r / "a" / "file", r / "x" / "hard"))
    twin.do(lambda r: os.symlink("../a/file", r / "x" / "soft"))
    twin.do(lambda r: os.setxattr(r / "a", "user.kept", b"yes"))
    twin.do(lambda r: os.mkfifo(r / "x" / "fifo"))
    twin.do(lambda r: write(r / "m", b"\0" * 8192))

    def mmap_write(root: Path) -> None:
        fd = os.open(root / "m", os.O_RDWR)
        with mmap.mmap(fd, 8192) as m:
            m[100:110] = b"mapped-in!"
            m.flush()
        os.close(fd)

    twin.do(mmap_write)
    # Overwriting with shorter content goes through open(O_TRUNC), which the kernel hands to
    # the filesystem (atomic O_TRUNC) and then trusts its own cached size of 0.
    twin.do(lambda r: write(r / "rewritten", b"a long first version " * 1000))
    twin.do(lambda r: (r / "rewritten").write_bytes(b"short"))
    twin.do(lambda r: write(r / "emptied", b"soon gone" * 100_000))
    twin.do(lambda r: open(r / "emptied", "wb").close())

    def quick_changes(root: Path) -> None:
        # Back-to-back changes inside one tick of the kernel's coarse clock: the times the
        # kernel shows now must be the ones the filesystem stores (a remount shows those).
        (root / "quick").mkdir()
        for i in range(12):
            path = root / "quick" / str(i)
            write(path, b"first version, longer")
            write(path, b"second")
            fd = os.open(path, os.O_RDWR)
            os.pwrite(fd, b"2", 0)
            os.ftruncate(fd, 3 + i)
            os.close(fd)
            os.chmod(path, 0o600)

    twin.do(quick_changes)
    twin.call(os.utime, R("x/hard"), ns=(111_222_333_444_555_666, 1_600_000_000_000_000_001))
    before, tree = identities(twin.mine), twin.same_tree()
    fs.remount()
    assert identities(twin.mine) == before, "inode numbers or times changed across a remount"
    assert os.lstat(twin.mine / "x/hard").st_atime_ns == 111_222_333_444_555_666
    assert twin.same_tree() == tree
    assert (twin.mine / "m").read_bytes()[100:110] == b"mapped-in!"
    assert (twin.mine / "rewritten").read_bytes() == b"short"
    assert os.stat(twin.mine / "emptied").st_size == 0


def test_zz_every_tree_above_survives_remount(fs: MountedFs) -> None:
    """The kernel caches attributes for 30 s, so a wrong answer from the filesystem could hide
    behind it; after a remount everything comes from the replayed metadata."""
    assert fs.twins, "run with the rest of the module"
    before = [(twin.same_tree(), identities(twin.mine)) for twin in fs.twins]
    fs.remount()
    after = [(twin.same_tree(), identities(twin.mine)) for twin in fs.twins]
    for twin, old, new in zip(fs.twins, before, after, strict=True):
        assert new == old, f"{twin.mine.name} changed across a remount"


def test_a_missing_selinux_label_is_unsupported_not_absent(fs: MountedFs, tmp_path: Path) -> None:
    """ENOTSUP makes ls -l (and cp, tar) stop asking for the rest of the filesystem, where
    ENODATA cost a FUSE request per file listed; a label that was set is kept and returned."""
    folder = fs.mnt / tmp_path.name
    folder.mkdir()
    plain, labelled = folder / "plain", folder / "labelled"
    plain.write_bytes(b"")
    labelled.write_bytes(b"")
    with pytest.raises(OSError) as refused:
        os.getxattr(plain, "security.selinux", follow_symlinks=False)
    assert refused.value.errno == errno.EOPNOTSUPP
    label = b"system_u:object_r:user_home_t:s0\0"
    os.setxattr(labelled, "security.selinux", label)
    assert os.getxattr(labelled, "security.selinux") == label
    assert "security.selinux" in os.listxattr(labelled)
    listed = subprocess.run(
        ["strace", "-f", "-e", "trace=lgetxattr", "ls", "-l", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    asked = listed.stderr.count('"security.selinux"')
    assert asked == 1, listed.stderr  # the first file answers for the whole filesystem
