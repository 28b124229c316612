"""The S3 store through a fault-injecting proxy: 5xx, SlowDown, resets, truncation, hangs."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from encfs_cloud.errors import (
    ObjectMissingError,
    PreconditionFailedError,
    StoreError,
    TransientStoreError,
    UnreachableError,
)
from encfs_cloud.store import StoreOptions
from encfs_cloud.store import s3 as s3_module
from encfs_cloud.store.budget import operation_budget
from encfs_cloud.store.s3 import S3Store
from tests.faultproxy import Fault, FaultProxy
from tests.fixtures_s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, empty_bucket

pytestmark = pytest.mark.s3

DATA = os.urandom(300_000)
GET, PUT = "GET", "PUT"


@pytest.fixture
def proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url) as p:
        yield p


@pytest.fixture
def bucket(s3_server: MotoServer) -> Iterator[str]:
    client = s3_server.client()
    name = f"faults-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    yield name
    empty_bucket(client, name)
    client.delete_bucket(Bucket=name)


def make_store(proxy: FaultProxy, bucket: str, **options: Any) -> S3Store:
    defaults: dict[str, Any] = {
        "endpoint_url": proxy.endpoint_url,
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "region": REGION,
        "backoff_base": 0.01,  # keeps retries fast; the schedule itself is tested below
        "read_timeout": 5.0,
    }
    defaults.update(options)
    return S3Store(bucket, "pre/", StoreOptions(**defaults))


@pytest.fixture
def store(proxy: FaultProxy, bucket: str) -> Iterator[S3Store]:
    s = make_store(proxy, bucket)
    yield s
    s.close()


@pytest.mark.parametrize(
    "fault",
    [
        Fault.HTTP_500,
        Fault.SLOW_DOWN,
        Fault.RESET_BEFORE,
        Fault.RESET_DURING,
        Fault.RESET_AFTER,
        Fault.TRUNCATE,
        Fault.DELAY,
    ],
)
def test_get_survives(fault: Fault, proxy: FaultProxy, store: S3Store) -> None:
    store.put("obj", DATA)
    rule = proxy.inject(fault, count=2, method=GET, path="/pre/obj", delay=0.05)
    assert store.get("obj") == DATA
    assert store.get("obj", 1000, 5000) == DATA[1000:6000]
    assert store.get_with_etag("obj")[0] == DATA
    assert rule.hits == 2  # the faults really happened


@pytest.mark.parametrize(
    "fault", [Fault.HTTP_500, Fault.SLOW_DOWN, Fault.RESET_BEFORE, Fault.RESET_AFTER]
)
def test_put_survives(fault: Fault, proxy: FaultProxy, store: S3Store) -> None:
    rule = proxy.inject(fault, count=2, method=PUT, path="/pre/obj")
    store.put("obj", DATA)
    etag = store.put("obj", DATA[::-1])  # RESET_AFTER spoils the connection, not the PUT
    assert rule.hits == 2
    assert store.get_with_etag("obj") == (DATA[::-1], etag)


@pytest.mark.parametrize("fault", [Fault.HTTP_500, Fault.SLOW_DOWN, Fault.RESET_BEFORE])
def test_head_list_delete_survive(fault: Fault, proxy: FaultProxy, store: S3Store) -> None:
    for name in ("a", "b", "c"):
        store.put(name, b"x")
    proxy.inject(fault, count=2, method="HEAD")
    proxy.inject(fault, count=2, method=GET, path=r"list-type=2")
    proxy.inject(fault, count=2, method="DELETE")
    info = store.head("a")
    assert info is not None and info.size == 1
    assert [o.name for o in store.list()] == ["a", "b", "c"]
    store.delete("b")
    assert [o.name for o in store.list()] == ["a", "c"]


def test_conditional_create_whose_answer_was_lost(proxy: FaultProxy, store: S3Store) -> None:
    # The server applies the first PUT, the reply is lost; the retry then meets its own
    # object. That must count as a win, not as a lost race.
    rule = proxy.inject(Fault.RESET_BEFORE, count=1, method=PUT, path="/pre/lease")
    etag = store.put("lease", b"device-1 epoch 7", if_none_match=True)
    assert rule.hits == 1
    assert store.get_with_etag("lease") == (b"device-1 epoch 7", etag)
    proxy.inject(Fault.RESET_BEFORE, count=1, method=PUT, path="/pre/lease")
    new = store.put("lease", b"device-1 epoch 8", if_match=etag)
    assert store.get_with_etag("lease") == (b"device-1 epoch 8", new)


def test_lost_reply_is_recognised_without_an_md5_etag(proxy: FaultProxy, bucket: str) -> None:
    # With SSE-KMS or SSE-C the ETag is no MD5 of the body: the check must compare bytes.
    store = make_store(proxy, bucket, max_attempts=1)
    proxy.inject(Fault.OPAQUE_ETAG, count=1000, method="HEAD")
    proxy.inject(Fault.OPAQUE_ETAG, count=1000, method=GET)
    lost = proxy.inject(Fault.RESET_BEFORE, count=1, method=PUT, path="/pre/commit")
    with pytest.raises(StoreError):
        store.put("commit", b"sealed commit 5", if_none_match=True)  # landed, reply lost
    assert lost.hits == 1
    # The caller's own retry (a new call, as the committer makes) meets its own object.
    assert store.put("commit", b"sealed commit 5", if_none_match=True)
    # Another writer's object is still a lost race, whatever its ETag looks like.
    with pytest.raises(PreconditionFailedError):
        store.put("commit", b"another device's commit 5", if_none_match=True)


def test_truncated_bodies_never_come_back_short(proxy: FaultProxy, bucket: str) -> None:
    store = make_store(proxy, bucket, max_attempts=3)
    store.put("obj", DATA)
    proxy.inject(Fault.TRUNCATE, count=100, method=GET)
    for call in (
        lambda: store.get("obj"),
        lambda: store.get("obj", 10, 200_000),
        lambda: store.get("obj", 299_000),
        lambda: store.get_with_etag("obj"),
    ):
        with pytest.raises(TransientStoreError):
            call()
    proxy.clear()
    assert store.get("obj", 10, 200_000) == DATA[10:200_010]


def test_persistent_5xx_gives_up(proxy: FaultProxy, bucket: str) -> None:
    store = make_store(proxy, bucket, max_attempts=4)
    rule = proxy.inject(Fault.HTTP_500, count=100, method=PUT)
    with pytest.raises(TransientStoreError, match="4 attempts"):
        store.put("obj", b"x")
    assert rule.hits == 4


def test_slow_down_honours_retry_after(
    proxy: FaultProxy, store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("obj", b"x")
    waits: list[float] = []
    monkeypatch.setattr(s3_module, "_sleep", waits.append)
    proxy.inject(Fault.SLOW_DOWN, count=2, method=GET, retry_after=0.75)
    assert store.get("obj") == b"x"
    assert len(waits) == 2 and all(w >= 0.75 for w in waits)


def test_backoff_grows_and_stays_bounded(
    proxy: FaultProxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(proxy, bucket, max_attempts=6, backoff_base=1.0)
    waits: list[float] = []
    monkeypatch.setattr(s3_module, "_sleep", waits.append)
    proxy.inject(Fault.HTTP_500, count=100, method=GET)
    with pytest.raises(TransientStoreError):
        store.get("obj")
    assert len(waits) == 5
    assert all(0 <= w <= min(10.0, 2**i) for i, w in enumerate(waits))


def test_hang_once_then_recover(proxy: FaultProxy, bucket: str) -> None:
    store = make_store(proxy, bucket, read_timeout=0.5)
    store.put("obj", DATA)
    rule = proxy.inject(Fault.HANG, count=1, method=GET)
    assert store.get("obj") == DATA
    assert rule.hits == 1


def test_hang_beyond_deadline_raises_in_bounded_time(proxy: FaultProxy, bucket: str) -> None:
    store = make_store(proxy, bucket, read_timeout=0.5, max_attempts=50, deadline=1.2)
    store.put("obj", b"x")
    proxy.inject(Fault.HANG, count=1000)
    began = time.monotonic()
    # Connections accepted, nothing ever answered: as unusable as a host that is down.
    with pytest.raises(UnreachableError, match="did not answer"):
        store.get("obj")
    with pytest.raises(UnreachableError):
        store.put("obj", b"y")
    assert time.monotonic() - began < 30  # generous: "does not hang"


def test_missing_object_is_not_retried(proxy: FaultProxy, store: S3Store) -> None:
    with pytest.raises(ObjectMissingError):
        store.get("nope")
    assert store.head("nope") is None
    assert proxy.requests <= 3  # GET, HEAD, and one HEAD of the bucket


def test_round_trip_emulation(s3_server: MotoServer, bucket: str) -> None:
    with FaultProxy(s3_server.endpoint_url, rtt=0.02) as slow:
        store = make_store(slow, bucket)
        for i in range(5):
            store.put(f"o{i}", DATA[:1000])
        assert [o.name for o in store.list()] == [f"o{i}" for i in range(5)]
        assert store.get("o3") == DATA[:1000]
        assert slow.requests == 7
        store.close()


@pytest.mark.parametrize("fault", [Fault.TRICKLE, Fault.TRICKLE_BODY])
def test_trickle_is_cut_at_the_deadline(fault: Fault, proxy: FaultProxy, bucket: str) -> None:
    # One byte every 0.3 s never trips a 2 s read timeout; only a whole-request deadline
    # ends it, and it must close the connection rather than leave it trickling.
    store = make_store(proxy, bucket, read_timeout=2.0, connect_timeout=1.0, deadline=4.0)
    store.put("obj", DATA)
    rule = proxy.inject(fault, count=1000, method=GET, delay=0.3)
    began = time.monotonic()
    with pytest.raises(StoreError) as caught:
        store.get("obj")
    took = time.monotonic() - began
    # The deadline grows by the object's size at the slowest granted rate once the headers
    # announce it: 4 s + 300 kB / 64 KiB/s; 60 s is a generous bound for "bounded".
    assert took < 60, took
    expected = UnreachableError if fault is Fault.TRICKLE else TransientStoreError
    assert type(caught.value) is expected, caught.value
    assert rule.hits >= 1
    _poll(lambda: rule.aborted == rule.hits, "the proxy sees every trickled answer abandoned")
    proxy.clear()
    assert store.get("obj") == DATA  # the pool recovers: no dead connection is reused


def test_trickle_respects_the_callers_budget(proxy: FaultProxy, bucket: str) -> None:
    store = make_store(proxy, bucket, read_timeout=30.0, deadline=120.0)
    store.put("obj", DATA)
    proxy.inject(Fault.TRICKLE, count=1000, delay=0.5)
    began = time.monotonic()
    with operation_budget(3.0), pytest.raises(UnreachableError, match="did not answer"):
        store.get("obj")
    with operation_budget(3.0), pytest.raises(UnreachableError):
        store.put("obj2", DATA)
    assert time.monotonic() - began < 40  # two budgets of 3 s, bounded generously


def _poll(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_checksums_only_when_required_whatever_the_environment(
    proxy: FaultProxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Set in code: the environment asking for checksums on every request changes nothing.
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_supported")
    store = make_store(proxy, bucket)
    store.put("obj", DATA)
    assert store.get("obj", 10, 1000) == DATA[10:1010]
    puts = [h for m, _, h in proxy.seen if m == PUT]
    assert puts
    for headers in puts:
        assert not any(k.startswith("x-amz-checksum") for k in headers), headers
        assert "x-amz-trailer" not in headers and "aws-chunked" not in headers.get(
            "content-encoding", ""
        )
    gets = [h for m, _, h in proxy.seen if m == GET]
    assert gets and all("x-amz-checksum-mode" not in h for h in gets)
    store.close()
