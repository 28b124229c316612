"""One benchmark run of one system: four mount sessions, every workload, every cleanup."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_cache import CACHE_METRICS, run_cache_cases
from bench_systems import System
from bench_util import SCRIPTS, BenchError, drop_caches, log, rmtree, run, tail, venv_bin

WORKLOADS = ["write", "read", "untar", "ls", "fio", "rename", "cache", "rss", "multiwriter"]
TEST_DIRS = {"test", "tests", "idle_test"}


@dataclass
class Config:
    """Sizes and durations of the workloads (all overridable from the command line)."""

    size_mib: int = 256
    fio_seconds: int = 15
    fio_jobs: int = 1
    rename_files: int = 1000
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    step_timeout: float = 900.0


@dataclass
class Tree:
    """The source tree to untar: a tarball plus what a complete extraction must contain."""

    tarball: Path
    files: int
    dirs: int
    nbytes: int
    note: str


def build_tree(workdir: Path, max_files: int = 0, min_files: int = 2000) -> Tree:
    """Tar the running interpreter's standard library (no __pycache__, site-packages, libpython.a).

    Test directories are left out unless that leaves fewer than min_files files: CPython's
    stdlib without its tests is under a thousand files, too few to show per-file costs, so the
    tests (real source too) are kept to reach the few thousand files the design figures use.
    Symlinks are skipped (rclone mounts do not store them by default).
    """
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])

    def walk(skip_tests: bool) -> list[Path]:
        out: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(stdlib):
            dirnames[:] = sorted(
                d
                for d in dirnames
                if d not in {"__pycache__", "site-packages"}
                and not d.startswith("config-")
                and not (skip_tests and d in TEST_DIRS)
            )
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if not p.is_symlink() and p.is_file():
                    out.append(p)
        return out

    files = walk(skip_tests=True)
    note = "stdlib minus __pycache__/site-packages/config-*/test dirs"
    if len(files) < min_files:
        files = walk(skip_tests=False)
        note = "stdlib minus __pycache__/site-packages/config-* (tests kept: too few files without)"
    if max_files and len(files) > max_files:
        files = files[:max_files]
        note += f", first {max_files} files"
    tarball = workdir / "tree.tar"
    dirs: set[str] = set()
    nbytes = 0
    with tarfile.open(tarball, "w", format=tarfile.PAX_FORMAT) as tar:
        for p in files:
            rel = p.relative_to(stdlib)
            for parent in reversed(rel.parents[:-1]):
                if str(parent) not in dirs:
                    dirs.add(str(parent))
                    info = tar.gettarinfo(str(stdlib / parent), arcname=f"tree/{parent}")
                    tar.addfile(info)
            tar.add(str(p), arcname=f"tree/{rel}", recursive=False)
            nbytes += p.stat().st_size
    return Tree(tarball, len(files), len(dirs) + 1, nbytes, f"{note}, from {stdlib}")


Result = dict[str, Any]


class Runner:
    """Runs the workload sequence for one (system, run) and collects metric -> value/error."""

    def __init__(self, system: System, cfg: Config, tree: Tree, run_dir: Path) -> None:
        self.sys = system
        self.cfg = cfg
        self.tree = tree
        self.run_dir = run_dir
        self.values: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.notes: list[str] = []
        self.rss_kib = 0
        self.gave_up = ""
        self.size = cfg.size_mib << 20
        self.big = "big.bin"
        self.server_cpu = 0.0  # S3 server CPU seconds and requests over the counted steps
        self.server_reqs = 0

    # -- small tools ----------------------------------------------------------------------
    def want(self, workload: str) -> bool:
        return workload in self.cfg.workloads

    def io(self, *args: str) -> dict[str, Any]:
        """Run one bench_io.py step in a child process and return its JSON."""
        cmd = [str(venv_bin() / "python"), str(SCRIPTS / "bench_io.py"), *args]
        proc = run(cmd, timeout=self.cfg.step_timeout)
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    def timed(self, cmd: list[str], capture: bool = False) -> tuple[float, str]:
        """Wall time of an external command (output discarded unless captured)."""
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=self.cfg.step_timeout,
                text=True,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"{cmd[0]} timed out after {self.cfg.step_timeout:.0f}s") from None
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise BenchError(f"{cmd[0]} exited {proc.returncode}: {tail(proc.stderr)}")
        return elapsed, proc.stdout or ""

    def sample_rss(self) -> None:
        with contextlib.suppress(OSError):
            self.rss_kib = max(self.rss_kib, self.sys.peak_rss_kib())

    def s3_mark(self) -> tuple[float, int, float] | None:
        """S3 server CPU seconds, requests served so far and the time (None: no counts)."""
        srv = self.sys.env.s3
        if not self.sys.uses_s3 or srv is None:
            return None
        reqs = srv.requests()
        return (srv.cpu(), sum(reqs.values()), time.monotonic()) if reqs else None

    def s3_count(self, metric: str, since: tuple[float, int, float] | None) -> None:
        """Record the S3 requests made since the mark as metric; add to the CPU/request tally
        (less the server's idle CPU over the same time)."""
        now = self.s3_mark()
        srv = self.sys.env.s3
        if since is None or now is None or srv is None:
            return
        self.values[metric] = now[1] - since[1]
        idle = srv.idle_cpu_per_s * (now[2] - since[2])
        self.server_cpu += max(0.0, now[0] - since[0] - idle)
        self.server_reqs += now[1] - since[1]

    def stored(self) -> int | None:
        """Bytes in the system's backing store, or None (logged) if it cannot be measured."""
        try:
            return self.sys.stored_bytes()
        except Exception as exc:  # a listing failure must not lose the timings
            self.notes.append(f"stored bytes unknown: {type(exc).__name__}: {exc}"[:300])
            return None

    def unmount_durable(self) -> float:
        """Seconds until unmounted and durable (plus sync(2) for local-directory systems)."""
        self.sample_rss()
        t0 = time.perf_counter()
        self.sys.unmount()
        if self.sys.local:
            os.sync()
        return time.perf_counter() - t0

    def cold_remount(self) -> float:
        """Drop caches, forget local caches, mount again; return the mount time."""
        note = drop_caches()
        if note and note not in self.notes:
            self.notes.append(note)
        self.sys.forget_local_cache()
        t0 = time.perf_counter()
        self.sys.mount()
        return time.perf_counter() - t0

    def session(self, name: str, metrics: list[str], body: Callable[[], None]) -> bool:
        """Run one mount session; on failure mark its unmeasured metrics with the error."""
        if self.gave_up:
            for m in metrics:
                if m not in self.values:
                    self.errors.setdefault(m, f"{name}: {self.gave_up}")
            return False
        try:
            body()
            return True
        except BenchError as exc:
            msg = f"{name}: {exc}"
        except Exception as exc:  # a bug or an odd OSError must not stop the other systems
            msg = f"{name}: {type(exc).__name__}: {exc}"
        daemon_log = self.sys.log_tail()
        if daemon_log:
            msg += f" [daemon log: {daemon_log}]"
        if "timed out" in msg:
            self.gave_up = f"skipped after a timeout in {name}"
        log(f"{self.sys.key}: {msg}")
        for m in metrics:
            if m not in self.values:
                self.errors.setdefault(m, msg)
        try:
            self.sys.cleanup(destroy=False)
        except Exception as exc:
            self.notes.append(f"cleanup after {name} failed: {exc}")
        return False

    # -- the sequence ---------------------------------------------------------------------
    def run(self) -> Result:
        """prepare; write; cold read + untar; find/ls + fio + rename setup; rename."""
        need_big = any(self.want(w) for w in ("write", "read", "fio"))
        need_tree = self.want("untar") or self.want("ls")
        need_ren = self.want("rename")
        big_ok = tree_ok = ren_ok = False
        stored_big: int | None = None
        all_metrics = [m for w in self.cfg.workloads for m in WORKLOAD_METRICS.get(w, [])]
        if not self.session("prepare", all_metrics, lambda: self.sys.prepare(self.run_dir)):
            return self.result()
        mnt = self.sys.mnt

        # Session 1: sequential write, timed until fsync and until the unmount is durable.
        def s1() -> None:
            nonlocal big_ok, stored_big
            mark = self.s3_mark()
            self.sys.mount()
            out = self.io("write", str(mnt / self.big), str(self.size))
            durable = out["close_s"] + self.unmount_durable()
            big_ok = True
            if self.want("write"):
                self.values["write_fsync_MBps"] = self.size / out["fsync_s"] / 1e6
                self.values["write_durable_MBps"] = self.size / durable / 1e6
                self.s3_count("write_requests", mark)
                stored_big = self.stored()
                if stored_big is not None:
                    self.values["stored_ratio_file"] = stored_big / self.size

        if need_big:
            self.session("write", ["write_fsync_MBps", "write_durable_MBps"], s1)

        # Session 2: cold sequential read, then untar until durable.
        s2_metrics = ["mount_cold_s", "read_cold_MBps", "untar_s", "untar_durable_s"]

        def s2() -> None:
            nonlocal tree_ok
            self.values["mount_cold_s"] = self.cold_remount()
            if self.want("read"):
                if not big_ok:
                    raise BenchError("no file to read (write failed)")
                mark = self.s3_mark()
                out = self.io("read", str(mnt / self.big))
                if out["bytes"] != self.size:
                    raise BenchError(f"read {out['bytes']} bytes, wrote {self.size}")
                self.values["read_cold_MBps"] = self.size / out["s"] / 1e6
                self.s3_count("read_requests", mark)
            if need_tree:
                before = self.stored() if self.want("untar") else None
                mark = self.s3_mark()
                untar, _ = self.timed(
                    ["tar", "--no-same-owner", "-xf", str(self.tree.tarball), "-C", str(mnt)]
                )
                total = untar + self.unmount_durable()
                tree_ok = True
                if self.want("untar"):
                    self.values["untar_s"] = untar
                    self.values["untar_durable_s"] = total
                    self.s3_count("untar_requests", mark)
                    after = self.stored()
                    if before is not None and after is not None and self.tree.nbytes:
                        self.values["stored_ratio_tree"] = (after - before) / self.tree.nbytes
            else:
                self.unmount_durable()

        if self.want("read") or need_tree:
            self.session("read+untar", s2_metrics, s2)

        # Session 3: find and ls -lR over the cold tree, fio random reads, rename setup.
        s3_metrics = ["find_s", "ls_lR_s", "find_ls_s", "fio_iops"]

        def s3() -> None:
            nonlocal ren_ok
            self.cold_remount()
            if self.want("ls"):
                if not tree_ok:
                    raise BenchError("no tree to list (untar failed)")
                t_find, listing = self.timed(["find", str(mnt / "tree")], capture=True)
                expected = self.tree.files + self.tree.dirs
                found = len(listing.splitlines())
                if found != expected:
                    raise BenchError(f"find saw {found} entries, the tarball has {expected}")
                t_ls, _ = self.timed(["ls", "-lR", str(mnt / "tree")])
                self.values.update(find_s=t_find, ls_lR_s=t_ls, find_ls_s=t_find + t_ls)
            if self.want("fio"):
                try:
                    if not big_ok:
                        raise BenchError("no file to read (write failed)")
                    self.values["fio_iops"] = self.fio(mnt / self.big)
                except BenchError as exc:
                    self.errors["fio_iops"] = f"fio: {exc}"
            if need_ren:
                self.io("mkfiles", str(mnt / "ren" / "src"), str(self.cfg.rename_files), "1024")
            self.unmount_durable()
            ren_ok = need_ren

        if self.want("ls") or self.want("fio") or need_ren:
            self.session("find+ls+fio", [*s3_metrics, "rename_ms"], s3)

        # Session 4: rename(2) of the directory holding rename_files files.
        def s4() -> None:
            if not ren_ok:
                raise BenchError("rename directory was not created")
            self.cold_remount()
            out = self.io("rename", str(mnt / "ren" / "src"), str(mnt / "ren" / "dst"))
            self.values["rename_ms"] = out["s"] * 1000
            if out["entries"] != self.cfg.rename_files:
                self.notes.append(
                    f"only {out['entries']} of {self.cfg.rename_files} entries were visible in "
                    "the renamed directory right after rename(2) returned"
                )
            self.values["rename_durable_s"] = out["s"] + self.unmount_durable()

        if need_ren:
            self.session("rename", ["rename_ms", "rename_durable_s"], s4)

        if self.want("cache"):
            run_cache_cases(self, big_ok)
        if self.server_reqs:
            self.values["server_cpu_ms_per_req"] = self.server_cpu * 1000 / self.server_reqs
            self.values["server_cpu_s"] = self.server_cpu
        if self.want("rss"):
            if self.rss_kib:
                self.values["rss_MiB"] = self.rss_kib / 1024
            else:
                self.errors.setdefault("rss_MiB", "daemon peak RSS unknown")
        return self.result()

    def fio(self, path: Path) -> float:
        """4 KiB random reads for fio_seconds; O_DIRECT so every read reaches the filesystem."""
        base = [
            "fio",
            "--name=randread",
            f"--filename={path}",
            "--rw=randread",
            "--bs=4k",
            "--ioengine=psync",
            f"--numjobs={self.cfg.fio_jobs}",
            "--group_reporting",
            "--time_based",
            f"--runtime={self.cfg.fio_seconds}",
            f"--size={self.size}",
            "--readonly",
            "--output-format=json",
        ]
        last = ""
        for direct in (1, 0):
            proc = subprocess.run(
                [*base, f"--direct={direct}"],
                capture_output=True,
                text=True,
                timeout=self.cfg.fio_seconds + self.cfg.step_timeout,
                stdin=subprocess.DEVNULL,
            )
            start = proc.stdout.find("{")
            if proc.returncode == 0 and start >= 0:
                data = json.loads(proc.stdout[start:])
                iops = float(data["jobs"][0]["read"]["iops"])
                if direct == 0:
                    self.notes.append("fio ran buffered: the mount refused O_DIRECT")
                return iops
            last = tail(proc.stderr or proc.stdout)
        raise BenchError(last or "fio failed")

    def result(self) -> Result:
        return {
            "values": self.values,
            "errors": self.errors,
            "notes": self.notes,
        }


WORKLOAD_METRICS: dict[str, list[str]] = {
    "write": [
        "write_fsync_MBps",
        "write_durable_MBps",
        "write_requests",
        "stored_ratio_file",
        "server_cpu_ms_per_req",
        "server_cpu_s",
    ],
    "read": ["read_cold_MBps", "mount_cold_s", "read_requests", "server_cpu_ms_per_req"],
    "untar": ["untar_s", "untar_durable_s", "untar_requests", "stored_ratio_tree"],
    "ls": ["find_s", "ls_lR_s", "find_ls_s"],
    "fio": ["fio_iops"],
    "rename": ["rename_ms", "rename_durable_s"],
    "cache": CACHE_METRICS,
    "rss": ["rss_MiB"],
}


def run_once(system: System, cfg: Config, tree: Tree, run_dir: Path) -> Result:
    """One run of one system in its own directory; always leaves nothing mounted or running."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        result = Runner(system, cfg, tree, run_dir).run()
    finally:
        try:
            system.cleanup()
        finally:
            rmtree(run_dir)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    return result


if __name__ == "__main__":
    sys.exit("run scripts/bench.py")
