"""The peer systems (passthrough, gocryptfs, rclone crypt) and the list of all systems."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import urllib.request
import uuid
from pathlib import Path

from bench_encfs import EncfsCloud, EncfsCloudFile
from bench_s3 import ACCESS_KEY, BUCKET, REGION, SECRET_KEY
from bench_system import Env, System
from bench_util import (
    SCRIPTS,
    BenchError,
    dir_bytes,
    free_port,
    rmtree,
    run,
    spawn,
    stop_proc,
    tail,
    tool,
    venv_bin,
    wait_mounted,
    wait_port,
)

__all__ = ["SYSTEM_NAMES", "Env", "System", "make_systems"]


class Passthrough(System):
    """scripts/passthrough.py over a local directory: the Python FUSE ceiling."""

    base = "passthrough"
    label = "pyfuse3 passthrough"
    local = True

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        self.src = run_dir / "src"
        self.src.mkdir()

    def mount(self) -> None:
        cmd = [
            str(venv_bin() / "python"),
            str(SCRIPTS / "passthrough.py"),
            str(self.src),
            str(self.mnt),
        ]
        proc = spawn(cmd, log_path=self.log_path)
        self.proc = proc
        self.pids = [proc.pid]
        try:
            wait_mounted(self.mnt, self.env.mount_timeout, proc)
        except BenchError as exc:
            raise BenchError(f"{exc}: {tail(self.log_path.read_text())}") from None

    def unmount(self) -> None:
        self._fusermount_and_wait()
        stop_proc(self.proc)

    def stored_bytes(self) -> int | None:
        return dir_bytes(self.src)


class Gocryptfs(System):
    """gocryptfs over a local directory (Go, kernel FUSE, AES-GCM)."""

    base = "gocryptfs"
    label = "gocryptfs"
    local = True

    def unavailable(self) -> str | None:
        return None if shutil.which("gocryptfs") else "gocryptfs not installed"

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        self.cipher = run_dir / "cipher"
        self.cipher.mkdir()
        run(["gocryptfs", "-init", "-q", "-extpass", "echo benchpw", str(self.cipher)], timeout=120)

    def mount(self) -> None:
        run(
            ["gocryptfs", "-q", "-extpass", "echo benchpw", str(self.cipher), str(self.mnt)],
            timeout=self.env.mount_timeout,
            output=self.log_path,
        )
        wait_mounted(self.mnt, self.env.mount_timeout)
        self._find_daemon()

    def unmount(self) -> None:
        self._fusermount_and_wait()

    def stored_bytes(self) -> int | None:
        return dir_bytes(self.cipher)


class RcloneCrypt(System):
    """rclone mount of a crypt remote over the S3 server, --vfs-cache-mode writes."""

    base = "rclone-crypt"
    label = "rclone crypt mount"
    uses_s3 = True
    _obscured = ""

    def unavailable(self) -> str | None:
        if tool("rclone") is None:
            return "rclone not installed"
        if self.env.s3 is None:
            return "no S3 server"
        return None

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        rclone = tool("rclone") or "rclone"
        if not RcloneCrypt._obscured:
            RcloneCrypt._obscured = run([rclone, "obscure", "benchpw"]).stdout.strip()
        self.prefix = f"rclone-{uuid.uuid4().hex[:12]}"
        self.conf = run_dir / "rclone.conf"
        self.conf.write_text(
            "[s3r]\ntype = s3\nprovider = Other\n"
            f"access_key_id = {ACCESS_KEY}\nsecret_access_key = {SECRET_KEY}\n"
            f"region = {REGION}\nendpoint = {self.s3_url}\nforce_path_style = true\n\n"
            f"[crypt]\ntype = crypt\nremote = s3r:{BUCKET}/{self.prefix}\n"
            f"password = {RcloneCrypt._obscured}\n"
        )
        self.cache_dir = run_dir / "rclone-cache"
        self.rc_port = 0

    def mount(self) -> None:
        rclone = tool("rclone") or "rclone"
        self.rc_port = free_port()
        cmd = [
            rclone,
            "mount",
            "crypt:",
            str(self.mnt),
            "--config",
            str(self.conf),
            "--vfs-cache-mode",
            "writes",
            "--vfs-write-back",
            self.env.rclone_write_back,
            "--cache-dir",
            str(self.cache_dir),
            "--rc",
            "--rc-addr",
            f"127.0.0.1:{self.rc_port}",
            "--rc-no-auth",
            "--log-level",
            "NOTICE",
        ]
        proc = spawn(cmd, log_path=self.log_path)
        self.proc = proc
        self.pids = [proc.pid]
        try:
            wait_mounted(self.mnt, self.env.mount_timeout, proc)
            wait_port(self.rc_port, self.env.mount_timeout, proc)
        except BenchError as exc:
            raise BenchError(f"{exc}: {tail(self.log_path.read_text())}") from None

    def _pending_uploads(self) -> int:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.rc_port}/vfs/stats", data=b"{}", method="POST"
        )
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            disk = json.load(resp).get("diskCache", {})
        return int(disk.get("uploadsInProgress", 0)) + int(disk.get("uploadsQueued", 0))

    def wait_uploads(self) -> None:
        """Wait until rclone's write-back queue is empty.

        rclone's fsync only reaches its disk cache; files are queued for upload when the
        (asynchronous) FUSE release arrives and uploaded --vfs-write-back later; and on unmount
        `rclone mount` exits without uploading what is still queued (checked: 300 files written,
        fewer than half in the bucket). So "durable" = this queue drained, then unmount. A short
        grace covers a release still in flight when the queue first reads empty; it only costs
        time when nothing was written.
        """
        deadline = time.monotonic() + self.env.unmount_timeout
        grace_end = time.monotonic() + 0.3
        seen = False
        while time.monotonic() < deadline:
            pending = self._pending_uploads()
            if pending:
                seen = True
            elif seen or time.monotonic() >= grace_end:
                return
            time.sleep(0.02)
        raise BenchError("rclone uploads still pending at the unmount timeout")

    def unmount(self) -> None:
        try:
            self.wait_uploads()
        except (OSError, ValueError) as exc:
            raise BenchError(f"rclone rc vfs/stats: {exc}") from None
        self._fusermount_and_wait()
        stop_proc(self.proc)

    def forget_local_cache(self) -> None:
        rmtree(self.cache_dir)

    def stored_bytes(self) -> int | None:
        return self._s3_stored()

    def cleanup(self, destroy: bool = True) -> None:
        super().cleanup(destroy)
        if destroy and self.env.s3 is not None and self.prefix:
            with contextlib.suppress(Exception):
                self.env.s3.delete_prefix(BUCKET, self.prefix)


SYSTEM_CLASSES: list[type[System]] = [
    EncfsCloud,
    RcloneCrypt,
    EncfsCloudFile,
    Gocryptfs,
    Passthrough,
]
SYSTEM_NAMES = [c.base for c in SYSTEM_CLASSES]


def make_systems(env: Env, only: list[str], rtts: list[float]) -> list[System]:
    """Instantiate the selected systems in interleaving order; S3 ones once per RTT."""
    out: list[System] = []
    for rtt in rtts:
        for cls in SYSTEM_CLASSES:
            if cls.base in only and cls.uses_s3:
                out.append(cls(env, rtt))
    for cls in SYSTEM_CLASSES:
        if cls.base in only and not cls.uses_s3:
            out.append(cls(env))
    return out
