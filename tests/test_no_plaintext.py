"""Known names, contents, xattrs and link targets never reach the bucket, the device or /tmp."""

from __future__ import annotations

import getpass
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs_cloud import layout
from tests.fixtures_mount import Device, needs_fuse
from tests.fixtures_s3 import MotoServer

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20
SCAN_LIMIT = 256 * MiB  # files in /tmp larger than this (other jobs' benchmarks) are skipped


def bucket_objects(source: str, server: MotoServer | None = None) -> dict[str, bytes]:
    """Every object of a file:// or s3:// source (hidden files too), name → body."""
    if source.startswith("file://"):
        root = Path(source[len("file://") :])
        return {
            str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }
    assert server is not None, "an s3:// source needs the server"
    bucket, _, prefix = source[len("s3://") :].partition("/")
    client = server.client()
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def server_for(source: str, request: pytest.FixtureRequest) -> MotoServer | None:
    if source.startswith("s3://"):
        server: MotoServer = request.getfixturevalue("s3_server")
        return server
    return None


class Secrets:
    """Distinctive strings, made at run time so no file holds them before the test writes."""

    def __init__(self) -> None:
        tag = secrets.token_hex(6)
        self.words = {
            kind: f"{kind}-zebra-quokka-{tag}"
            for kind in ("dirname", "filename", "content", "xattrname", "xattrvalue", "target")
        }
        self.words["unicode"] = f"naïve-Ünïcødé-名前-{tag}"
        needles = set()
        for word in self.words.values():
            for codec in ("utf-8", "utf-16-le", "utf-16-be"):
                needles.add(word.encode(codec))
        self.longest = max(len(n) for n in needles)
        self.pattern = re.compile(b"|".join(re.escape(n) for n in sorted(needles)))

    def __getitem__(self, kind: str) -> str:
        return self.words[kind]

    def found_in(self, blob: bytes) -> list[bytes]:
        return sorted({m.group() for m in self.pattern.finditer(blob)})


def scan_file(path: Path, s: Secrets) -> list[bytes]:
    """Stream a file through the pattern, overlapping reads so no match is split."""
    keep = s.longest
    found: set[bytes] = set()
    tail = b""
    try:
        with open(path, "rb") as f:
            while block := f.read(8 * MiB):
                found.update(s.found_in(tail + block))
                tail = block[-keep:]
    except OSError:
        return []  # vanished, or a socket/fifo: nothing stored
    return sorted(found)


def files_under(top: Path, since: float, skip: set[Path]) -> Iterator[Path]:
    """Regular files below `top` on its own device, changed since `since`; mounts skipped."""
    top_dev = os.stat(top).st_dev
    pending = [str(top)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue  # gone, or not ours to read
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != top_dev:  # another mount (FUSE, tmpfs): not the disk under /tmp
                continue
            if stat.S_ISDIR(st.st_mode):
                if Path(entry.path) not in skip:
                    pending.append(entry.path)
            elif (
                stat.S_ISREG(st.st_mode)
                and max(st.st_mtime, st.st_ctime) >= since
                and st.st_size <= SCAN_LIMIT
            ):
                yield Path(entry.path)


def other_sessions(factory: pytest.TempPathFactory) -> set[Path]:
    """Other pytest runs' folders: their files are theirs, and scanning them costs seconds."""
    mine = factory.getbasetemp().resolve()
    parent = mine.parent
    if not parent.name.startswith("pytest-of-"):
        parent = Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}"
    try:
        return {p for p in parent.iterdir() if p.resolve() != mine}
    except OSError:
        return set()


def fill(mnt: Path, s: Secrets) -> None:
    """Every place a user's plaintext can go: names, data, xattrs, link targets."""
    top = mnt / s["dirname"]
    (top / s["unicode"]).mkdir(parents=True)
    (top / s["filename"]).write_text(s["content"])
    (top / s["unicode"] / "small").write_text(s["content"] * 3 + s["unicode"])
    (top / "big").write_bytes((s["content"] + "\n").encode() * (3 * MiB // 40))
    (top / "utf16").write_bytes(s["content"].encode("utf-16-le") * 10)
    os.setxattr(top / s["filename"], "user." + s["xattrname"], s["xattrvalue"].encode())
    os.symlink(s["target"], top / "link")
    fd = os.open(top / s["filename"], os.O_RDONLY)
    try:
        os.fsync(fd)  # a commit while mounted, not only at unmount
    finally:
        os.close(fd)


@needs_fuse
def test_bucket_device_and_tmp_hold_no_plaintext(
    device: Device,
    any_source: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    started = time.time() - 1
    s = Secrets()
    device.init(any_source)
    mnt = tmp_path / "mnt"
    cache_on = "disk_cache_size=64M"  # the default over S3; asked for over file://
    with device.mounted(any_source, mnt, cache_on):
        fill(mnt, s)
        assert (mnt / s["dirname"] / s["filename"]).read_text() == s["content"]  # it did land
        # The search itself works: it finds every form the mount shows in plain sight.
        assert scan_file(mnt / s["dirname"] / "utf16", s) == [s["content"].encode("utf-16-le")]
        assert s.found_in(os.fsencode(next((mnt / s["dirname"]).glob("na*")).name))
    with device.mounted(any_source, mnt, cache_on):  # a second session: renames, deltas
        assert os.readlink(mnt / s["dirname"] / "link") == s["target"]
        os.rename(mnt / s["dirname"] / "big", mnt / s["dirname"] / ("renamed-" + s["filename"]))
    objects = bucket_objects(any_source, server_for(any_source, request))
    assert any(name.startswith(layout.DATA_PREFIX) for name in objects), "no data was stored"
    leaks = {name: s.found_in(name.encode() + b"\0" + body) for name, body in objects.items()}
    assert not {k: v for k, v in leaks.items() if v}, "plaintext in the bucket"
    cached = [p for p in (device.cache_home / "encfs-cloud").rglob("*") if p.is_file()]
    assert cached, "the sealed disk cache holds nothing: wrong folder?"
    on_device = {
        str(p): scan_file(p, s)
        for top in (device.home, device.cache_home)
        for p in top.rglob("*")
        if p.is_file()
    }
    assert on_device, "the device folder holds no files: wrong folder?"
    assert not {k: v for k, v in on_device.items() if v}, "plaintext in the device folder"
    names = [str(p) for top in (device.home, device.cache_home) for p in top.rglob("*")]
    assert not [n for n in names if s.found_in(n.encode())], "plaintext in a device file name"
    # Temp folders and the runtime folder (mount registry, control sockets), outside the mount.
    elsewhere = [Path(p) for p in ("/tmp", "/var/tmp", "/run/encfs-cloud") if os.path.isdir(p)]
    in_tmp = {
        str(p): found
        for top in elsewhere
        for p in files_under(top, started, other_sessions(tmp_path_factory) | {mnt})
        if (found := scan_file(p, s)) or s.found_in(str(p).encode())
    }
    assert not in_tmp, f"plaintext outside the mount: {sorted(in_tmp)}"


@needs_fuse
def test_object_sizes_are_size_classes(
    device: Device, any_source: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Commits come out exactly at a size class (or a multiple of the largest), packs at 64 or
    256 KiB or a multiple of layout.PACK_STEP."""
    device.init(any_source)
    with device.mounted(any_source, tmp_path / "mnt") as mnt:
        for i, size in enumerate((0, 1, 4095, 100_000, 3 * MiB + 1, 9 * MiB)):
            path = mnt / f"f{i}"
            path.write_bytes(os.urandom(size))
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # one commit per file: deltas of several sizes
            finally:
                os.close(fd)
        for i in range(300):
            (mnt / f"meta-{i:03d}-{'x' * 200}").mkdir()  # a delta with more metadata
    objects = bucket_objects(any_source, server_for(any_source, request))
    prefix = any_source[len("s3://") :].partition("/")[2] if any_source.startswith("s3://") else ""
    sizes = {
        name: len(body)
        for name, body in objects.items()
        if name.removeprefix(prefix).startswith((layout.DATA_PREFIX, layout.META_PREFIX))
    }
    assert any(n.startswith(layout.DATA_PREFIX) for n in sizes)
    assert any(n.startswith(layout.META_PREFIX) for n in sizes)

    def is_class(name: str, size: int) -> bool:
        if name.removeprefix(prefix).startswith(layout.DATA_PREFIX):  # packs: finer classes
            return layout.pack_class(size) == size and (
                size in layout.SIZE_CLASSES[:2] or size % layout.PACK_STEP == 0
            )
        return layout.size_class(size) == size and (
            size in layout.SIZE_CLASSES or size % layout.SIZE_CLASSES[-1] == 0
        )

    odd = {name: size for name, size in sizes.items() if not is_class(name, size)}
    assert not odd, f"objects whose size is not a size class: {odd}"
