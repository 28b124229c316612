"""The second S3 servers start, speak S3, behave as documented and leave no process behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.fixtures_servers import Server, fresh_bucket, start_rclone_s3

pytestmark = pytest.mark.s3


def _conditional_put_refused(server: Server, **condition: str) -> bool:
    client = server.client()
    with fresh_bucket(server) as url:
        bucket = url.removeprefix("s3://")
        client.put_object(Bucket=bucket, Key="k", Body=b"first")
        try:
            client.put_object(Bucket=bucket, Key="k", Body=b"second", **condition)  # type: ignore[arg-type]
        except ClientError as exc:
            return exc.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        return False


def test_seaweedfs_round_trip_and_enforces_conditional_writes(seaweedfs_server: Server) -> None:
    client = seaweedfs_server.client()
    with fresh_bucket(seaweedfs_server) as url:
        bucket = url.removeprefix("s3://")
        client.put_object(Bucket=bucket, Key="a/b", Body=b"0123456789")
        got = client.get_object(Bucket=bucket, Key="a/b", Range="bytes=2-4")["Body"].read()
        assert got == b"234"
    assert _conditional_put_refused(seaweedfs_server, IfNoneMatch="*")
    assert _conditional_put_refused(seaweedfs_server, IfMatch='"0"')


def test_rclone_ignores_conditional_writes(rclone_server: Server) -> None:
    assert not _conditional_put_refused(rclone_server, IfNoneMatch="*")
    assert not _conditional_put_refused(rclone_server, IfMatch='"0"')


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    server = start_rclone_s3(tmp_path)
    assert server.proc is not None
    pid = server.proc.pid
    server.client().list_buckets()
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
