"""Real programs on a mount over the local S3 server: restic, borg, rsync, git, sqlite, locks."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from encfs_cloud.daemon import controlclient
from tests.fixtures_mount import Device, is_mounted, needs_fuse, unmount
from tests.fixtures_s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, empty_bucket

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.s3]

PROGRAM_TIMEOUT = 180  # generous "does not hang" bound for one program run


def require(program: str, package: str) -> str:
    """The program's path; `make test` installs its Debian package (TEST_APT_PACKAGES)."""
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed: apt-get install {package} (make test does)")
    return path


def run(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a program; fail with its output if it exits non-zero."""
    done = subprocess.run(
        [str(a) for a in args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=PROGRAM_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
    return done


def s3_client_env(server: MotoServer, home: Path) -> dict[str, str]:
    """What `s3_env` sets, for a fixture that outlives one test."""
    return {
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": server.endpoint_url,
    }


def make_tree(root: Path, seed: int = 1) -> Path:
    """A small home folder: nested dirs, text and multi-chunk binaries, a symlink, modes."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for d in range(4):
        sub = root / f"dir{d}" / "nested"
        sub.mkdir(parents=True)
        for f in range(8):
            (sub.parent / f"note{f}.txt").write_text(f"note {d}/{f}\n" * rng.randint(1, 400))
        (sub / "data.bin").write_bytes(rng.randbytes(rng.randint(1, 300_000)))
    (root / "big.bin").write_bytes(rng.randbytes(3 * (1 << 20) + 12345))  # four chunks
    (root / "empty").mkdir()
    (root / "zero.txt").write_bytes(b"")
    (root / "private.txt").write_text("only me\n")
    (root / "private.txt").chmod(0o600)
    (root / "link").symlink_to("dir0/note0.txt")
    return root


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Path → (kind, mode, size, content or target, mtime seconds): what a copy must keep."""
    out: dict[str, tuple[Any, ...]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", st.st_mode & 0o7777)
        else:
            out[rel] = (
                "file",
                st.st_mode & 0o7777,
                st.st_size,
                path.read_bytes(),
                int(st.st_mtime),
            )
    return out


@dataclass
class SharedMount:
    """One filesystem for the module, mounted; each test works in its own folder."""

    device: Device
    source: str
    mnt: Path
    options: tuple[str, ...] = ()
    init_output: str = ""  # what `init` printed (the recovery key among it)

    def remount(self, *options: str) -> None:
        """Unmount (everything goes to the bucket) and mount again with a cold cache.

        New `options` replace the current ones from now on.
        """
        unmount(self.device, self.mnt)
        self.options = options or self.options
        done = self.device.mount(self.source, self.mnt, *self.options)
        assert done.returncode == 0, done.stderr

    def ensure_mounted(self) -> None:
        """Mount again if an earlier step (or a failed test) left it unmounted."""
        if not is_mounted(self.mnt):
            done = self.device.mount(self.source, self.mnt, *self.options)
            assert done.returncode == 0, done.stderr

    def status(self) -> dict[str, Any]:
        """The daemon's status over its control socket (what `encfs-cloud status` asks)."""
        return controlclient.query(self.mnt, timeout=60)

    def folder(self, name: str) -> Path:
        path = self.mnt / name
        path.mkdir()
        return path


@contextlib.contextmanager
def shared_mount(
    server: MotoServer,
    root: Path,
    *options: str,
    endpoint: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[SharedMount]:
    """A fresh bucket and filesystem, mounted for a whole module (a mount costs seconds).

    `endpoint` puts something (a FaultProxy) between the filesystem and the server.
    """
    bucket = f"encfs-shared-{uuid.uuid4().hex[:12]}"
    client = server.client()
    client.create_bucket(Bucket=bucket)
    env = {**s3_client_env(server, root), **(extra_env or {})}
    if endpoint is not None:
        env["AWS_ENDPOINT_URL"] = endpoint
    device = Device(root / "device", extra_env=env)
    source = f"s3://{bucket}"
    mnt = root / "mnt"
    try:
        printed = device.init(source).stdout
        with device.mounted(source, mnt, *options):
            yield SharedMount(device, source, mnt, options, printed)
    finally:
        unmount(device, mnt)  # a failed remount may have left it half done
        empty_bucket(client, bucket)
        client.delete_bucket(Bucket=bucket)


@pytest.fixture(scope="module")
def shared(
    s3_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedMount]:
    with shared_mount(s3_server, tmp_path_factory.mktemp("programs")) as mounted:
        yield mounted


# --- backup repositories on the mount ----------------------------------------------------------
# Each program writes, then one remount (a cold cache: everything is read back from the bucket)
# serves all of them; a remount costs seconds, and the set must stay fast.


def _restic_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "RESTIC_PASSWORD": "correct horse",
        "RESTIC_CACHE_DIR": str(tmp_path / "restic-cache"),
        **extra,
    }


def test_backup_repositories_on_the_mount(shared: SharedMount, tmp_path: Path) -> None:
    """restic and borg keep repositories on the mount, rsync copies in; all verify cold."""
    restic = require("restic", "restic")
    borg = require("borg", "borgbackup")
    rsync = require("rsync", "rsync")
    src = make_tree(tmp_path / "src")
    restic_repo = shared.mnt / "restic-repo"
    restic_env = _restic_env(tmp_path)
    run(restic, "-r", restic_repo, "init", env=restic_env)
    run(restic, "-r", restic_repo, "backup", ".", env=restic_env, cwd=src)
    borg_repo = shared.mnt / "borg-repo"
    borg_env = {
        **os.environ,
        "BORG_PASSPHRASE": "correct horse",
        "BORG_BASE_DIR": str(tmp_path / "borg-base"),  # its cache and keys stay off ~
    }
    run(borg, "init", "--encryption=repokey", borg_repo, env=borg_env)
    run(borg, "create", f"{borg_repo}::first", ".", env=borg_env, cwd=src)
    copy = shared.mnt / "rsync-copy"
    run(rsync, "-a", f"{src}/", f"{copy}/")

    shared.remount()

    run(restic, "-r", restic_repo, "check", "--read-data", env=restic_env)
    restored = tmp_path / "restic-restored"
    run(restic, "-r", restic_repo, "restore", "latest", "--target", restored, env=restic_env)
    assert snapshot(restored) == snapshot(src), "restic restore differs"
    run(borg, "check", "--verify-data", borg_repo, env=borg_env)
    extracted = tmp_path / "borg-extracted"
    extracted.mkdir()
    run(borg, "extract", f"{borg_repo}::first", env=borg_env, cwd=extracted)
    assert snapshot(extracted) == snapshot(src), "borg extract differs"
    for a, b in ((src, copy), (copy, src)):  # both ways: nothing to transfer, nothing differs
        done = run(rsync, "-a", "--checksum", "--dry-run", "--itemize-changes", f"{a}/", f"{b}/")
        assert done.stdout.strip() == "", f"rsync sees differences:\n{done.stdout}"
    assert snapshot(copy) == snapshot(src)


# --- a backup of the mount --------------------------------------------------------------------


def test_restic_backup_of_the_mount_reads_nothing_the_second_time(
    shared: SharedMount, tmp_path: Path
) -> None:
    restic = require("restic", "restic")
    make_tree(shared.mnt / "home", seed=4)
    env = _restic_env(tmp_path, RESTIC_REPOSITORY=str(tmp_path / "repo"))  # a local repository
    run(restic, "init", env=env)
    # Cold, without the disk cache: the first backup must fetch every file from the bucket.
    shared.remount("disk_cache_size=0")

    def backup() -> tuple[dict[str, Any], int]:
        done = run(restic, "backup", "--json", "home", env=env, cwd=shared.mnt)
        messages = [json.loads(line) for line in done.stdout.splitlines()]
        summary = [m for m in messages if m.get("message_type") == "summary"]
        return summary[0], shared.status()["transfers"]["bytes_fetched"]

    first, fetched_first = backup()
    assert first["files_new"] > 30 and fetched_first > 3 << 20  # it really read the tree
    second, fetched_second = backup()
    assert second["files_new"] == 0 and second["files_changed"] == 0, second
    assert second["files_unmodified"] == first["files_new"]
    assert second["data_added"] < 64 << 10, second  # a new snapshot's tree only
    assert fetched_second == fetched_first, "deciding nothing changed downloaded file data"


# --- programs that need POSIX behaviour -----------------------------------------------------------


SQLITE_WRITER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=60)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=NORMAL")  # the usual WAL setting: fsync at checkpoints
for i in range(int(sys.argv[3])):
    with db:
        db.execute("INSERT INTO t (who, n, pad) VALUES (?, ?, randomblob(3000))", (sys.argv[2], i))
db.close()
"""


def _git(tmp_path: Path) -> tuple[str, dict[str, str]]:
    git = require("git", "git")
    return git, {
        **os.environ,
        "GIT_AUTHOR_NAME": "T",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "T",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(tmp_path),  # no user config; gc.auto=0 below: no detached gc left running
    }


def test_git_and_sqlite_survive_remount(shared: SharedMount, tmp_path: Path) -> None:
    """git clone/commit/gc and a WAL database written by two processes at once, then cold."""
    git, env = _git(tmp_path)
    sqlite3 = require("sqlite3", "sqlite3")
    origin = tmp_path / "origin"
    make_tree(origin, seed=5)
    run(git, "init", "-q", "-b", "main", origin, env=env)
    for i in range(3):
        (origin / f"change{i}.txt").write_text(f"change {i}\n")
        run(git, "-C", origin, "add", "-A", env=env)
        run(git, "-C", origin, "commit", "-q", "-m", f"change {i}", env=env)
    clone = shared.mnt / "clone"
    run(git, "-c", "gc.auto=0", "clone", "-q", "--no-local", origin, clone, env=env)
    run(git, "-C", clone, "fsck", "--full", "--strict", env=env)
    (clone / "local.txt").write_text("made on the mount\n")
    run(git, "-C", clone, "add", "-A", env=env)
    run(git, "-C", clone, "-c", "gc.auto=0", "commit", "-q", "-m", "on the mount", env=env)
    run(git, "-C", clone, "gc", "-q", "--prune=now", env=env)  # repack, renames, deletes

    db = shared.folder("sqlite") / "app.db"
    setup = "PRAGMA journal_mode=WAL; CREATE TABLE t (who TEXT, n INT, pad BLOB);"
    assert run(sqlite3, db, setup).stdout.strip() == "wal"
    rows = 150
    writers = [
        subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(db), who, str(rows)])
        for who in ("a", "b")
    ]
    for proc in writers:
        assert proc.wait(timeout=PROGRAM_TIMEOUT) == 0
    query = "PRAGMA integrity_check; SELECT who, count(*) FROM t GROUP BY who;"
    expected = ["ok", f"a|{rows}", f"b|{rows}"]
    assert run(sqlite3, db, query).stdout.split() == expected

    shared.remount()

    run(git, "-C", clone, "fsck", "--full", "--strict", env=env)
    assert run(git, "-C", clone, "status", "--porcelain", env=env).stdout == ""
    assert int(run(git, "-C", clone, "rev-list", "--count", "HEAD", env=env).stdout) == 4
    assert run(sqlite3, db, query).stdout.split() == expected


LOCK_HOLDER = """
import fcntl, sys
f = open(sys.argv[1], "r+")
if sys.argv[2] == "flock":
    fcntl.flock(f, fcntl.LOCK_EX)
else:
    fcntl.lockf(f, fcntl.LOCK_EX, 100, 0)  # bytes 0-99 only
print("locked", flush=True)
sys.stdin.read()  # hold until the test closes our stdin
"""


def _try_lockf(path: Path, start: int) -> bool:
    """In another process: may bytes [start, start+100) be locked right now?"""
    code = (
        "import fcntl, sys\n"
        f"f = open({str(path)!r}, 'r+')\n"
        "try:\n"
        f"    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, {start})\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 0


def test_flock_and_posix_record_locks_between_processes(shared: SharedMount) -> None:
    flock = require("flock", "util-linux")
    target = shared.folder("locks") / "lockfile"
    target.write_text("x" * 1000)
    for kind in ("flock", "lockf"):
        holder = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, str(target), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            if kind == "flock":
                busy = subprocess.run(
                    [flock, "--nonblock", "--conflict-exit-code", "99", target, "true"],
                    timeout=60,
                    check=False,
                )
                assert busy.returncode == 99  # the holder's lock is seen by another process
            else:
                assert not _try_lockf(target, 0)  # overlapping range: refused
                assert _try_lockf(target, 500)  # a record lock, not a whole-file one
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(timeout=60)
        if kind == "flock":
            free = subprocess.run([flock, "--nonblock", target, "true"], timeout=60, check=False)
            assert free.returncode == 0
        else:
            assert _try_lockf(target, 0)
    with open(target, "r+") as f:  # and in this process, on the same mount
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
