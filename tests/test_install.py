"""`make install-system` into a temporary prefix: self-contained, it works with the clone gone."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures_mount import is_mounted, needs_fuse

ROOT = Path(__file__).resolve().parent.parent


def _copy_clone(dest: Path) -> Path:
    """A copy of the tracked files of this checkout, as a fresh clone would have."""
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


@needs_fuse
@pytest.mark.skipif(not shutil.which("git") or not shutil.which("make"), reason="needs git, make")
@pytest.mark.slow  # make stress: it builds a whole venv from PyPI (45 s of make test's budget)
def test_install_system_survives_removing_the_clone(tmp_path: Path) -> None:
    clone = _copy_clone(tmp_path / "clone")
    root = tmp_path / "sys"
    dirs = {
        "SYSTEM_PREFIX": root / "opt" / "encfs-cloud",
        "BINDIR": root / "usr" / "local" / "bin",
        "SBINDIR": root / "sbin",
        "MANDIR": root / "usr" / "local" / "share" / "man",
    }
    make = ["make", "-C", str(clone), "install-system", "PYTHON=python3"]
    make += [f"{k}={v}" for k, v in dirs.items()]
    done = subprocess.run(make, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.rmtree(clone)  # the clone goes; the install must not need it

    prefix = dirs["SYSTEM_PREFIX"]
    # `pip install .` gave both programs, and the package is a copy, not a link to the clone.
    assert (prefix / "bin" / "encfs-cloud").is_file()
    assert (prefix / "bin" / "mount.encfs-cloud").is_file()
    assert not list(prefix.rglob("__editable__*")) and not list(prefix.rglob("*.egg-link"))
    for page in ("encfs-cloud.1", "mount.encfs-cloud.1"):
        assert (dirs["MANDIR"] / "man1" / page).is_file()

    encfs = dirs["BINDIR"] / "encfs-cloud"
    mount = dirs["SBINDIR"] / "mount.encfs-cloud"
    umount = dirs["SBINDIR"] / "umount.fuse.encfs-cloud"
    assert subprocess.run([encfs, "--version"], capture_output=True, check=True).stdout
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "home"), ENCFS_CLOUD_TEST_FAST_KDF="1")
    bucket, mnt = tmp_path / "bucket", tmp_path / "mnt"
    bucket.mkdir()
    mnt.mkdir()
    source = f"file://{bucket}"
    subprocess.run([encfs, "init", source, "--no-passphrase"], env=env, check=True, timeout=120)
    subprocess.run([mount, source, str(mnt)], env=env, check=True, timeout=120)
    try:
        (mnt / "hello.txt").write_text("installed\n")
        # What umount(8) runs: the helper finds the encfs-cloud installed beside the mount helper.
        done = subprocess.run([umount, str(mnt)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    subprocess.run([mount, source, str(mnt), "-o", "ro"], env=env, check=True, timeout=120)
    try:
        assert (mnt / "hello.txt").read_text() == "installed\n"
    finally:
        subprocess.run([umount, str(mnt)], env=env, check=False, timeout=120)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
