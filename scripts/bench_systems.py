"""The filesystems under test: how each one is set up, mounted, unmounted and cleaned."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench_s3 import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, S3Server
from bench_util import (
    SCRIPTS,
    BenchError,
    children,
    force_unmount,
    free_port,
    fusermount_u,
    is_mounted,
    pid_alive,
    pids_with_arg,
    remember_pid,
    rmtree,
    run,
    spawn,
    stop_pid,
    stop_proc,
    tail,
    tool,
    venv_bin,
    vm_hwm_kib,
    wait_mounted,
    wait_pids_gone,
    wait_port,
)


@dataclass
class Env:
    """What the systems share in one benchmark: temp root, S3 endpoint(s) and options."""

    workdir: Path
    s3: S3Server | None = None
    s3_urls: dict[float, str] = field(default_factory=dict)  # rtt_ms -> endpoint URL
    cache_size_mib: int = 256
    encfs_opts: str = ""
    rclone_write_back: str = "100ms"
    mount_timeout: float = 60.0
    unmount_timeout: float = 600.0


class System:
    """Base class; one instance per (system, RTT) column, reused run after run."""

    base = ""
    label = ""
    uses_s3 = False
    # Local-directory systems: "durable" additionally includes a sync(2) of the backing disk.
    local = False
    # Key prefix of this run's data in the S3 bucket ("" when not on S3).
    prefix = ""

    def __init__(self, env: Env, rtt_ms: float = 0.0) -> None:
        self.env = env
        self.rtt_ms = rtt_ms
        self.run_dir = env.workdir
        self.mnt = env.workdir / "mnt"
        self.pids: list[int] = []
        self.log_path = env.workdir / "log"

    @property
    def key(self) -> str:
        return f"{self.base}@{self.rtt_ms:g}ms" if self.uses_s3 and self.rtt_ms else self.base

    @property
    def title(self) -> str:
        return f"{self.label} @{self.rtt_ms:g} ms RTT" if self.uses_s3 else self.label

    @property
    def s3_url(self) -> str:
        return self.env.s3_urls[self.rtt_ms]

    def unavailable(self) -> str | None:
        """None if the system can run here, else why not (shown as a skip note)."""
        return None

    def prepare(self, run_dir: Path) -> None:
        """Create a fresh, empty filesystem for one run."""
        self.run_dir = run_dir
        self.mnt = run_dir / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / f"{self.base}.log"

    def mount(self) -> None:
        raise NotImplementedError

    def unmount(self) -> None:
        """Unmount; return only when everything the system holds is in its backing store."""
        raise NotImplementedError

    def forget_local_cache(self) -> None:
        """Between unmount and a cold remount: drop on-disk caches a cold client would not have."""

    def log_tail(self) -> str:
        """The last lines of the daemon's log, for error cells."""
        try:
            return tail(self.log_path.read_text(errors="replace"), lines=3)
        except OSError:
            return ""

    def daemon_pids(self) -> list[int]:
        """The daemon(s) serving the mount, with their descendants."""
        out: list[int] = []
        for pid in self.pids:
            if pid_alive(pid):
                out.append(pid)
                out.extend(children(pid))
        return sorted(set(out))

    def peak_rss_kib(self) -> int:
        """Sum of VmHWM over the daemon processes (call while mounted)."""
        return sum(vm_hwm_kib(p) for p in self.daemon_pids())

    def cleanup(self, destroy: bool = True) -> None:
        """Whatever happened: unmount and stop daemons; with destroy, delete the backing data."""
        if is_mounted(self.mnt):
            force_unmount(self.mnt)
        for pid in self.pids:
            stop_pid(pid, 3.0)
        self.pids = []

    # helpers
    def _find_daemon(self) -> None:
        found = pids_with_arg(str(self.mnt))
        if not found:
            raise BenchError(f"no daemon process found for {self.mnt}")
        self.pids = found
        for pid in found:
            remember_pid(pid)

    def _fusermount_and_wait(self) -> None:
        pids = self.daemon_pids()
        fusermount_u(self.mnt, timeout=self.env.unmount_timeout)
        if not wait_pids_gone(pids, self.env.unmount_timeout):
            raise BenchError("daemon still running after unmount")


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

    def cleanup(self, destroy: bool = True) -> None:
        super().cleanup(destroy)
        if destroy and self.env.s3 is not None and self.prefix:
            with contextlib.suppress(Exception):
                self.env.s3.delete_prefix(BUCKET, self.prefix)


class EncfsCloud(System):
    """encfs-cloud through its installed commands (init, mount.encfs-cloud, umount)."""

    base = "encfs-s3"
    label = "encfs-cloud over S3"
    uses_s3 = True
    _probe: str | None = None
    _probed = False
    _has_log_option = False

    def unavailable(self) -> str | None:
        if self.uses_s3 and self.env.s3 is None:
            return "no S3 server"
        if not EncfsCloud._probed:
            EncfsCloud._probed = True
            EncfsCloud._probe = self._probe_cli()
        return EncfsCloud._probe

    @staticmethod
    def _probe_cli() -> str | None:
        for name in ("encfs-cloud", "mount.encfs-cloud"):
            if tool(name) is None:
                return f"{name} not installed (pip install -e . in the venv)"
        try:
            run([tool("encfs-cloud") or "encfs-cloud", "--help"], timeout=60)
            helptext = run([tool("mount.encfs-cloud") or "mount.encfs-cloud", "--help"]).stdout
        except BenchError as exc:
            return f"encfs-cloud not usable yet: {exc}"
        EncfsCloud._has_log_option = "log=FILE" in helptext
        return None

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["XDG_DATA_HOME"] = str(self.run_dir / "xdg-data")
        env["XDG_CACHE_HOME"] = str(self.run_dir / "xdg-cache")
        env["XDG_RUNTIME_DIR"] = str(self.run_dir / "xdg-runtime")
        if self.uses_s3 and self.env.s3 is not None:
            env.update(
                AWS_ACCESS_KEY_ID=ACCESS_KEY,
                AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                AWS_DEFAULT_REGION=REGION,
                AWS_ENDPOINT_URL=self.s3_url,
            )
            env.update(self.env.s3.client_env)
        return env

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        for sub in ("xdg-data", "xdg-cache", "xdg-runtime"):
            (run_dir / sub).mkdir(mode=0o700)
        if self.uses_s3:
            self.prefix = f"encfs-{uuid.uuid4().hex[:12]}"
            self.source = f"s3://{BUCKET}/{self.prefix}"
        else:
            self.store = run_dir / "store"
            self.store.mkdir()
            self.source = f"file://{self.store}"
        run(
            [
                tool("encfs-cloud") or "encfs-cloud",
                "init",
                self.source,
                "--no-passphrase",
                "--device-name",
                "bench",
            ],
            env=self._environ(),
            timeout=120,
        )

    def mount(self) -> None:
        opts = [f"cache_size={self.env.cache_size_mib}M"]
        if self.uses_s3:
            opts.append(f"endpoint_url={self.s3_url}")
        if EncfsCloud._has_log_option:
            opts.append(f"log={self.log_path}")
        if self.env.encfs_opts:
            opts.append(self.env.encfs_opts)
        cmd = [tool("mount.encfs-cloud") or "mount.encfs-cloud", self.source, str(self.mnt)]
        cmd += ["-o", ",".join(opts)]
        run(
            cmd,
            env=self._environ(),
            timeout=self.env.mount_timeout,
            output=self.run_dir / "mount.out",
        )
        wait_mounted(self.mnt, self.env.mount_timeout)
        self._find_daemon()

    def unmount(self) -> None:
        pids = self.daemon_pids()
        run(
            [tool("encfs-cloud") or "encfs-cloud", "umount", str(self.mnt)],
            env=self._environ(),
            timeout=self.env.unmount_timeout,
        )
        if not wait_pids_gone(pids, 60):
            raise BenchError("encfs-cloud daemon still running after umount returned")
        if is_mounted(self.mnt):
            raise BenchError("still mounted after encfs-cloud umount")

    def cleanup(self, destroy: bool = True) -> None:
        if is_mounted(self.mnt):
            with contextlib.suppress(BenchError):
                run(
                    [tool("encfs-cloud") or "encfs-cloud", "umount", str(self.mnt)],
                    env=self._environ(),
                    timeout=120,
                    check=False,
                )
        super().cleanup(destroy)
        if destroy and self.uses_s3 and self.env.s3 is not None and self.prefix:
            with contextlib.suppress(Exception):
                self.env.s3.delete_prefix(BUCKET, self.prefix)

    def forget_local_cache(self) -> None:
        # Sealed-object disk cache, if encfs-cloud keeps one under XDG_CACHE_HOME.
        cache = self.run_dir / "xdg-cache"
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(mode=0o700)


class EncfsCloudFile(EncfsCloud):
    """encfs-cloud over a local directory (file:// store)."""

    base = "encfs-file"
    label = "encfs-cloud over file://"
    uses_s3 = False
    local = True


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
