"""One ObjectStore contract, run against the memory, local-folder and S3 (moto over HTTP) stores."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs_cloud.errors import (
    BadSourceError,
    CredentialsError,
    IntegrityError,
    NoFilesystemError,
    ObjectMissingError,
    PreconditionFailedError,
    StoreError,
    UnreachableError,
)
from encfs_cloud.store import ObjectInfo, ObjectStore, StoreOptions, open_store
from encfs_cloud.store.capped import read_capped, read_capped_with_etag
from encfs_cloud.store.local import LocalStore
from encfs_cloud.store.memory import MemoryStore
from tests.fixtures_s3 import MotoServer

BACKENDS = [
    "memory",
    "local",
    pytest.param("s3", marks=pytest.mark.s3),
    pytest.param("s3-tls", marks=pytest.mark.s3),  # through a TLS proxy (tests/tlsproxy.py)
]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "memory":
        url = f"memory://contract-{uuid.uuid4().hex}"
    elif request.param == "local":
        url = f"file://{tmp_path}/bucket"
    elif request.param == "s3":
        url = request.getfixturevalue("s3_bucket") + "/some/prefix"
    else:
        url = request.getfixturevalue("tls_bucket") + "/some/prefix"
    s = open_store(url)
    yield s
    s.close()
    if request.param == "s3-tls":  # our settings never frame a body as aws-chunked
        proxy = request.getfixturevalue("tls_proxy")
        assert proxy.aws_chunked_requests() == []


# --- reads and writes --------------------------------------------------------------------


def test_put_get_roundtrip(store: ObjectStore) -> None:
    blob = os.urandom(1 << 20)
    etag = store.put("data/blob", blob)
    assert store.get("data/blob") == blob
    assert store.get_with_etag("data/blob") == (blob, etag)
    store.put("empty", b"")
    assert store.get("empty") == b""


def test_ranged_get(store: ObjectStore) -> None:
    data = bytes(range(256)) * 40
    store.put("r", data)
    assert store.get("r", 0, 10) == data[:10]
    assert store.get("r", 1000, 4096) == data[1000:5096]
    assert store.get("r", 5000) == data[5000:]
    assert store.get("r", len(data) - 3, 10) == data[-3:]  # a range past the end is clipped
    assert store.get("r", len(data), 5) == b""
    assert store.get("r", len(data) + 7) == b""
    assert store.get("r", 17, 0) == b""
    with pytest.raises(ValueError):
        store.get("r", -1, 5)
    with pytest.raises(ValueError):
        store.get("r", 0, -5)
    store.put("e", b"")
    assert store.get("e", 0, 10) == b""


def test_missing_object(store: ObjectStore) -> None:
    for call in (
        lambda: store.get("nope"),
        lambda: store.get("nope", 3, 4),
        lambda: store.get("nope", 3, 0),
        lambda: store.get_with_etag("nope"),
    ):
        with pytest.raises(ObjectMissingError):
            call()
    assert store.head("nope") is None


def test_head_and_etags(store: ObjectStore) -> None:
    first = store.put("h", b"one")
    info = store.head("h")
    assert info is not None
    assert (info.name, info.size, info.etag) == ("h", 3, first)
    second = store.put("h", b"two!")
    assert second != first
    assert store.head("h") == ObjectInfo("h", 4, second)
    assert store.get("h") == b"two!"


def test_capped_reads_stop_at_the_cap(store: ObjectStore) -> None:
    etag = store.put("big", b"x" * 5000)
    assert store.get_with_etag("big", 101) == (b"x" * 101, etag)  # the whole object's etag
    assert store.get_with_etag("big", 6000) == (b"x" * 5000, etag)
    assert read_capped(store, "big", 5000) == b"x" * 5000
    assert read_capped_with_etag(store, "big", 5000) == (b"x" * 5000, etag)
    with pytest.raises(IntegrityError, match="larger than the 4999 bytes"):
        read_capped(store, "big", 4999)
    with pytest.raises(IntegrityError):
        read_capped_with_etag(store, "big", 100)
    with pytest.raises(ObjectMissingError):
        read_capped(store, "nope", 100)


def test_list_is_name_ordered_and_prefix_filtered(store: ObjectStore) -> None:
    # "a-c" sorts before "a/x" ('-' < '/'): a naive folder walk gets this wrong.
    names = ["z", "a/x", "a-c", "a/b/c", "data/10", "data/2", "data/1", "b"]
    for i, name in enumerate(names):
        store.put(name, b"x" * i)
    listed = list(store.list())
    assert [o.name for o in listed] == sorted(names)
    assert {o.name: o.size for o in listed} == {n: i for i, n in enumerate(names)}
    assert [o.name for o in store.list("a/")] == ["a/b/c", "a/x"]
    assert [o.name for o in store.list("a")] == ["a-c", "a/b/c", "a/x"]
    assert [o.name for o in store.list("data/1")] == ["data/1", "data/10"]
    assert [o.name for o in store.list("a/b/")] == ["a/b/c"]
    assert list(store.list("nothing/")) == []
    assert list(store.list("../")) == []
    etags = {o.name: o.etag for o in listed}
    assert etags["z"] == store.head("z").etag  # type: ignore[union-attr]


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put("d/x", b"1")
    store.delete("d/x")
    store.delete("d/x")
    store.delete("never/was")
    assert store.head("d/x") is None
    with pytest.raises(ObjectMissingError):
        store.get("d/x")
    assert list(store.list("d/")) == []


@pytest.mark.parametrize(
    "bad", ["", "/a", "a/", "a//b", "a/../b", "./a", ".hidden", "a/.b", "a\0b"]
)
def test_invalid_names_are_refused(store: ObjectStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.put(bad, b"x")
    with pytest.raises(ValueError):
        store.get(bad)


# --- conditional writes ------------------------------------------------------------------


def test_if_none_match(store: ObjectStore) -> None:
    etag = store.put("lease", b"mine", if_none_match=True)
    with pytest.raises(PreconditionFailedError):
        store.put("lease", b"theirs", if_none_match=True)
    assert store.get_with_etag("lease") == (b"mine", etag)


def test_if_match(store: ObjectStore) -> None:
    old = store.put("lease", b"v1")
    new = store.put("lease", b"v2", if_match=old)
    with pytest.raises(PreconditionFailedError):
        store.put("lease", b"stale", if_match=old)
    assert store.get("lease") == b"v2"
    assert store.put("lease", b"v3", if_match=new)
    with pytest.raises(PreconditionFailedError):
        store.put("missing", b"x", if_match=new)
    with pytest.raises(ValueError):
        store.put("lease", b"x", if_none_match=True, if_match=new)


def test_concurrent_creates_have_one_winner(store: ObjectStore) -> None:
    for round_ in range(3):
        name = f"race/{round_}"
        barrier = threading.Barrier(8)
        winners: list[int] = []
        losers: list[int] = []

        def contend(
            i: int,
            name: str = name,
            barrier: threading.Barrier = barrier,
            winners: list[int] = winners,
            losers: list[int] = losers,
        ) -> None:
            barrier.wait()
            try:
                store.put(name, f"writer {i}".encode(), if_none_match=True)
                winners.append(i)
            except PreconditionFailedError:
                losers.append(i)

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(winners) == 1 and len(losers) == 7
        assert store.get(name) == f"writer {winners[0]}".encode()


def test_compare_and_swap_loses_no_update(store: ObjectStore) -> None:
    store.put("counter", b"0")

    def bump(times: int) -> None:
        for _ in range(times):
            while True:
                data, etag = store.get_with_etag("counter")
                try:
                    store.put("counter", str(int(data) + 1).encode(), if_match=etag)
                    break
                except PreconditionFailedError:
                    continue

    threads = [threading.Thread(target=bump, args=(5,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert store.get("counter") == b"20"


# --- open_store ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "",
        "bucket",
        "/abs/path",
        "file:relative",
        "file://relative/dir",
        "file://host/abs",
        "file:///tmp/x?y=1",
        "ftp://host/x",
        "s3://",
        "s3:///prefix",
        "s3://bucket?versionId=1",
        "s3://bucket/a/../b",
        "s3://bucket/a//b",
        "s3://bu cket",
        "memory://",
        "memory://a/b",
    ],
)
def test_bad_sources(source: str) -> None:
    with pytest.raises(BadSourceError) as err:
        open_store(source)
    assert "\n" not in str(err.value)


def test_good_sources(tmp_path: Path) -> None:
    local = open_store(f"file://{tmp_path}/vault")
    assert isinstance(local, LocalStore) and local.root == f"{tmp_path}/vault"
    assert not (tmp_path / "vault").exists()  # opening creates nothing
    name = f"shared-{uuid.uuid4().hex}"
    one, two = open_store(f"memory://{name}"), open_store(f"memory://{name}")
    assert isinstance(one, MemoryStore)
    one.put("k", b"v")
    assert two.get("k") == b"v"
    assert list(open_store(f"memory://{name}-other").list()) == []


def test_s3_source_prefix_is_normalised() -> None:
    from encfs_cloud.store.s3 import S3Store

    # Opening an S3 store makes no request, so no server is needed here.
    opts = StoreOptions(
        endpoint_url="http://127.0.0.1:9", access_key="k", secret_key="s", region="us-east-1"
    )
    cases = [("s3://bkt", ""), ("s3://bkt/", ""), ("s3://bkt/p/q", "p/q/"), ("s3://bkt/p/", "p/")]
    for source, prefix in cases:
        s = open_store(source, opts)
        assert isinstance(s, S3Store) and (s.bucket, s.prefix) == ("bkt", prefix)
        s.close()


# --- S3 specifics -------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_prefixes_are_isolated(s3_bucket: str) -> None:
    p1, p2, root = (
        open_store(f"{s3_bucket}/p1"),
        open_store(f"{s3_bucket}/p2"),
        open_store(s3_bucket),
    )
    p1.put("x", b"one")
    p2.put("x", b"two")
    p2.put("y", b"2")
    assert [o.name for o in p1.list()] == ["x"]
    assert [o.name for o in p2.list()] == ["x", "y"]
    assert p1.get("x") == b"one" and p2.get("x") == b"two"
    assert [o.name for o in root.list()] == ["p1/x", "p2/x", "p2/y"]
    p1.delete("y")
    assert p2.head("y") is not None


@pytest.mark.s3
def test_s3_list_pages(s3_bucket: str) -> None:
    from encfs_cloud.store.s3 import S3Store

    store = S3Store(s3_bucket.removeprefix("s3://"), "pg/", page_size=2)
    for i in range(7):
        store.put(f"o{i}", b"")
    assert [o.name for o in store.list()] == [f"o{i}" for i in range(7)]


@pytest.mark.s3
def test_s3_wrong_credentials(s3_bucket: str, s3_env: MotoServer) -> None:
    store = open_store(s3_bucket, StoreOptions(access_key="AKIAWRONG", secret_key="nope"))
    with s3_env.enforce_auth():
        for call in (
            lambda: store.get("x"),
            lambda: store.put("x", b"1"),
            lambda: list(store.list()),
        ):
            with pytest.raises(CredentialsError) as err:
                call()
            assert "AWS_ACCESS_KEY_ID" in str(err.value)


@pytest.mark.s3
def test_s3_no_credentials(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CredentialsError, match="AWS_ACCESS_KEY_ID"):
        open_store(s3_bucket).get("x")


@pytest.mark.s3
def test_s3_missing_bucket(s3_env: MotoServer) -> None:
    store = open_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/pre")
    for call in (
        lambda: store.get("x"),
        lambda: store.head("x"),
        lambda: store.put("x", b"1"),
        lambda: list(store.list()),
    ):
        with pytest.raises(NoFilesystemError, match="does not exist"):
            call()


def test_s3_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    opts = StoreOptions(
        endpoint_url=endpoint,
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        connect_timeout=0.5,
        max_attempts=3,
        backoff_base=0.05,
    )
    began = time.monotonic()
    with pytest.raises(UnreachableError, match=endpoint):
        open_store("s3://bucket/x", opts).get("y")
    assert time.monotonic() - began < 30  # generous: "does not hang"


# --- the local folder specifics ------------------------------------------------------------


def test_local_missing_root(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/new")
    assert list(store.list()) == [] and store.head("x") is None
    store.delete("x")
    with pytest.raises(ObjectMissingError):
        store.get("x")
    assert not (tmp_path / "new").exists()
    store.put("a/b", b"1")  # the root's parent exists, so the root is created
    assert store.get("a/b") == b"1"
    with pytest.raises(BadSourceError):
        open_store(f"file://{tmp_path}/no/such/parent").put("x", b"1")


def test_local_hides_temp_and_lock_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(f"file://{tmp_path}")
    store.put("keep", b"1", if_none_match=True)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / ".tmp-leftover").write_bytes(b"partial")

    def crash(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk on fire"):
        store.put("dir/new", b"data")
    monkeypatch.undo()
    assert [o.name for o in store.list()] == ["keep"]
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == [".tmp-leftover"]
    assert (tmp_path / ".encfs-cloud-lock").exists()


def test_local_etag_follows_outside_changes(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    etag = store.put("o", b"old")
    path = tmp_path / "o"
    path.write_bytes(b"changed behind our back")
    os.utime(path, ns=(1, 1))
    info = store.head("o")
    assert info is not None and info.etag != etag
    with pytest.raises(PreconditionFailedError):
        store.put("o", b"x", if_match=etag)


def test_local_name_clash_is_an_error(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    store.put("a", b"file")
    with pytest.raises(StoreError, match="not a folder"):
        store.put("a/b", b"x")
    store.put("d/e", b"x")
    with pytest.raises(StoreError, match="folder"):
        store.put("d", b"x")


_CONTENDER = """
import os, sys, time
from encfs_cloud.errors import PreconditionFailedError
from encfs_cloud.store import open_store
store = open_store(sys.argv[1])
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
try:
    store.put("lease", sys.argv[3].encode(), if_none_match=True)
    print("won")
except PreconditionFailedError:
    print("lost")
"""


def test_local_conditional_create_across_processes(tmp_path: Path) -> None:
    url, go = f"file://{tmp_path}/b", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, url, str(go), str(i)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    time.sleep(0.3)  # let them all reach the barrier; correctness does not depend on it
    go.touch()
    results = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(results) == ["lost"] * 5 + ["won"]
    winner = results.index("won")
    assert open_store(url).get("lease") == str(winner).encode()
