"""The real commands end to end: exit codes, one-line errors, nothing written on failure."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from encfs_cloud.errors import EXIT_CODES
from tests.fixtures_mount import (
    ENCFS,
    MOUNT,
    Device,
    daemon_pids,
    force_unmount,
    is_mounted,
    needs_fuse,
    unmount,
)
from tests.fixtures_s3 import MotoServer
from tests.test_no_plaintext import bucket_objects, server_for

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20
WAIT = 120.0  # generous "does not hang" bound for daemons and mounts


def files_in(home: Path) -> dict[str, bytes]:
    """The device folder's files (key, state), to prove a failed command left it alone."""
    if not home.exists():
        return {}
    return {str(p.relative_to(home)): p.read_bytes() for p in home.rglob("*") if p.is_file()}


def expect_error(done: subprocess.CompletedProcess[str], code: int, prog: str = "mount") -> str:
    """The command failed with `code` and said why in exactly one line of stderr."""
    name = "mount.encfs-cloud" if prog == "mount" else "encfs-cloud"
    assert done.returncode == code, f"exit {done.returncode}, wanted {code}: {done.stderr}"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}: "), done.stderr
    return lines[0]


def put_object(source: str, name: str, body: bytes, server: MotoServer | None) -> None:
    if source.startswith("file://"):
        path = Path(source[len("file://") :]) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        return
    assert server is not None
    bucket, _, prefix = source[len("s3://") :].partition("/")
    server.client().put_object(
        Bucket=bucket, Key=(prefix + "/" if prefix else "") + name, Body=body
    )


def wait_until(predicate: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- setup errors and their exit codes -------------------------------------------------------


def test_init_refuses_a_non_empty_bucket(
    device: Device, any_source: str, request: pytest.FixtureRequest
) -> None:
    server = server_for(any_source, request)
    put_object(any_source, "pre/somebody-elses.txt", b"not ours", server)
    before = bucket_objects(any_source, server)
    for source in (any_source, any_source + "/pre"):
        done = device.run("init", source, "--no-passphrase")
        assert "not empty" in expect_error(done, 4, "encfs-cloud")
    assert bucket_objects(any_source, server) == before
    assert files_in(device.home) == {}


def test_mount_of_a_bucket_without_filesystem(
    device: Device, any_source: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    (tmp_path / "mnt").mkdir()
    done = device.mount(any_source, tmp_path / "mnt")
    assert "encfs-cloud init" in expect_error(done, 5)
    assert bucket_objects(any_source, server_for(any_source, request)) == {}
    assert files_in(device.home) == {}
    assert not is_mounted(tmp_path / "mnt")


def test_unknown_format_version_is_refused(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    device.init(local_source)
    header = Path(local_source[len("file://") :]) / "encfs-cloud"
    fields = json.loads(header.read_bytes())
    fields["format"] = 99
    header.write_text(json.dumps(fields))
    before, home = bucket_objects(local_source), files_in(device.home)
    (tmp_path / "mnt").mkdir()
    assert "newer encfs-cloud" in expect_error(device.mount(local_source, tmp_path / "mnt"), 6)
    fields["magic"] = "something-else"
    header.write_text(json.dumps(fields))
    expect_error(device.mount(local_source, tmp_path / "mnt"), 6)
    assert bucket_objects(local_source) == {**before, "encfs-cloud": header.read_bytes()}
    assert files_in(device.home) == home


def test_wrong_passphrase(device: Device, local_source: str, tmp_path: Path) -> None:
    (tmp_path / "right").write_text("correct horse battery staple\n")
    (tmp_path / "wrong").write_text("incorrect horse\n")
    device.run("init", local_source, "--passphrase-file", str(tmp_path / "right"), check=True)
    before, home = bucket_objects(local_source), files_in(device.home)
    (tmp_path / "mnt").mkdir()
    done = device.mount(local_source, tmp_path / "mnt", f"passphrase_file={tmp_path / 'wrong'}")
    expect_error(done, 7)
    assert not is_mounted(tmp_path / "mnt")
    assert (bucket_objects(local_source), files_in(device.home)) == (before, home)
    with device.mounted(local_source, tmp_path / "mnt", f"passphrase_file={tmp_path / 'right'}"):
        pass  # the right passphrase opens it


def test_device_without_key(
    device: Device, second_device: Device, local_source: str, tmp_path: Path
) -> None:
    device.init(local_source)
    before = bucket_objects(local_source)
    (tmp_path / "mnt").mkdir()
    expect_error(second_device.mount(local_source, tmp_path / "mnt"), 8)
    assert bucket_objects(local_source) == before
    assert files_in(second_device.home) == {}


def test_credentials_the_store_refuses(
    device: Device, s3_bucket: str, s3_server: MotoServer, tmp_path: Path
) -> None:
    device.init(s3_bucket)
    before, home = bucket_objects(s3_bucket, s3_server), files_in(device.home)
    (tmp_path / "mnt").mkdir()
    with s3_server.enforce_auth():
        expect_error(device.mount(s3_bucket, tmp_path / "mnt"), 9)
        expect_error(device.run("init", s3_bucket + "/other", "--no-passphrase"), 9, "encfs-cloud")
    assert (bucket_objects(s3_bucket, s3_server), files_in(device.home)) == (before, home)


def test_unreachable_endpoint(device: Device, s3_env: MotoServer, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    (tmp_path / "mnt").mkdir()
    done = device.mount("s3://nowhere", tmp_path / "mnt", f"endpoint_url={dead}")
    assert dead in expect_error(done, 10)
    assert files_in(device.home) == {}


def test_mountpoint_problems(device: Device, local_source: str, tmp_path: Path) -> None:
    device.init(local_source)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for target in (tmp_path / "missing", tmp_path / "a-file", tmp_path / "full"):
        expect_error(device.mount(local_source, target), 11)
    with device.mounted(local_source, tmp_path / "mnt"):
        expect_error(device.mount(local_source, tmp_path / "mnt"), 11)  # already mounted
    assert (tmp_path / "full" / "x").read_text() == "x"


def test_relative_mountpoint(device: Device, local_source: str, tmp_path: Path) -> None:
    """The daemon changes to / before mounting: a relative mount point must not follow it."""
    device.init(local_source)
    name = f"mnt-{uuid.uuid4().hex}"  # never a folder under / that the bug could mount over
    (tmp_path / name).mkdir()
    done = subprocess.run(
        [MOUNT, local_source, name], cwd=tmp_path, env=device.env, capture_output=True, text=True
    )
    try:
        assert done.returncode == 0, done.stderr
        assert is_mounted(tmp_path / name)
    finally:
        unmount(device, tmp_path / name)


def test_bad_source_and_bad_options(device: Device, local_source: str, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    for source in ("nonsense", "ftp://host/x", "file://relative/path"):
        expect_error(device.mount(source, tmp_path / "mnt"), 3)
    expect_error(device.run("init", "s3://", "--no-passphrase"), 3, "encfs-cloud")
    device.init(local_source)
    for option in ("bogus", "cache_size=1K"):
        expect_error(device.mount(local_source, tmp_path / "mnt", option), 2)
    assert not is_mounted(tmp_path / "mnt")
    assert not daemon_pids(tmp_path / "mnt")


def test_help_lists_exit_codes(device: Device) -> None:
    for argv in ([ENCFS, "--help"], [MOUNT, "--help"], [ENCFS, "mount", "--help"]):
        done = device.run(*argv)
        assert done.returncode == 0, done.stderr
        text = " ".join(done.stdout.split())
        assert "exit codes" in text
        for name, code in EXIT_CODES.items():
            assert f"{code} {name.removesuffix('Error')}" in text, (argv, name)


# --- mounting and unmounting the way the system does it --------------------------------------


def test_mount_helper_takes_fstab_style_argv(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    """What mount(8) runs for an fstab line `SOURCE DIR encfs-cloud rw,noauto,_netdev,...`."""
    device.init(local_source)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    options = "rw,noauto,_netdev,x-systemd.automount,nofail,noatime"
    done = device.run(MOUNT, local_source, str(mnt), "-n", "-o", options, "-t", "encfs-cloud")
    try:
        assert done.returncode == 0, done.stderr
        assert is_mounted(mnt)
        (mnt / "f").write_text("fstab")
    finally:
        unmount(device, mnt)
    with device.mounted(local_source, mnt):
        assert (mnt / "f").read_text() == "fstab"


def test_foreground_mount(device: Device, local_source: str, tmp_path: Path) -> None:
    device.init(local_source)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            [MOUNT, local_source, str(mnt), "-f"], env=device.env, stdout=log, stderr=log
        )
    try:
        wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, "the mount")
        assert is_mounted(mnt), (tmp_path / "log").read_text()
        (mnt / "fg").write_bytes(b"foreground" * 100_000)
        assert subprocess.run(["fusermount3", "-u", str(mnt)], check=False).returncode == 0
        assert proc.wait(timeout=WAIT) == 0, (tmp_path / "log").read_text()
    finally:
        if proc.poll() is None:
            force_unmount(mnt)
            proc.kill()
            proc.wait()
    with device.mounted(local_source, mnt):
        assert (mnt / "fg").read_bytes() == b"foreground" * 100_000


@pytest.mark.parametrize(("store", "tool"), [("file", "fusermount3"), ("s3", "umount")])
def test_system_unmount_keeps_every_change(
    device: Device, tmp_path: Path, store: str, tool: str, request: pytest.FixtureRequest
) -> None:
    """Unmounting behind the CLI's back: the daemon still writes everything before it exits."""
    any_source = str(request.getfixturevalue("local_source" if store == "file" else "s3_bucket"))
    device.init(any_source)
    mnt = tmp_path / "mnt"
    payload = os.urandom(3 * MiB + 5)
    with device.mounted(any_source, mnt):
        pids = daemon_pids(mnt)
        assert pids, "no daemon serves the mount"
        (mnt / "dir").mkdir()
        (mnt / "dir" / "big").write_bytes(payload)  # written just before unmount: not committed
        os.symlink("dir/big", mnt / "link")
        os.setxattr(mnt / "dir", "user.tag", b"kept")
        argv = ["fusermount3", "-u", str(mnt)] if tool == "fusermount3" else ["umount", str(mnt)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: not any(p in daemon_pids(mnt) for p in pids), "the daemon to exit")
    with device.mounted(any_source, mnt):
        assert (mnt / "dir" / "big").read_bytes() == payload
        assert os.readlink(mnt / "link") == "dir/big"
        assert os.getxattr(mnt / "dir", "user.tag") == b"kept"


def test_read_only_mount(device: Device, local_source: str, tmp_path: Path) -> None:
    device.init(local_source)
    mnt = tmp_path / "mnt"
    with device.mounted(local_source, mnt):
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_text("read me")
    before, home = bucket_objects(local_source), files_in(device.home)
    with device.mounted(local_source, mnt, "ro"):
        assert (mnt / "d" / "f").read_text() == "read me"
        refused = {
            "write": lambda: os.open(mnt / "d" / "f", os.O_WRONLY),
            "create": lambda: os.open(mnt / "new", os.O_CREAT | os.O_WRONLY),
            "mkdir": lambda: os.mkdir(mnt / "d2"),
            "unlink": lambda: os.unlink(mnt / "d" / "f"),
            "rename": lambda: os.rename(mnt / "d", mnt / "e"),
            "chmod": lambda: os.chmod(mnt / "d" / "f", 0o600),
            "utime": lambda: os.utime(mnt / "d" / "f", ns=(1, 1)),
            "truncate": lambda: os.truncate(mnt / "d" / "f", 0),
            "symlink": lambda: os.symlink("x", mnt / "s"),
            "setxattr": lambda: os.setxattr(mnt / "d", "user.x", b"1"),
        }
        for what, op in refused.items():
            with pytest.raises(OSError) as caught:
                op()
            assert caught.value.errno == errno.EROFS, what
    assert bucket_objects(local_source) == before, "a read-only mount wrote to the bucket"
    assert files_in(device.home) == home
