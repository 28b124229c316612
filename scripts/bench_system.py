"""What every filesystem under test shares: the environment and the System base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench_s3 import BUCKET, S3Server
from bench_util import (
    BenchError,
    children,
    force_unmount,
    fusermount_u,
    is_mounted,
    pid_alive,
    pids_with_arg,
    remember_pid,
    stop_pid,
    tail,
    vm_hwm_kib,
    wait_pids_gone,
)


@dataclass
class Env:
    """What the systems share in one benchmark: temp root, S3 endpoint(s) and options."""

    workdir: Path
    s3: S3Server | None = None
    s3_urls: dict[float, str] = field(default_factory=dict)  # rtt_ms -> endpoint URL
    s3_throttled_url: str = ""  # the server behind a bandwidth-capped proxy (cache workload)
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

    def stored_bytes(self) -> int | None:
        """Bytes the backing store holds for this run (call when durable), None if unknown."""
        return None

    def _s3_stored(self) -> int | None:
        if self.env.s3 is None or not self.prefix:
            return None
        return self.env.s3.stored_bytes(BUCKET, self.prefix)

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
