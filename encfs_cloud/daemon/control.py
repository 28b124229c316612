"""The daemon's control socket: answers status requests from memory, never from the bucket."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from encfs_cloud import __version__
from encfs_cloud.daemon.controlclient import socket_path
from encfs_cloud.daemon.health import find_watch, iso
from encfs_cloud.data.compactor import ratio

if TYPE_CHECKING:
    from encfs_cloud.daemon.volume import Volume

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0  # a client that connects and says nothing must not pin a task forever
RATE_WINDOW = 5  # seconds of samples behind each transfer rate
PROTOCOL = 1


class Rates:
    """Transfer rates from counter samples taken once a second over a short window."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=RATE_WINDOW + 1)

    def sample(self) -> None:
        self.samples.append(
            (time.monotonic(), self.volume.uploader.bytes_uploaded, self.volume.data.bytes_fetched)
        )

    def current(self) -> tuple[float, float]:
        """(upload, download) in bytes per second over the window; 0 until two samples."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        (t0, up0, down0), (t1, up1, down1) = self.samples[0], self.samples[-1]
        span = max(t1 - t0, 1e-3)
        return (up1 - up0) / span, (down1 - down0) / span

    async def run(self) -> None:
        while True:
            self.sample()
            await trio.sleep(1.0)


def status(volume: Volume, mountpoint: Path, rates: Rates) -> dict[str, Any]:
    """Everything `encfs-cloud status` shows; only counters and sizes, never a name."""
    cache, uploader, data = volume.cache, volume.uploader, volume.data
    lookups = cache.hits + cache.misses
    up_rate, down_rate = rates.current()
    used_bytes, inodes = volume.md.usage()
    committer = volume.committer
    head = committer.head
    pending = list(uploader.pending.values())
    report: dict[str, Any] = {
        "protocol": PROTOCOL,
        "version": __version__,
        "pid": os.getpid(),
        "mountpoint": os.path.abspath(mountpoint),
        "source": volume.store.url,
        "read_only": volume.options.read_only,
        "files": {"inodes": inodes, "bytes": used_bytes},
        "cache": {
            "clean_bytes": cache.clean_bytes,
            "capacity": cache.capacity,
            "hits": cache.hits,
            "misses": cache.misses,
            "hit_rate": cache.hits / lookups if lookups else None,
        },
        "dirty": {
            "dirty_bytes": cache.dirty_bytes,
            "uploading_bytes": cache.inflight_bytes,
            "limit": cache.dirty_limit,
        },
        "transfers": {
            "uploads_in_flight": len(pending),
            "upload_bytes_in_flight": sum(p.size for p in pending),
            "downloads_in_flight": data.fetches_in_flight,
            "upload_rate": up_rate,
            "download_rate": down_rate,
            "bytes_uploaded": uploader.bytes_uploaded,
            "bytes_fetched": data.bytes_fetched,
        },
        "time": iso(time.time()),
        "last_commit": {
            "seq": head.seq,
            "time_ns": committer.last_commit_ns or None,  # None: no commit since mounting
            "time": iso(committer.last_commit_ns / 1e9) if committer.last_commit_ns else None,
            "commits_since_mount": committer.commits,
            "queued": len(committer.queue),
        },
        "key_generation": volume.unlocked.keys.current,
        "other_devices": {  # several writers: what this mount took from the others
            "commits_applied": volume.rebaser.applied,
            "conflicts": volume.rebaser.conflicts,
        },
        "errors": {
            "upload": uploader.errors + committer.errors,
            "read": data.store_errors,
            "integrity": data.integrity_errors,
        },
    }
    watch = find_watch(volume.store)
    if watch is not None:  # from memory: says the store is unreachable without asking it
        report["store"] = watch.report()
    stored, live = ratio(volume.md.all_packs())
    report["storage"] = {
        "live_bytes": live,  # sealed chunks the files use
        "stored_bytes": stored,  # packs in the bucket, padding and dead chunks included
        "packs_compacted": volume.compactor.packs_compacted,
        "bytes_compacted": volume.compactor.bytes_copied,
    }
    disk = volume.disk
    if disk is not None:
        report["disk_cache"] = {
            "folder": str(disk.folder),
            "bytes": disk.bytes,
            "capacity": disk.capacity,
            "spilled_bytes": disk.spill_bytes,  # sealed on disk now, waiting for upload
            "bytes_spilled": volume.uploader.bytes_spilled,  # since mounting
            "hits": disk.hits,
            "misses": disk.misses,
            "dropped": disk.dropped,
        }
    return report


async def _answer(
    stream: trio.SocketStream, volume: Volume, mountpoint: Path, rates: Rates
) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            raw = b""
            while b"\n" not in raw and len(raw) < MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                raw += chunk
            try:
                request = json.loads(raw.split(b"\n", 1)[0] or b"{}")
                op = request.get("op") if isinstance(request, dict) else None
            except ValueError:
                op = None
            reply: dict[str, Any]
            if op == "status":
                try:
                    reply = {"ok": True, "status": status(volume, mountpoint, rates)}
                except Exception:  # a status bug must never take the mount down with it
                    log.exception("control: status failed")
                    reply = {"ok": False, "error": "internal error; see the log"}
            else:
                reply = {"ok": False, "error": 'unknown request; send {"op": "status"}'}
            await stream.send_all(json.dumps(reply).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing to tell anyone
    finally:
        await stream.aclose()


async def serve(volume: Volume, mountpoint: Path) -> None:
    """Serve the control socket until cancelled; the socket file goes with us."""
    path = socket_path(mountpoint)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a daemon that died; the mount point was checked free
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        # Only our user may ask: the folder is 0700 already, the socket is 0600 as well.
        # (chmod, not umask: the umask is process-wide and worker threads create files.)
        os.chmod(path, 0o600)
    except OSError as exc:  # the mount works without it; only `status` will not
        log.warning("control socket unavailable: %s", exc)
        sock.close()
        return
    sock.listen(16)
    rates = Rates(volume)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rates.run)

            async def handler(stream: trio.SocketStream) -> None:
                await _answer(stream, volume, mountpoint, rates)

            await trio.serve_listeners(handler, [trio.SocketListener(sock)])
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
