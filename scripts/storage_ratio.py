"""Bytes stored in the bucket per byte written, for a large file, a source tree and rewrites.

Mounts a fresh filesystem on a `file://` bucket with the real daemon for each case, writes,
unmounts (everything is then in the bucket) and sums the object sizes:

    .venv/bin/python scripts/storage_ratio.py [--big-mib 256] [--tree DIR] [--rewrite-mib 64]

`rewrite` overwrites 6 random 4 KiB blocks of a file, with an fsync, 32 times, then reports the
ratio before and after `fsck --repair` compacts the packs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
MiB = 1 << 20


class Session:
    """A device, a bucket and a mount point in a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bucket = root / "bucket"
        self.source = f"file://{self.bucket}"
        self.mnt = root / "mnt"
        self.mnt.mkdir()
        self.env = dict(os.environ)
        self.env.update(
            XDG_DATA_HOME=str(root / "data"),
            XDG_CACHE_HOME=str(root / "cache"),
            ENCFS_CLOUD_TEST_FAST_KDF="1",
        )
        self.run("encfs-cloud", "init", self.source, "--no-passphrase")

    def run(self, tool: str, *args: str) -> str:
        done = subprocess.run(
            [str(BIN / tool), *args], env=self.env, capture_output=True, text=True, check=False
        )
        if done.returncode:
            raise SystemExit(f"{tool} {' '.join(args)}: exit {done.returncode}: {done.stderr}")
        return done.stdout

    def mount(self) -> None:
        self.run("mount.encfs-cloud", self.source, str(self.mnt))

    def umount(self) -> None:
        self.run("encfs-cloud", "umount", str(self.mnt))

    def stored(self, prefix: str = "") -> int:
        top = self.bucket / prefix if prefix else self.bucket
        return sum(p.stat().st_size for p in top.rglob("*") if p.is_file())


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def report(name: str, s: Session, written: int) -> None:
    total, data = s.stored(), s.stored("data")
    print(
        f"{name}: written {written / MiB:.1f} MiB, stored {total / MiB:.1f} MiB "
        f"(packs {data / MiB:.1f} MiB, rest {(total - data) / MiB:.2f} MiB): "
        f"ratio {total / written:.3f} (packs alone {data / written:.3f})"
    )


def big(root: Path, mib: int) -> None:
    s = Session(root)
    s.mount()
    block = os.urandom(MiB)
    with open(s.mnt / "big", "wb") as f:
        for _ in range(mib):
            f.write(block)
    s.umount()
    report(f"{mib} MiB file", s, mib * MiB)


def tree(root: Path, src: Path) -> None:
    s = Session(root)
    s.mount()
    ignore = shutil.ignore_patterns("__pycache__", "site-packages")
    shutil.copytree(src, s.mnt / "tree", symlinks=True, ignore=ignore)
    written = tree_bytes(s.mnt / "tree")
    files = sum(1 for p in (s.mnt / "tree").rglob("*") if p.is_file())
    s.umount()
    report(f"tree {src} ({files} files)", s, written)


def rewrite(root: Path, mib: int) -> None:
    s = Session(root)
    s.mount()
    path = s.mnt / "db"
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    rng = random.Random(13)
    with open(path, "r+b") as f:
        for round_ in range(32):  # each round one commit: rewritten chunks leave dead ones behind
            for _ in range(6):
                f.seek(rng.randrange(mib * MiB // 4096) * 4096)
                f.write(os.urandom(4096))
            f.flush()
            os.fsync(f.fileno())
            del round_
    s.umount()
    report(f"{mib} MiB file after random 4 KiB rewrites", s, mib * MiB)
    s.run("encfs-cloud", "fsck", s.source, "--repair", "--yes")
    report(f"{mib} MiB file after fsck --repair", s, mib * MiB)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--tree", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--rewrite-mib", type=int, default=64)
    parser.add_argument("--only", choices=("big", "tree", "rewrite"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="storage-ratio-") as tmp:
        for case in ("big", "tree", "rewrite"):
            if args.only not in (None, case):
                continue
            root = Path(tmp) / case
            root.mkdir()
            try:
                if case == "big":
                    big(root, args.big_mib)
                elif case == "tree":
                    tree(root, args.tree)
                else:
                    rewrite(root, args.rewrite_mib)
            finally:
                mnt = root / "mnt"
                if mnt.is_dir() and os.path.ismount(mnt):
                    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
