"""The admin's habits: fstab, mount(8)/umount(8), systemd, status, progress, logs, help, man."""

from __future__ import annotations

import argparse
import ast
import contextlib
import errno
import inspect
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from encfs_cloud.cli import main as cli_main
from encfs_cloud.daemon import options
from encfs_cloud.errors import EXIT_CODES, EXIT_DAMAGED, EXIT_REPAIRED, EXIT_SOME_LOST
from tests.faultproxy import Fault, FaultProxy
from tests.fixtures_mount import (
    BIN,
    ENCFS,
    MOUNT,
    Device,
    daemon_pids,
    force_unmount,
    is_mounted,
    needs_fuse,
    unmount,
)
from tests.fixtures_s3 import MotoServer
from tests.test_programs import SharedMount, shared_mount

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
SECRET = "Zebra7Quokka"  # in every name and content of the workloads: must never be logged


def sh(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {done.returncode}: {done.stderr}")
    return done


# --- mount(8), umount(8) and /etc/fstab ------------------------------------------------------


@contextlib.contextmanager
def system_link(path: Path, target: Path) -> Iterator[None]:
    """`path` → `target` for the with-block; whatever was at `path` comes back afterwards."""
    old_link = os.readlink(path) if path.is_symlink() else None
    old_file = path.read_bytes() if old_link is None and path.exists() else None
    tmp = path.with_name(f".{path.name}.test-{os.getpid()}")
    tmp.symlink_to(target)
    os.replace(tmp, path)
    try:
        yield
    finally:
        path.unlink()
        if old_link is not None:
            path.symlink_to(old_link)
        elif old_file is not None:
            path.write_bytes(old_file)
            path.chmod(0o755)


@needs_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_fstab_mount_a_mount_dir_mount_t_and_umount(
    device: Device, s3_bucket: str, tmp_path: Path
) -> None:
    """The helpers in /sbin let mount(8) and umount(8) handle encfs-cloud like any fs."""
    device.init(s3_bucket)
    on_demand, at_boot, by_hand = (tmp_path / n for n in ("on-demand", "at-boot", "by-hand"))
    for d in (on_demand, at_boot, by_hand):
        d.mkdir()
    lines = (
        f"{s3_bucket} {on_demand} encfs-cloud noauto,_netdev,x-systemd.automount 0 0\n"
        f"{s3_bucket} {at_boot} encfs-cloud _netdev,nofail,cache_size=64M 0 0\n"
    )
    # AWS_* (the S3 server) and XDG_DATA_HOME (the device key) reach the helper through
    # mount(8); PATH lets the umount helper find encfs-cloud.
    env = {**device.env, "PATH": f"{BIN}:{os.environ['PATH']}"}
    umount_helper = CONTRIB / "umount.fuse.encfs-cloud"
    assert os.access(umount_helper, os.X_OK)
    # A private fstab (mount -T): /etc/fstab is shared with every other test session on this
    # machine, and `mount -a` would also try their lines.
    fstab = tmp_path / "fstab"
    fstab.write_text(lines)
    with (
        system_link(Path("/sbin/mount.encfs-cloud"), Path(MOUNT)),
        system_link(Path("/sbin/umount.fuse.encfs-cloud"), umount_helper),
    ):
        try:
            sh("mount", "-a", "-T", fstab, "-t", "encfs-cloud", env=env)
            assert is_mounted(at_boot)
            assert not is_mounted(on_demand)  # noauto: left to systemd's automount
            (at_boot / "from-boot.txt").write_text("at boot\n")
            sh("umount", at_boot, env=env)
            # The helper waited: the daemon is gone, so everything is in the bucket.
            assert not is_mounted(at_boot) and daemon_pids(at_boot) == []
            sh("mount", "-T", fstab, on_demand, env=env)  # by its fstab line
            assert (on_demand / "from-boot.txt").read_text() == "at boot\n"
            (on_demand / "on-demand.txt").write_text("on demand\n")
            sh("umount", on_demand, env=env)
            sh("mount", "-t", "encfs-cloud", "-o", "ro", s3_bucket, by_hand, env=env)
            assert sorted(os.listdir(by_hand)) == ["from-boot.txt", "on-demand.txt"]
            with pytest.raises(OSError) as refused:
                (by_hand / "new.txt").write_text("no")
            assert refused.value.errno == errno.EROFS
            sh("umount", by_hand, env=env)
            # The example fstab parses (findmnt's other complaints are about this machine).
            verify = subprocess.run(
                ["findmnt", "--verify", "--tab-file", str(CONTRIB / "fstab.example")],
                capture_output=True,
                text=True,
                check=False,
            )
            assert "0 parse errors" in verify.stdout + verify.stderr
        finally:
            for d in (on_demand, at_boot, by_hand):
                unmount(device, d)


# --- systemd -------------------------------------------------------------------------------------


@needs_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_systemd_notify_ready_once_mounted_and_sigterm_flushes(
    device: Device, s3_bucket: str, tmp_path: Path
) -> None:
    """What contrib/encfs-cloud@.service relies on: Type=notify with -f, stop by SIGTERM."""
    device.init(s3_bucket)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    address = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(address))
        sock.settimeout(120)  # a generous "does not hang" bound
        env = {**device.env, "NOTIFY_SOCKET": str(address)}
        with open(tmp_path / "foreground.log", "wb") as out:
            proc = subprocess.Popen(
                [MOUNT, "-f", s3_bucket, str(mnt)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        try:
            message = sock.recv(4096).decode()
            mounted_when_ready = is_mounted(mnt)
            assert "READY=1" in message.splitlines()
            assert mounted_when_ready, "READY=1 came before the mount was in place"
            assert proc.poll() is None  # -f: the service's main process stays
            (mnt / "before-stop.txt").write_text("written just before systemctl stop\n")
            proc.send_signal(signal.SIGTERM)  # what `systemctl stop` does
            assert proc.wait(timeout=120) == 0
            assert not is_mounted(mnt)
        finally:
            if proc.poll() is None:
                force_unmount(mnt)
                proc.kill()
                proc.wait()
    with device.mounted(s3_bucket, mnt):
        assert (mnt / "before-stop.txt").read_text() == "written just before systemctl stop\n"


def test_contrib_unit_is_type_notify_with_foreground() -> None:
    unit = (CONTRIB / "encfs-cloud@.service").read_text()
    assert "Type=notify" in unit.splitlines()
    assert any(
        line.startswith("ExecStart=") and "mount.encfs-cloud -f " in line
        for line in unit.splitlines()
    )


# --- status, progress and logs over a store we can make misbehave ---------------------------------


@dataclass
class Proxied:
    mount: SharedMount
    proxy: FaultProxy


@pytest.fixture(scope="module")
def proxied(s3_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    root = tmp_path_factory.mktemp("admin")
    with FaultProxy(s3_server.endpoint_url) as proxy:
        # Long intervals: no poll for other devices' commits (nor a lease renewal) lands in the
        # middle of a test's counting of requests.
        env = {"ENCFS_CLOUD_LEASE_SECONDS": "600"}
        with shared_mount(
            s3_server, root, "poll_interval=600", endpoint=proxy.endpoint_url, extra_env=env
        ) as m:
            yield Proxied(m, proxy)


@pytest.mark.fuse
@pytest.mark.s3
def test_status_reports_from_memory_even_when_the_store_hangs(
    proxied: Proxied, tmp_path: Path
) -> None:
    m, proxy = proxied.mount, proxied.proxy
    m.ensure_mounted()
    first = m.status()
    with open(m.mnt / "status.bin", "wb") as f:
        f.write(os.urandom(3 << 20))
        f.flush()
        os.fsync(f.fileno())
    s = json.loads(m.device.run("status", str(m.mnt), "--json", check=True).stdout)
    assert s["mountpoint"] == str(m.mnt) and s["source"].startswith(m.source)
    assert s["last_commit"]["seq"] > first["last_commit"]["seq"]  # fsync made a commit
    assert s["last_commit"]["time_ns"] > 0
    uploaded = s["transfers"]["bytes_uploaded"] - first["transfers"]["bytes_uploaded"]
    assert uploaded >= 3 << 20
    assert s["dirty"]["dirty_bytes"] == 0 and s["transfers"]["uploads_in_flight"] == 0
    assert s["key_generation"] == 1
    assert s["errors"] == {"upload": 0, "read": 0, "integrity": 0}
    assert "lease" not in s  # writers side by side: mounts hold no lease
    assert s["other_devices"] == {"commits_applied": 0, "conflicts": 0}
    assert s["cache"]["capacity"] > 0
    text = m.device.run("status", str(m.mnt), check=True).stdout
    for label in ("cache:", "hit rate", "dirty:", "transfers:", "last commit: #", "errors:"):
        assert label in text, text

    proxy.inject(Fault.HANG, count=1_000_000)
    try:
        before = proxy.requests
        # The real command, which would hang (and time out) if it asked the bucket anything.
        done = m.device.run("status", str(m.mnt), "--json", timeout=60, check=True)
        assert proxy.requests == before, "status sent a request to the store"
    finally:
        proxy.clear()
    assert json.loads(done.stdout)["last_commit"]["seq"] == s["last_commit"]["seq"]

    done = m.device.run("status", str(tmp_path))
    assert done.returncode == 11 and "not mounted" in done.stderr


def _on_terminal(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd` with a pseudo-terminal as stdout and stderr; its exit code and output."""
    master, slave = os.openpty()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 120  # a generous "does not hang" bound
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            output += data
    finally:
        os.close(master)
    return proc.wait(timeout=120), output.decode(errors="replace")


@pytest.mark.fuse
@pytest.mark.s3
def test_unmount_shows_progress_on_a_terminal_and_nothing_elsewhere(proxied: Proxied) -> None:
    m, proxy = proxied.mount, proxied.proxy
    m.ensure_mounted()
    (m.mnt / "quiet.bin").write_bytes(os.urandom(2 << 20))
    done = m.device.run("umount", str(m.mnt))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")  # not a terminal: silent

    m.ensure_mounted()
    proxy.inject(Fault.DELAY, count=1_000_000, method="PUT", delay=2.0)  # a slow uplink
    try:
        (m.mnt / "slow.bin").write_bytes(os.urandom(12 << 20))
        code, shown = _on_terminal([ENCFS, "umount", str(m.mnt)], m.device.env)
    finally:
        proxy.clear()
    assert code == 0, shown
    assert "\rencfs-cloud: uploading " in shown and " MiB" in shown, repr(shown)
    assert shown.endswith("\r"), repr(shown)  # the line is wiped once done
    assert daemon_pids(m.mnt) == []  # and it returned only once the daemon was done


WORKLOAD_NAMES = [f"dir-{SECRET}", f"file-{SECRET}.txt", f"renamed-{SECRET}.txt"]


def _workload(mnt: Path) -> None:
    """Names, contents, xattrs and link targets that carry the secret, and failing calls."""
    folder = mnt / f"dir-{SECRET}"
    folder.mkdir()
    (folder / f"file-{SECRET}.txt").write_text(f"content {SECRET}\n" * 1000)
    os.setxattr(folder / f"file-{SECRET}.txt", "user.note", f"xattr {SECRET}".encode())
    (folder / f"file-{SECRET}.txt").rename(folder / f"renamed-{SECRET}.txt")
    (folder / f"link-{SECRET}").symlink_to(f"target-{SECRET}")
    with pytest.raises(FileNotFoundError):
        (folder / f"missing-{SECRET}").read_text()
    with pytest.raises(FileExistsError):
        folder.mkdir()
    with pytest.raises(OSError) as full:
        folder.rmdir()
    assert full.value.errno == errno.ENOTEMPTY


@contextlib.contextmanager
def syslog_socket() -> Iterator[socket.socket | None]:
    """A datagram socket at /dev/log while none exists (no syslog daemon here), else None."""
    path = Path("/dev/log")
    if path.exists() or path.is_symlink():
        yield None  # a real syslog listens: its messages are not ours to read
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        yield None
        return
    try:
        yield sock
    finally:
        sock.close()
        path.unlink()  # a stale socket there would make every daemon's syslog fail


@pytest.mark.fuse
@pytest.mark.s3
def test_logs_have_levels_and_no_names_contents_or_keys(proxied: Proxied, tmp_path: Path) -> None:
    m, proxy = proxied.mount, proxied.proxy
    log = tmp_path / "encfs.log"
    m.remount(f"log={log}", "debug")
    _workload(m.mnt)
    # Cold (no disk cache either), so the next read must ask the store, which now fails.
    m.remount(f"log={log}", "debug", "disk_cache_size=0")
    proxy.inject(Fault.HTTP_500, count=1_000_000, method="GET", path="/data/")
    try:
        with pytest.raises(OSError) as failed:
            (m.mnt / f"dir-{SECRET}" / f"renamed-{SECRET}.txt").read_bytes()
    finally:
        proxy.clear()
    assert failed.value.errno == errno.EIO
    assert m.status()["errors"]["read"] >= 1

    with syslog_socket() as syslog:
        m.remount("defaults")  # a daemon without log=: syslog (journald's /dev/log)
        (m.mnt / f"dir-{SECRET}" / f"again-{SECRET}.txt").write_text(SECRET)
        unmount(m.device, m.mnt)  # its last message: every change is in the bucket
        datagrams: list[bytes] = []
        if syslog is not None:
            syslog.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    datagrams.append(syslog.recv(65536))

    text = log.read_bytes()
    assert b" INFO " in text and b" ERROR " in text  # levels, and the failed read is there
    lines = m.init_output.splitlines()
    recovery = lines[next(i for i, line in enumerate(lines) if "RECOVERY KEY" in line) + 1]
    secrets = [SECRET.encode(), SECRET.lower().encode(), SECRET.encode().hex().encode()]
    secrets += [recovery.strip().encode(), recovery.strip().replace("-", "").encode()]
    for secret in secrets:
        assert secret not in text, f"the log holds {secret!r}"
    if syslog is not None:
        assert any(
            d.startswith(b"<14>encfs-cloud: INFO ") and b"every change is in the bucket" in d
            for d in datagrams
        ), datagrams  # <14>: facility user, priority info
        for d in datagrams:
            assert all(secret not in d for secret in secrets), d


@needs_fuse
@pytest.mark.fuse
def test_relative_log_path_is_relative_to_the_caller(
    device: Device, local_source: str, tmp_path: Path
) -> None:
    device.init(local_source)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        [MOUNT, local_source, str(mnt), "-o", "log=relative.log"],
        env=device.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    try:
        (mnt / "x").write_text("x")
    finally:
        unmount(device, mnt)
    try:
        written = (tmp_path / "relative.log").read_text()
    finally:
        Path("/relative.log").unlink(missing_ok=True)  # where the bug puts it
    assert "every change is in the bucket" in written


# --- --help, man pages, exit codes ------------------------------------------------------------


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    """'init', 'device approve', ...: every (sub)command's parser."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[f"{path} {name}".strip()] = sub
                    walk(sub, f"{path} {name}")

    walk(cli_main.build_parser(), "")
    return found


def test_every_command_answers_help_with_exit_0() -> None:
    for program in (ENCFS, MOUNT):  # the real entry points
        done = subprocess.run([program, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
        assert "exit codes:" in done.stdout
    parsers = _command_parsers()
    assert {"init", "mount", "umount", "status"} <= set(parsers)
    for path in parsers:  # in-process: one interpreter start per command would be slow
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            cli_main.run([*path.split(), "--help"], cli_main.build_parser())
        assert exited.value.code == 0, path
        assert out.getvalue().startswith("usage: encfs-cloud " + path), path


def _man(page: Path) -> str:
    done = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": ""},
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr  # renders, no warnings
    return done.stdout


def _mount_option_names() -> set[str]:
    """The option words options.py recognizes, read from its source."""
    tree = ast.parse(inspect.getsource(options))
    names = set(options.GENERIC)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In):
            for right in node.comparators:
                if isinstance(right, ast.Tuple):
                    names |= {e.value for e in right.elts if isinstance(e, ast.Constant)}
    return {n for n in names if isinstance(n, str) and n}


def test_man_pages_render_and_cover_every_command_option_and_exit_code() -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed: apt-get install man-db (make test does)")
    main_page, mount_page = ROOT / "docs/man/encfs-cloud.1", ROOT / "docs/man/mount.encfs-cloud.1"
    assert "COMMANDS" in _man(main_page) and "MOUNT OPTIONS" in _man(mount_page)
    main_src, mount_src = main_page.read_text(), mount_page.read_text()
    for path, parser in _command_parsers().items():
        assert path in main_src, f"encfs-cloud.1 does not describe `{path}`"
        page = main_src + mount_src if path == "mount" else main_src  # -o etc.: mount page
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--"):
                    assert flag.replace("-", "\\-") in page, f"{path} {flag} undocumented"
    codes = {*EXIT_CODES.values(), EXIT_REPAIRED, EXIT_DAMAGED, EXIT_SOME_LOST}
    for code in codes:
        assert f"\n.B {code}\n" in main_src, f"exit code {code} missing from encfs-cloud.1"
        assert re.search(rf"\b{code}\b", mount_src), f"exit code {code} missing from mount page"
    for option in _mount_option_names():
        assert re.search(rf"\b{re.escape(option)}\b", mount_src), f"-o {option} undocumented"
