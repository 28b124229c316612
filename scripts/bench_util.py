"""Process, mount and /proc helpers shared by the benchmark scripts."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent


class BenchError(Exception):
    """A step failed; the message becomes the error cell of the table."""


def log(msg: str) -> None:
    """Progress line on stderr (stdout carries the report)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def venv_bin() -> Path:
    """The bin/ directory of the project venv (falls back to the running interpreter's)."""
    candidate = REPO / ".venv" / "bin"
    if (candidate / "python").exists():
        return candidate
    return Path(sys.executable).parent


def tool(name: str) -> str | None:
    """Path of a tool, preferring the venv's copy."""
    local = venv_bin() / name
    if local.exists():
        return str(local)
    return shutil.which(name)


def tail(text: str | bytes | None, lines: int = 3, width: int = 300) -> str:
    """Last lines of some output, squeezed onto one line for an error cell."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-width:]


def run(
    cmd: Sequence[str],
    *,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    cwd: str | Path | None = None,
    output: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout, capturing output; raise BenchError on failure.

    With output=PATH the command writes to that file instead of pipes: needed for commands
    that daemonize, whose daemon could otherwise hold our pipe open until the timeout.
    """
    try:
        if output is None:
            proc = subprocess.run(
                list(cmd),
                capture_output=True,
                text=True,
                timeout=timeout,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
            )
        else:
            with open(output, "ab") as out:
                start = out.tell()
                rc = subprocess.run(
                    list(cmd),
                    stdout=out,
                    stderr=out,
                    timeout=timeout,
                    env=dict(env) if env is not None else None,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                ).returncode
            with open(output, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            proc = subprocess.CompletedProcess(list(cmd), rc, text, "")
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(cmd[0]).name} timed out after {timeout:.0f}s") from None
    except OSError as exc:
        raise BenchError(f"{cmd[0]}: {exc}") from None
    if check and proc.returncode != 0:
        raise BenchError(
            f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} exited {proc.returncode}: "
            f"{tail(proc.stderr) or tail(proc.stdout)}"
        )
    return proc


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} after {timeout:.0f}s")


# -- processes ----------------------------------------------------------------------------
_started: list[subprocess.Popen[bytes]] = []
_extra_pids: set[int] = set()


def spawn(
    cmd: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    stdout_pipe: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running helper; it is remembered and killed by kill_all()."""
    logf = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed by the OS
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else logf,
            stderr=logf,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except OSError as exc:
        raise BenchError(f"cannot start {cmd[0]}: {exc}") from None
    finally:
        logf.close()
    _started.append(proc)
    return proc


def remember_pid(pid: int) -> None:
    """Track a daemon we did not start directly (it forked away) for the final cleanup."""
    _extra_pids.add(pid)


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_pids_gone(pids: Iterable[int], timeout: float) -> bool:
    """Wait until every pid has exited; True if they all did."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in _started:
            p.poll()  # reap our own children so they do not linger as zombies
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.02)
    return not any(pid_alive(p) for p in pids)


def stop_pid(pid: int, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        if not pid_alive(pid):
            return
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
        wait_pids_gone([pid], wait)


def stop_proc(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop one helper we spawned and reap it."""
    if proc.poll() is None:
        stop_pid(proc.pid, grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2)


def kill_all() -> None:
    """Stop every helper and daemon this run started (by pid, never by name)."""
    for pid in list(_extra_pids):
        stop_pid(pid, 3.0)
    for proc in reversed(_started):
        stop_proc(proc, 3.0)


# -- /proc --------------------------------------------------------------------------------
def cmdline(pid: int) -> list[str]:
    """argv of a process, or [] if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def children(pid: int) -> list[int]:
    """All descendants of pid."""
    by_parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        by_parent.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pids_with_arg(arg: str) -> list[int]:
    """Processes (not us, not fusermount) whose argv contains arg: how a daemon is found."""
    me = os.getpid()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        argv = cmdline(int(entry))
        if not argv or Path(argv[0]).name.startswith("fusermount"):
            continue
        if any(a == arg or a.rstrip("/") == arg.rstrip("/") for a in argv):
            found.append(int(entry))
    return found


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of a process in KiB; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User+system CPU time a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- mounts -------------------------------------------------------------------------------
def mounted_under(root: Path) -> list[str]:
    """Mount points at or below root, deepest first."""
    out: list[str] = []
    prefix = str(root).rstrip("/")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        mnt = line.split()[4].replace("\\040", " ")
        if mnt == prefix or mnt.startswith(prefix + "/"):
            out.append(mnt)
    return sorted(out, key=len, reverse=True)


def is_mounted(path: Path) -> bool:
    """True if path is itself a mount point."""
    return str(path).rstrip("/") in mounted_under(path)


def wait_mounted(path: Path, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until a FUSE daemon has mounted path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(path):
            return
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"daemon exited with {proc.returncode} before mounting")
        time.sleep(0.02)
    raise BenchError(f"{path} not mounted after {timeout:.0f}s")


def fusermount_u(path: Path, timeout: float = 60.0) -> None:
    """Unmount with fusermount3 -u; raise BenchError if that fails."""
    fm = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    run([fm, "-u", str(path)], timeout=timeout)


def force_unmount(path: Path) -> None:
    """Last resort: abort the FUSE connection and lazily unmount."""
    fm = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    for args in (["-u"], ["-uz"]):
        if not is_mounted(path):
            return
        with contextlib.suppress(BenchError):
            run([fm, *args, str(path)], timeout=20, check=False)
    if is_mounted(path):
        with contextlib.suppress(BenchError):
            run(["umount", "-l", str(path)], timeout=20, check=False)


def unmount_all_under(root: Path) -> None:
    """Leave nothing mounted below root (used before removing temp dirs)."""
    for mnt in mounted_under(root):
        force_unmount(Path(mnt))


def rmtree(path: Path) -> None:
    """Remove a temp tree, never descending into something still mounted."""
    if not path.exists():
        return
    unmount_all_under(path)
    if mounted_under(path):
        log(f"not removing {path}: still mounted {mounted_under(path)}")
        return
    shutil.rmtree(path, ignore_errors=True)


def dir_bytes(root: Path) -> int:
    """Apparent size of every regular file below root (what a bucket would bill)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def drop_caches() -> str | None:
    """sync and drop the page/dentry/inode caches; return a note if that was impossible."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        return f"page caches not dropped ({exc.strerror}); cold reads may be warm"
    return None
