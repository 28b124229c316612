"""Hostile objects written raw into the bucket: size caps and malformed JSON, via the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_mount import ENCFS, MOUNT, Device, unmount
from tests.fixtures_s3 import MotoServer
from tests.test_devices_e2e import enroll, field

pytestmark = [pytest.mark.s3]
JUNK = 64 << 20
INTEGRITY, FORMAT, LEASE_HELD = 20, 6, 12


# Started from pytest directly, a child's ru_maxrss starts at pytest's own resident size (Linux
# keeps the high-water mark across exec, and vfork shares pytest's memory until then): a small
# Python process in between forks it instead, so the figure is the command's, plus ~10 MiB.
_MEASURE = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "sys.stderr.write(f'\\n@maxrss {usage.ru_maxrss}\\n')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(device: Device, *args: str) -> tuple[int, str, str, int]:
    """Run the real command: (exit code, stdout, stderr, peak RSS of that process in bytes)."""
    cmd = list(args) if args[0] in (ENCFS, MOUNT) else [ENCFS, *args]
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd],
        env=device.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    err, _, peak = done.stderr.rpartition("\n@maxrss ")
    return done.returncode, done.stdout, err, int(peak) * 1024


def bucket_of(source: str) -> str:
    return source.removeprefix("s3://").split("/")[0]


def put_raw(s3_server: MotoServer, source: str, name: str, data: bytes) -> None:
    s3_server.client().put_object(Bucket=bucket_of(source), Key=name, Body=data)


@pytest.mark.parametrize("kind", ["header", "keyring", "key record"])
def test_oversize_object_is_refused_with_bounded_memory(
    kind: str, device: Device, s3_bucket: str, s3_env: MotoServer
) -> None:
    device_id = field(device.init(s3_bucket).stdout, "device id")
    code, _, err, baseline = run_measured(device, "device", "list", s3_bucket)
    assert code == 0, err
    name = {"header": "encfs-cloud", "keyring": "keys/keyring", "key record": f"keys/{device_id}"}
    # Opening brackets: also the deepest JSON nesting a reader could be fed.
    put_raw(s3_env, s3_bucket, name[kind], b"[" * JUNK)
    code, _, err, peak = run_measured(device, "device", "list", s3_bucket)
    assert code == INTEGRITY, err
    assert "larger than" in err and name[kind] in err, err
    assert "Traceback" not in err
    # Reading it whole would cost 64 MiB at least (1 GiB cost 1.3-3.1 GiB before).
    assert peak < baseline + 24 << 20, f"peak RSS {peak >> 20} MiB, baseline {baseline >> 20}"


def test_nested_json_header_is_a_format_error(
    device: Device, s3_bucket: str, s3_env: MotoServer
) -> None:
    device.init(s3_bucket)
    put_raw(s3_env, s3_bucket, "encfs-cloud", b"[" * 30_000 + b"]" * 30_000)
    done = device.run("device", "list", s3_bucket)
    assert done.returncode == FORMAT, done.stderr
    assert "not an encfs-cloud filesystem" in done.stderr
    assert "Traceback" not in done.stderr


def test_oversize_lease_is_refused_like_a_foreign_one(
    device: Device, s3_bucket: str, s3_env: MotoServer, tmp_path: Path
) -> None:
    """A lease object far larger than its format allows might hide an exclusive operation's
    lease: read-write mounts and fsck --repair refuse it (exit 12) like one that does not
    authenticate, reading at most its cap; -o takeover mounts anyway, and fsck --repair
    --takeover replaces it, after which plain mounts work again."""
    device.init(s3_bucket)
    put_raw(s3_env, s3_bucket, "lease", b"\0" * JUNK)
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(*options: str) -> tuple[int, str, int]:
        args = (MOUNT, s3_bucket, str(mnt), *(("-o", ",".join(options)) if options else ()))
        try:
            code, _, err, peak = run_measured(device, *args)
        finally:
            unmount(device, mnt)  # forced if a clean unmount fails, which then fails the test
        return code, err, peak

    code, err, peak = mount()
    assert code == LEASE_HELD, err
    assert "larger than" in err and "-o takeover" in err, err
    assert "Traceback" not in err
    assert peak < 200 << 20, f"peak RSS {peak >> 20} MiB"
    code, err, _ = mount("takeover")
    assert code == 0, err
    code, _, err, peak = run_measured(device, "fsck", s3_bucket, "--repair", "--yes")
    assert code == LEASE_HELD, err
    assert "larger than" in err and "--takeover" in err and "Traceback" not in err, err
    assert peak < 200 << 20, f"peak RSS {peak >> 20} MiB"
    code, out, err, peak = run_measured(
        device, "fsck", s3_bucket, "--repair", "--takeover", "--yes"
    )
    assert code == 0, out + err
    assert peak < 200 << 20, f"peak RSS {peak >> 20} MiB"
    code, err, _ = mount()  # the repair left a released lease of its own
    assert code == 0, err


def test_bad_requests_are_skipped_by_list_approve_and_deny(
    device: Device, second_device: Device, s3_bucket: str, s3_env: MotoServer, tmp_path: Path
) -> None:
    device.init(s3_bucket)
    nested, huge = "requests/" + "a" * 32, "requests/" + "b" * 32
    put_raw(s3_env, s3_bucket, nested, b'{"body": ' + b"[" * 100_000)
    put_raw(s3_env, s3_bucket, huge, b"{" * JUNK)
    out = second_device.run("device", "request", s3_bucket, "--no-passphrase").stdout
    pending = field(out, "request id")
    listed = device.run("device", "list", s3_bucket)
    assert listed.returncode == 0, listed.stderr
    assert pending in listed.stdout
    for name in (nested, huge):
        assert f"ignoring malformed enrollment request {name}" in listed.stderr
    assert "Traceback" not in listed.stderr
    denied = device.run("device", "deny", s3_bucket, pending)
    assert denied.returncode == 0, denied.stderr
    assert pending not in device.run("device", "list", s3_bucket, check=True).stdout
    third = Device(tmp_path / "device-c")
    new_id = enroll(device, third, s3_bucket, "phone")  # approve, with the bad ones present
    assert new_id in device.run("device", "list", s3_bucket, check=True).stdout
