"""Fixtures that run the real CLI: simulated devices, initialized filesystems and real mounts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ENCFS = str(BIN / "encfs-cloud")
MOUNT = str(BIN / "mount.encfs-cloud")

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse and root"
)


@dataclass
class Device:
    """One simulated device: its own XDG_DATA_HOME, and the CLI run with it."""

    home: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def cache_home(self) -> Path:
        """This device's XDG_CACHE_HOME (the sealed disk cache), next to its data home."""
        return self.home.with_name(self.home.name + "-cache")

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["XDG_DATA_HOME"] = str(self.home)
        env["XDG_CACHE_HOME"] = str(self.cache_home)
        env.setdefault("ENCFS_CLOUD_TEST_FAST_KDF", "1")
        env.update(self.extra_env)
        return env

    def run(
        self, *args: str, input: str | None = None, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run `encfs-cloud ARGS` (or `mount.encfs-cloud` if args[0] is MOUNT)."""
        cmd = list(args) if args and args[0] in (MOUNT, ENCFS) else [ENCFS, *args]
        done = subprocess.run(
            cmd,
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def init(self, source: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("init", source, "--no-passphrase", *extra, check=True)

    def mount(
        self, source: str, mountpoint: Path, *options: str
    ) -> subprocess.CompletedProcess[str]:
        args = [MOUNT, source, str(mountpoint)]
        if options:
            args += ["-o", ",".join(options)]
        return self.run(*args)

    @contextlib.contextmanager
    def mounted(self, source: str, mountpoint: Path, *options: str) -> Iterator[Path]:
        """Mount for the body of a with-block; always unmounted afterwards, even on failure."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        done = self.mount(source, mountpoint, *options)
        if done.returncode != 0:
            raise AssertionError(f"mount failed ({done.returncode}): {done.stderr.strip()}")
        try:
            yield mountpoint
        finally:
            unmount(self, mountpoint)


def daemon_pids(mountpoint: Path) -> list[int]:
    """PIDs of mount daemons serving `mountpoint` (found by their command line)."""
    pids = []
    target = str(mountpoint)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"mount.encfs-cloud" in a for a in argv[:2]) and target.encode() in argv:
            pids.append(int(proc.name))
    return pids


def is_mounted(mountpoint: Path) -> bool:
    target = os.path.abspath(mountpoint)
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def unmount(device: Device, mountpoint: Path, timeout: float = 120) -> None:
    """Clean unmount through the CLI; if that fails, force it so no mount or daemon is left."""
    if not is_mounted(mountpoint):
        return
    try:
        done = device.run("umount", str(mountpoint), timeout=timeout)
        if done.returncode == 0 and not is_mounted(mountpoint):
            return
    except subprocess.TimeoutExpired:
        pass
    force_unmount(mountpoint)
    raise AssertionError(f"clean unmount of {mountpoint} failed; forced it")


def force_unmount(mountpoint: Path) -> None:
    """Last resort: abort the FUSE connection, lazily unmount, kill the daemon."""
    for pid in daemon_pids(mountpoint):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        dev = os.stat(mountpoint).st_dev
        abort = Path(f"/sys/fs/fuse/connections/{os.minor(dev)}/abort")
        if abort.exists():
            abort.write_text("1")
    subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, check=False)
    deadline = time.monotonic() + 10
    while is_mounted(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path / "device-a")


@pytest.fixture
def second_device(tmp_path: Path) -> Device:
    return Device(tmp_path / "device-b")


@pytest.fixture
def local_source(tmp_path: Path) -> str:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    return f"file://{bucket}"


@pytest.fixture(params=["file", "s3"])
def any_source(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: over a local folder and over the local S3 server."""
    if request.param == "file":
        bucket = tmp_path / "bucket"
        bucket.mkdir()
        return f"file://{bucket}"
    return str(request.getfixturevalue("s3_bucket"))


@pytest.fixture
def mounted_fs(device: Device, local_source: str, tmp_path: Path) -> Iterator[Path]:
    """A fresh filesystem over file://, mounted for the test."""
    device.init(local_source)
    with device.mounted(local_source, tmp_path / "mnt") as mnt:
        yield mnt


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the session, nothing this session mounted under its temp folder may remain.

    Only this session's base temp folder: other pytest sessions may run at the same time.
    """
    yield
    base = str(tmp_path_factory.getbasetemp().resolve())
    with open("/proc/mounts") as mounts:
        left = [
            line.split()[1]
            for line in mounts
            if line.split()[2] == "fuse.encfs-cloud" and line.split()[1].startswith(base)
        ]
    for path in left:
        force_unmount(Path(path))
