"""The disk-cache cases of issue #13, run on encfs-cloud over S3 when its mount has cache_dir."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench_util import BenchError, drop_caches

if TYPE_CHECKING:
    from bench_workloads import Runner

THROTTLE_MBPS = 20.0  # the slow store of the "copy at disk speed" case
CACHE_METRICS = ["read_cached_MBps", "read_cached_requests", "copy_throttled_MBps"]


def run_cache_cases(r: Runner, big_ok: bool) -> None:
    """A second cold read after a remount that keeps the disk cache; a copy (no fsync) onto
    a mount whose store is throttled. Other systems and older encfs-cloud builds skip them."""
    system = r.sys
    if system.base != "encfs-s3":
        return
    if not getattr(system, "has_disk_cache", False):
        r.notes.append("disk-cache cases skipped: mount.encfs-cloud has no cache_dir option")
        return
    mnt = system.mnt

    def cached_read() -> None:
        if not big_ok:
            raise BenchError("no file to read (write failed)")
        r.cold_remount()  # an empty disk cache ...
        r.io("read", str(mnt / r.big))  # ... filled by one read
        r.unmount_durable()
        note = drop_caches()
        if note and note not in r.notes:
            r.notes.append(note)
        system.mount()  # the disk cache is kept this time
        mark = r.s3_mark()
        out = r.io("read", str(mnt / r.big))
        if out["bytes"] != r.size:
            raise BenchError(f"read {out['bytes']} bytes, wrote {r.size}")
        r.values["read_cached_MBps"] = r.size / out["s"] / 1e6
        r.s3_count("read_cached_requests", mark)
        r.unmount_durable()

    r.session("disk-cache read", ["read_cached_MBps", "read_cached_requests"], cached_read)
    url = system.env.s3_throttled_url
    if system.rtt_ms or not url:
        return

    def throttled_copy() -> None:
        system.endpoint_override = url  # type: ignore[attr-defined]
        try:
            system.mount()
            out = r.io("write", str(mnt / "copy.bin"), str(r.size), "--no-fsync")
            r.values["copy_throttled_MBps"] = r.size / out["close_s"] / 1e6
            r.unmount_durable()  # umount still waits until the bucket has everything
        finally:
            system.endpoint_override = ""  # type: ignore[attr-defined]

    r.session("throttled copy", ["copy_throttled_MBps"], throttled_copy)
