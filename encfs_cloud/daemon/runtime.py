"""Process plumbing for mounts: daemonizing, readiness, the local registry of mounts, logging."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import resource
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from encfs_cloud.errors import EncfsCloudError

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
    info = base.lstat()
    # In /tmp another user could create the folder first and plant entries that
    # `umount --wipe` would trust: use it only if it is ours and private.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise EncfsCloudError(f"{base} is not a private folder of this user; remove it")
    return base


def _entry_path(mountpoint: Path) -> Path:
    # abspath, not resolve(): resolving stats the mount point, and a daemon that stats its
    # own mount point before serving requests deadlocks.
    key = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:24]
    return runtime_dir() / f"{key}.json"


def registry_entry(mountpoint: Path) -> Path:
    """The registry file of a mount point; its control socket sits beside it (`.sock`)."""
    return _entry_path(mountpoint)


def register(mountpoint: Path, pid: int, source: str, fs_id: bytes | None = None) -> None:
    path = _entry_path(mountpoint)
    with contextlib.suppress(FileNotFoundError):  # an earlier mount's verdict is not ours
        _outcome_path(mountpoint).unlink()
    tmp = path.with_suffix(".tmp")
    entry = {"pid": pid, "mountpoint": os.path.abspath(mountpoint), "source": source}
    if fs_id is not None:  # lets `umount --wipe` and re-encryption find the filesystem
        entry["fs_id"] = fs_id.hex()
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, path)


def registered(mountpoint: Path) -> dict[str, object] | None:
    """The registry entry of a mount point (pid, mountpoint, source, fs_id), if any."""
    try:
        entry = json.loads(_entry_path(mountpoint).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def live_mounts() -> list[dict[str, object]]:
    """Registry entries of this machine's mounts whose daemon still runs."""
    found = []
    for path in runtime_dir().glob("*.json"):
        try:
            entry = json.loads(path.read_text())
            if isinstance(entry, dict) and pid_alive(int(entry["pid"])):
                found.append(entry)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def unregister(mountpoint: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        _entry_path(mountpoint).unlink()


def _outcome_path(mountpoint: Path) -> Path:
    return _entry_path(mountpoint).with_suffix(".outcome")


def report_outcome(mountpoint: Path, outcome: dict[str, object]) -> None:
    """Leave the final flush's verdict for the `umount` that waits for this daemon to exit.

    Written before the daemon exits and tagged with its pid, so the waiting command can tell
    it from a verdict an earlier mount left behind.
    """
    path = _outcome_path(mountpoint)
    tmp = path.with_suffix(".outcome-tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps({"pid": os.getpid(), **outcome}))
        os.replace(tmp, path)


def take_outcome(mountpoint: Path, pid: int) -> dict[str, object] | None:
    """The verdict daemon `pid` left for `mountpoint` (consumed), or None if it left none."""
    path = _outcome_path(mountpoint)
    try:
        outcome = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(outcome, dict) or outcome.get("pid") != pid:
        return None
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return outcome


def daemon_pid(mountpoint: Path) -> int | None:
    try:
        entry = json.loads(_entry_path(mountpoint).read_text())
    except (FileNotFoundError, ValueError):
        return None
    pid = int(entry["pid"])
    return pid if pid_alive(pid) else None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: assume alive, the safe side
    return stat.rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"])


# --- unmounting -------------------------------------------------------------------------------


def fusermount(mountpoint: Path, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def lazy_unmount(mountpoint: Path) -> None:
    fusermount(mountpoint, lazy=True)


# --- memory ---------------------------------------------------------------------------------

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def tame_malloc() -> None:
    """Keep the daemon's RSS close to what it really holds.

    glibc gives every thread its own arena and, after big buffers are freed, raises its
    mmap threshold so later 1 MiB chunk buffers come from arenas that rarely shrink: with
    eight transfer threads that alone adds 100+ MiB of RSS. Two arenas and a fixed 256 KiB
    threshold (big buffers always mmap'd, returned to the kernel on free) avoid both.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, 2)
        libc.mallopt(M_MMAP_THRESHOLD, 256 * 1024)


PR_SET_DUMPABLE = 4


def keep_secrets_off_disk() -> None:
    """No core dump (it would hold keys and plaintext) and no ptrace by other processes of
    this user. Swap is not covered: see docs/security.md."""
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
