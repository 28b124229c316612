"""The small things a user types wrong, each through the real command: one line, own exit code."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures_mount import ENCFS, MOUNT, Device, is_mounted, needs_fuse


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    err = done.stderr.strip()
    assert err and "\n" not in err and "Traceback" not in err, done.stderr
    return err


def test_init_checks_the_store_before_asking_for_a_passphrase(
    device: Device, tmp_path: Path
) -> None:
    bucket = tmp_path / "full"
    bucket.mkdir()
    (bucket / "something").write_text("already here")
    done = device.run("init", f"file://{bucket}")  # no terminal, no passphrase option
    assert done.returncode == 4, done.stderr
    assert "not empty" in _one_line(done)


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("_anything", "unknown mount option '_anything'"),
        ("bogus", "unknown mount option 'bogus'"),
        ("cache_size", "cache_size needs a value, like cache_size=512M"),
        ("cache_size=", "cache_size needs a value"),
        ("uid=bob", "uid= is not supported"),
        ("umask=999", "umask= is not supported"),
        ("max_read=lots", "max_read takes a number"),
        ("endpoint_url=http//x", "endpoint URL 'http//x' is malformed"),
    ],
)
def test_bad_mount_options_are_one_line_exit_2(
    device: Device, local_source: str, tmp_path: Path, option: str, says: str
) -> None:
    device.init(local_source)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = device.run(MOUNT, local_source, str(mnt), "-o", f"ro,{option}")
    assert done.returncode == 2, done.stderr
    assert says in _one_line(done)
    assert not is_mounted(mnt)


def test_generic_fstab_options_are_accepted(device: Device, tmp_path: Path) -> None:
    """_netdev and x-systemd.* still pass (the first error is then the missing filesystem)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    options = "_netdev,_rnetdev,x-systemd.automount,nofail,comment=x"
    done = device.run(MOUNT, f"file://{empty}", str(mnt), "-o", options)
    assert done.returncode == 5, done.stderr


@pytest.mark.parametrize("url", ["http//x", "http://[bad", "ftp://x", "http://h:port"])
def test_malformed_endpoint_url_is_one_line(device: Device, url: str) -> None:
    done = device.run("device", "list", "--endpoint-url", url, "s3://some-bucket")
    assert done.returncode == 2
    assert "is malformed" in _one_line(done)


def test_swapped_source_and_mountpoint_get_a_hint(device: Device, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    done = device.run(MOUNT, str(mnt), "s3://my-bucket/home")
    assert done.returncode == 2
    err = _one_line(done)
    assert "SOURCE comes first" in err and f"s3://my-bucket/home {mnt}" in err
    assert "mkdir" not in err


def _dialogue(device: Device, args: list[str], answers: list[tuple[bytes, str]]) -> tuple[int, str]:
    """Run the command on a pseudo-terminal, answer each prompt, return (code, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        args, stdin=slave, stdout=slave, stderr=slave, env=device.env, start_new_session=True
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 120
        for prompt, answer in answers:
            while prompt not in seen:
                assert time.monotonic() < deadline and proc.poll() is None, seen
                if select.select([master], [], [], 0.5)[0]:
                    seen += os.read(master, 4096)
            seen = seen.replace(prompt, b"", 1)
            os.write(master, answer.encode() + b"\n")
        code = proc.wait(timeout=120)
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, seen.decode(errors="replace")


def test_approve_reads_the_code_from_the_terminal(
    device: Device, second_device: Device, local_source: str
) -> None:
    from tests.test_devices_e2e import field

    device.init(local_source)
    out = second_device.run("device", "request", local_source, "--no-passphrase").stdout
    request_id, code = field(out, "request id"), field(out, "verification code")
    args = [ENCFS, "device", "approve", local_source, request_id]
    done, shown = _dialogue(device, args, [(b"verification code", code), (b"[y/N]", "y")])
    assert done == 0, shown
    assert f"device id: {request_id}" in shown


@needs_fuse
def test_umount_wipe_asks_on_a_terminal(
    device: Device, second_device: Device, local_source: str, tmp_path: Path
) -> None:
    from tests.test_devices_e2e import enroll

    device.init(local_source)
    enroll(device, second_device, local_source, "phone")
    mnt = tmp_path / "mnt"
    with second_device.mounted(local_source, mnt):
        args = [ENCFS, "umount", "--wipe", str(mnt)]
        code, out = _dialogue(second_device, args, [(b"[y/N]", "n")])
        assert code == 17, out
        assert "destroy this device's key" in out
        assert is_mounted(mnt)
        assert any(second_device.home.rglob("*"))  # the key is still there
        done = second_device.run("umount", "--wipe", "-y", str(mnt))
        assert done.returncode == 0, done.stderr
    assert not any(second_device.home.rglob("*"))
