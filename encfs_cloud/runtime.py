"""Process plumbing for mounts: daemonizing, readiness, the local registry of mounts, logging."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import logging.handlers
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import EncfsCloudError, MountpointError

log = logging.getLogger(__name__)


# --- daemonizing -------------------------------------------------------------------------


def daemonize(child: Callable[[int], int]) -> int:
    """Fork; the child runs `child(notify_fd)` detached, the parent waits for its verdict.

    The parent returns 0 once the child reports the mount ready, or the child's exit code
    after printing its one-line error.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        code = 1
        try:
            code = child(write_fd)
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    if message.startswith("OK"):
        return 0
    if message.startswith("ERR "):
        _, code_text, text = message.split(" ", 2)
        print(f"mount.encfs-cloud: {text.strip()}", file=sys.stderr)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return int(code_text)
    _, status = os.waitpid(pid, 0)
    print("mount.encfs-cloud: the daemon exited during start-up; see its log", file=sys.stderr)
    return os.waitstatus_to_exitcode(status) or 1


def notify_ready(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, b"OK\n")
            os.close(fd)
    sd_notify("READY=1")


def notify_error(fd: int, code: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"ERR {code} {message.splitlines()[0] if message else ''}\n".encode())
        os.close(fd)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state, if it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())


# --- the registry of local mounts ------------------------------------------------------------


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        base = Path("/run/encfs-cloud")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "encfs-cloud"
    else:
        base = Path(f"/tmp/encfs-cloud-{os.getuid()}")
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base


def _entry_path(mountpoint: Path) -> Path:
    # abspath, not resolve(): resolving stats the mount point, and a daemon that stats its
    # own mount point before serving requests deadlocks.
    key = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:24]
    return runtime_dir() / f"{key}.json"


def register(mountpoint: Path, pid: int, source: str) -> None:
    path = _entry_path(mountpoint)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid, "mountpoint": os.path.abspath(mountpoint)}))
    os.replace(tmp, path)


def unregister(mountpoint: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        _entry_path(mountpoint).unlink()


def daemon_pid(mountpoint: Path) -> int | None:
    try:
        entry = json.loads(_entry_path(mountpoint).read_text())
    except (FileNotFoundError, ValueError):
        return None
    pid = int(entry["pid"])
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


# --- unmounting -------------------------------------------------------------------------------


def fusermount(mountpoint: Path, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def lazy_unmount(mountpoint: Path) -> None:
    fusermount(mountpoint, lazy=True)


def unmount(mountpoint: Path, timeout: float | None = None) -> None:
    """Unmount and wait until the daemon has put everything in the bucket and exited."""
    mountpoint = mountpoint.absolute()
    pid = daemon_pid(mountpoint)
    if not os.path.ismount(mountpoint):
        raise MountpointError(f"{mountpoint} is not mounted")
    done = fusermount(mountpoint)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        if "busy" in reason.lower():
            raise MountpointError(f"{mountpoint} is busy: close the files and shells using it")
        raise EncfsCloudError(f"could not unmount {mountpoint}: {reason}")
    if pid is None:
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    while _alive(pid):
        if deadline is not None and time.monotonic() > deadline:
            raise EncfsCloudError(f"the daemon (pid {pid}) is still flushing; it will finish alone")
        time.sleep(0.05)


# --- logging ----------------------------------------------------------------------------------


def setup_logging(log_file: str | None, debug: bool, *, foreground: bool) -> None:
    """Log to a file, to stderr in the foreground, or to syslog/journald as a daemon."""
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif Path("/dev/log").exists():
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.ident = "encfs-cloud: "
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # boto at debug level would log request bodies and headers: keep it quiet.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
