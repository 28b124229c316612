"""The real commands on three S3 servers: `doctor`, the write gate, remembered settings, a mount.

moto and SeaweedFS enforce conditional writes; `rclone serve s3` ignores them, so every
command that writes must refuse it unless told to risk it. Each server's `doctor` output is
printed (run with -s to see the profiles).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures_mount import MOUNT, Device, is_mounted, needs_fuse
from tests.fixtures_s3 import MotoServer
from tests.fixtures_servers import Server

pytestmark = pytest.mark.s3

FIT, UNFIT = 0, 19


def objects(server: MotoServer | Server, source: str) -> list[str]:
    bucket = source.removeprefix("s3://").partition("/")[0]
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, f"exit {done.returncode}, wanted {code}: {done.stderr}"
    errors = [line for line in done.stderr.splitlines() if line.startswith("encfs-cloud: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.mark.parametrize(
    ("server_fixture", "bucket_fixture", "expected"),
    [
        ("s3_server", "s3_bucket", FIT),
        ("seaweedfs_server", "seaweedfs_bucket", FIT),
        ("rclone_server", "rclone_bucket", UNFIT),
    ],
    ids=["moto", "seaweedfs", "rclone"],
)
def test_doctor_on_each_server(
    request: pytest.FixtureRequest,
    device: Device,
    server_fixture: str,
    bucket_fixture: str,
    expected: int,
) -> None:
    source = f"{request.getfixturevalue(bucket_fixture)}/home"
    server = request.getfixturevalue(server_fixture)
    done = device.run("doctor", source)
    print(f"\n--- encfs-cloud doctor on {request.node.callspec.id} (exit {done.returncode})")
    print(done.stdout + done.stderr)
    assert done.returncode == expected, done.stderr
    assert "If-None-Match: *" in done.stdout and "clock:" in done.stdout
    if expected == FIT:
        assert "verdict: fit for encfs-cloud" in done.stdout
        assert "ok    If-None-Match: *: enforced" in done.stdout
    else:
        assert "FAIL  If-None-Match: *: ignored" in done.stdout
        assert "not fit" in one_line_error(done, UNFIT)
    assert objects(server, source) == []  # the scratch objects are gone


def test_rclone_writes_refused_unless_risk_accepted(
    rclone_server: Server, rclone_bucket: str, device: Device
) -> None:
    source = rclone_bucket
    # No passphrase option and no terminal: the store is judged before a passphrase is asked.
    refused = device.run("init", source)
    message = one_line_error(refused, UNFIT)
    assert "does not enforce conditional writes" in message
    assert "--unsafe-no-conditional-writes" in message
    assert objects(rclone_server, source) == []  # nothing written: not even the header
    assert not device.home.exists()  # and no device key made

    done = device.run("init", source, "--no-passphrase", "--unsafe-no-conditional-writes")
    assert done.returncode == 0, done.stderr
    assert "writing anyway as asked" in done.stderr
    state = json.loads(next(device.home.rglob("state.json")).read_text())
    assert state["store_profile"]["if_none_match"] == "ignored"  # remembered at init

    # Reading is fine; every command that writes checks the remembered profile.
    listed = device.run("device", "list", source)
    assert listed.returncode == 0, listed.stderr
    device_id = listed.stdout.split("* ", 1)[1].split()[0]
    one_line_error(device.run("device", "rename", source, device_id, "desk"), UNFIT)
    one_line_error(device.run("recovery-key", source, "--rotate"), UNFIT)
    one_line_error(device.run("fsck", source, "--repair", "--yes"), UNFIT)
    renamed = device.run(
        "device", "rename", source, device_id, "desk", "--unsafe-no-conditional-writes"
    )
    assert renamed.returncode == 0, renamed.stderr


@needs_fuse
@pytest.mark.fuse
def test_rclone_mount_refused_unless_risk_accepted(
    rclone_bucket: str, device: Device, tmp_path: Path
) -> None:
    source = rclone_bucket
    device.init(source, "--unsafe-no-conditional-writes")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    refused = device.mount(source, mnt)
    assert refused.returncode == UNFIT, refused.stderr
    assert "-o unsafe_no_conditional_writes" in refused.stderr
    assert not is_mounted(mnt)
    with device.mounted(source, mnt, "unsafe_no_conditional_writes"):
        (mnt / "note.txt").write_text("single writer")
        assert (mnt / "note.txt").read_text() == "single writer"


def test_doctor_on_a_folder_remembers_for_an_enrolled_device(
    device: Device, local_source: str
) -> None:
    before = device.run("doctor", local_source)
    assert before.returncode == 0, before.stderr
    assert "filesystem: none yet" in before.stdout
    assert "checksums: n/a" in before.stdout
    device.init(local_source)
    state = next(device.home.rglob("state.json"))
    doc = json.loads(state.read_text())
    doc["store_profile"] = None  # forget what init found: doctor must record it again
    state.write_text(json.dumps(doc))
    after = device.run("doctor", local_source)
    assert after.returncode == 0, after.stderr
    assert "this device is enrolled: the profile is remembered" in after.stdout
    remembered = json.loads(state.read_text())["store_profile"]
    assert remembered["if_none_match"] == remembered["if_match"] == "enforced"
    assert remembered["store"] == local_source


def test_endpoint_region_and_profile_remembered(
    s3_server: MotoServer, s3_bucket: str, device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the command line names the endpoint; later commands are given SOURCE alone.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    source = f"{s3_bucket}/home"
    endpoint = s3_server.endpoint_url
    done = device.run(
        "init", source, "--no-passphrase", "--endpoint-url", endpoint, "--region", "eu-west-3",
        check=True,
    )  # fmt: skip
    hint = f"mount.encfs-cloud -o endpoint_url={endpoint},region=eu-west-3 {source} MOUNTPOINT"
    assert hint in done.stdout
    listed = device.run("device", "list", source)
    assert listed.returncode == 0, listed.stderr
    assert "(this device)" in listed.stdout
    assert device.run("doctor", source).returncode == 0
    # An explicit option still wins over what was remembered.
    wrong = device.run("device", "list", source, "--endpoint-url", "http://127.0.0.1:9")
    assert wrong.returncode == 10, wrong.stderr


@needs_fuse
@pytest.mark.fuse
def test_seaweedfs_mount_and_fsck_round_trip(
    seaweedfs_bucket: str, device: Device, tmp_path: Path
) -> None:
    source = f"{seaweedfs_bucket}/fs"
    device.init(source)
    big = os.urandom(3 << 20)  # several chunks: cold reads after remounting are ranged GETs
    mnt = tmp_path / "mnt"
    with device.mounted(source, mnt):
        (mnt / "dir").mkdir()
        (mnt / "dir" / "big.bin").write_bytes(big)
        (mnt / "small.txt").write_text("hello seaweed")
        status = device.run("status", str(mnt))
        assert status.returncode == 0, status.stderr
        assert "store fit:   conditional writes enforced" in status.stdout
    fsck = device.run("fsck", source)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with device.mounted(source, mnt, "ro"):
        assert (mnt / "dir" / "big.bin").read_bytes() == big
        assert (mnt / "small.txt").read_text() == "hello seaweed"
    assert device.run(MOUNT, "--help").returncode == 0
