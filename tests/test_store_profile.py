"""The store probe, the remembered profile, the write gate and remembered connection settings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from encfs_cloud.errors import EXIT_CODES, StoreUnfitError
from encfs_cloud.keys.connection import remember_connection, remembered_connection, with_remembered
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.keys.storefit import check_writable, profile_for, require_conditional_writes
from encfs_cloud.store import open_store
from encfs_cloud.store.base import StoreOptions
from encfs_cloud.store.memory import MemoryStore
from encfs_cloud.store.probe import PROBE_PREFIX, probe_store
from encfs_cloud.store.profile import ENFORCED, HONOURED, IGNORED, StoreProfile, findings
from tests.fixtures_s3 import MotoServer


class IgnoresConditions(MemoryStore):
    """A store wrapper like `rclone serve s3`: If-None-Match and If-Match are dropped."""

    def put(
        self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        return super().put(name, data)


class CountingStore(MemoryStore):
    """Counts the probe's scratch writes, to see when the store is probed."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.probe_writes = 0

    def put(
        self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        if name.startswith(PROBE_PREFIX):
            self.probe_writes += 1
        return super().put(name, data, if_none_match=if_none_match, if_match=if_match)


@pytest.fixture
def devices(tmp_path: Path) -> DeviceStore:
    return DeviceStore(tmp_path / "xdg" / "encfs-cloud")


def enrolled(devices: DeviceStore) -> bytes:
    fs_id = bytes(range(16))
    devices.create(fs_id, "laptop", None).wipe()
    return fs_id


def test_probe_of_a_store_that_enforces_conditional_writes() -> None:
    store = MemoryStore("memory://fit")
    profile = probe_store(store)
    assert (profile.if_none_match, profile.if_match, profile.ranged_get) == (
        ENFORCED,
        ENFORCED,
        HONOURED,
    )
    assert profile.conditional_writes and profile.fit
    assert profile.store == "memory://fit" and profile.endpoint is None
    assert list(store.list("")) == []  # scratch objects are gone
    assert all(f.level != "FAIL" for f in findings(profile))


def test_probe_of_a_store_that_ignores_conditional_writes() -> None:
    store = IgnoresConditions("memory://unfit")
    profile = probe_store(store)
    assert (profile.if_none_match, profile.if_match) == (IGNORED, IGNORED)
    assert not profile.conditional_writes and not profile.fit
    assert list(store.list("")) == []
    failed = [f for f in findings(profile) if f.level == "FAIL"]
    assert [f.check for f in failed] == ["If-None-Match: *", "If-Match: ETAG"]
    assert "--unsafe-no-conditional-writes" in failed[0].explain


def test_profile_json_round_trip_and_rejects_garbage() -> None:
    profile = probe_store(MemoryStore("memory://json"))
    assert StoreProfile.from_json(profile.to_json()) == profile
    assert StoreProfile.from_json(None) is None
    assert StoreProfile.from_json({"store": "x"}) is None
    assert StoreProfile.from_json({**profile.to_json(), "clock_skew": "soon"}) is None
    assert StoreProfile.from_json({**profile.to_json(), "if_match": 3}) is None


def test_profile_is_probed_once_per_store_and_remembered(devices: DeviceStore) -> None:
    fs_id = enrolled(devices)
    store = CountingStore("memory://once")
    first = profile_for(store, devices, fs_id)
    writes = store.probe_writes
    assert writes > 0
    again = profile_for(store, devices, fs_id)
    assert again == first and store.probe_writes == writes  # remembered: no second probe
    assert devices.load_state(fs_id).store_profile == first.to_json()
    moved = CountingStore("memory://elsewhere")  # another store: probed afresh
    assert profile_for(moved, devices, fs_id).store == "memory://elsewhere"
    assert moved.probe_writes > 0


def test_profile_not_kept_for_a_device_not_enrolled(devices: DeviceStore) -> None:
    profile_for(MemoryStore("memory://guest"), devices, bytes(16))
    assert not devices.folder(bytes(16)).exists()


def test_gate_refuses_writes_without_conditional_writes(
    devices: DeviceStore, caplog: pytest.LogCaptureFixture
) -> None:
    fs_id = enrolled(devices)
    store = IgnoresConditions("memory://gate")
    with pytest.raises(StoreUnfitError) as refused:
        check_writable(store, devices, fs_id, unsafe=False, doing="mount read-write")
    assert refused.value.exit_code == EXIT_CODES["StoreUnfitError"] == 19
    message = str(refused.value)
    assert "refusing to mount read-write" in message and "--unsafe-no-conditional-writes" in message
    assert "\n" not in message
    with caplog.at_level(logging.WARNING):
        profile = check_writable(store, devices, fs_id, unsafe=True, doing="mount read-write")
    assert not profile.conditional_writes
    assert "writing anyway" in caplog.text
    fit = probe_store(MemoryStore("memory://fine"))
    require_conditional_writes(fit, unsafe=False, doing="init")  # no error


def test_connection_is_remembered_per_source(
    devices: DeviceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    fs_id = enrolled(devices)
    source = "s3://bucket/home"
    given = StoreOptions(endpoint_url="http://127.0.0.1:9", region="eu-west-3", profile="backup")
    remember_connection(devices, fs_id, source, given)
    assert remembered_connection(devices, source + "/") == {
        "source": source,
        "endpoint_url": "http://127.0.0.1:9",
        "region": "eu-west-3",
        "profile": "backup",
    }
    filled = with_remembered(devices, source, StoreOptions())
    assert (filled.endpoint_url, filled.region, filled.profile) == (
        "http://127.0.0.1:9",
        "eu-west-3",
        "backup",
    )
    # What the user says now wins: an option, or an environment variable.
    assert with_remembered(devices, source, StoreOptions(region="us-west-2")).region == "us-west-2"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    assert with_remembered(devices, source, StoreOptions()).endpoint_url is None
    assert with_remembered(devices, "s3://other-bucket", StoreOptions()) == StoreOptions()
    # Only s3:// sources and enrolled devices keep anything.
    remember_connection(devices, bytes(16), "s3://x/y", given)
    assert not devices.folder(bytes(16)).exists()


@pytest.mark.s3
def test_probe_on_moto_sees_versioning_and_the_clock(s3_server: MotoServer, s3_bucket: str) -> None:
    store = open_store(f"{s3_bucket}/home")
    profile = probe_store(store)
    assert profile.fit and profile.endpoint == s3_server.endpoint_url
    assert (profile.checksums, profile.versioning) == ("validated", "off")
    assert profile.clock_skew is not None  # moto sends a Date header
    bucket = s3_bucket.removeprefix("s3://")
    s3_server.client().put_bucket_versioning(
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    versioned = probe_store(store)
    assert versioned.versioning == "enabled"
    [finding] = [f for f in findings(versioned) if f.check == "versioning"]
    assert finding.level == "warn" and "lifecycle rule" in finding.explain
    assert versioned.fit  # advice, not a refusal
