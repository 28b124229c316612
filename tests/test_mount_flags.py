"""Kernel mount flags (exec/noexec, suid/nosuid, dev/nodev) reach the real mount and hold."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from encfs_cloud.daemon.options import parse_mount_options
from tests.fixtures_mount import Device, needs_fuse

NOBODY = 65534


def mount_flags(mountpoint: Path) -> set[str]:
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == str(mountpoint):
                return set(fields[3].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def test_kernel_flags_are_passed_on_and_the_last_of_a_pair_wins() -> None:
    request = parse_mount_options(
        "file:///b", Path("/m"), ["exec,noexec,nosuid", "suid", "dev,nodev"]
    )
    assert sorted(request.fuse_options) == ["nodev", "noexec", "suid"]
    assert parse_mount_options("file:///b", Path("/m"), ["defaults"]).fuse_options == []


@needs_fuse
@pytest.mark.fuse
def test_noexec_refuses_a_script_that_exec_runs(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    device.init(local_source)
    mnt = tmp_path / "mnt"
    with device.mounted(local_source, mnt, "noexec") as root:
        assert "noexec" in mount_flags(root)
        script = root / "hello.sh"
        script.write_text("#!/bin/sh\necho hello\n")
        script.chmod(0o755)
        with pytest.raises(PermissionError) as refused:
            subprocess.run([str(script)], check=False, timeout=60)
        assert refused.value.errno == errno.EACCES
        assert not os.access(script, os.X_OK)
    with device.mounted(local_source, mnt, "exec") as root:
        assert "noexec" not in mount_flags(root)
        done = subprocess.run(
            [str(root / "hello.sh")], capture_output=True, text=True, timeout=60, check=False
        )
        assert (done.returncode, done.stdout) == (0, "hello\n")


@needs_fuse
@pytest.mark.fuse
def test_set_user_id_bits_and_device_nodes_count_only_with_suid_and_dev(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    """A set-user-id file whose owner is nobody: only a `suid` mount runs it as nobody. A
    device node (here /dev/null's numbers) opens only on a `dev` mount."""
    id_program = shutil.which("id")
    assert id_program is not None
    device.init(local_source)
    mnt = tmp_path / "mnt"
    with device.mounted(local_source, mnt) as root:
        assert {"nosuid", "nodev"} <= mount_flags(root), "FUSE's safe default changed"
        shutil.copyfile(id_program, root / "id")
        os.chown(root / "id", NOBODY, NOBODY)
        os.chmod(root / "id", 0o4755)
        done = subprocess.run([str(root / "id"), "-u"], capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == "0", "nosuid mount honoured a set-user-id bit"
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        with pytest.raises(PermissionError):
            open(root / "null", "wb").close()
    with device.mounted(local_source, mnt, "suid", "dev") as root:
        assert not {"nosuid", "nodev"} & mount_flags(root)
        assert os.stat(root / "id").st_mode & 0o4000
        done = subprocess.run([str(root / "id"), "-u"], capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == str(NOBODY), "suid mount ignored the set-user-id bit"
        with open(root / "null", "wb") as null:
            assert null.write(b"into /dev/null") == 14
        assert (root / "null").read_bytes() == b""
