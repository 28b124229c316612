"""Scale figures: a filesystem of N small files — mount time, daemon memory, ls, one commit.

Builds the tree's metadata directly (creating a million files through FUSE would take a
quarter of an hour), seals it as the first snapshot in a `file://` bucket, then measures the
real `mount.encfs-cloud` on it. Run: .venv/bin/python scripts/bench_scale.py --files 1000000
Compare installs on one built bucket, interleaved: `--work DIR --bin A/.venv/bin --bin B/.venv/bin
--rounds 3` (medians per install). `--copy-per-bin` gives each install its own copy of the
built bucket, for installs that write commits the other cannot read (zstd bodies, 2026-12-03).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encfs_cloud import layout  # noqa: E402
from encfs_cloud.keys.device import DeviceStore  # noqa: E402
from encfs_cloud.keys.sealed import Sealer  # noqa: E402
from encfs_cloud.keys.vault import unlock  # noqa: E402
from encfs_cloud.store import open_store  # noqa: E402
from encfs_cloud.tree import journal  # noqa: E402
from encfs_cloud.tree.metadata import ID_BITS, ROOT_INODE, SCHEMA, Metadata  # noqa: E402
from encfs_cloud.tree.namespace import Namespace  # noqa: E402


def _random_id() -> int:
    """Drawn as Metadata.new_id draws (62 random bits, never 0 or the root); unlike it, not
    checked against the table: a collision in 62 bits would fail the INSERT loudly."""
    while (candidate := secrets.randbits(ID_BITS)) <= ROOT_INODE:
        pass
    return candidate


def build_tree(files: int, big_dir: int, packed: bool = False) -> Metadata:
    """One directory of `big_dir` entries, the rest spread over directories of 1,000.

    Directories are made through the namespace; files, the bulk, with one INSERT per batch
    (rows exactly as `Namespace.create` writes them, ids drawn the same way): 10,000,000
    files one call at a time took over an hour on this machine. `packed`: the random ids are
    drawn up front and inserted in order, and the entry indexes built afterwards. Inserting
    at random places slowed to ~300 µs a file past 2,000,000 files here; in order, pages end
    full where a tree grown by random inserts keeps them about two thirds full, so a packed
    tree is smaller than a real one of the same size (say so next to its figures).
    """
    md = Metadata()
    ns = Namespace(md)
    ns.ensure_root(0, 0)
    mode = stat.S_IFREG | 0o644
    when = time.time_ns()
    big = ns.create(ROOT_INODE, b"big", stat.S_IFDIR | 0o755, 0, 0)
    folders = [(big.id, big_dir)]
    made = big_dir
    while made < files:
        name = b"dir-%05d" % (len(folders) - 1)
        folder = ns.create(ROOT_INODE, name, stat.S_IFDIR | 0o755, 0, 0)
        folders.append((folder.id, min(1000, files - made)))
        made += folders[-1][1]
    fresh: Iterator[int] | None = None
    if packed:
        md.db.execute("DROP INDEX dentries_by_name")
        fresh = iter(sorted({_random_id() for _ in range(2 * files + 16)}))  # set: 16 spare
    for parent, count in folders:
        if fresh is None:
            ids = [_random_id() for _ in range(2 * count)]
            inodes, entries = ids[:count], ids[count:]
        else:  # interleaved from one sorted run: both tables are appended to in key order
            ids = [next(fresh) for _ in range(2 * count)]
            inodes, entries = ids[0::2], ids[1::2]
        width = 7 if parent == big.id else 4
        names = [b"file-%0*d.txt" % (width, i) for i in range(count)]
        md.db.executemany(
            "INSERT INTO inodes VALUES(?,?,0,0,1,0,?,?,?,0,NULL)",
            ((ino, mode, when, when, when) for ino in inodes),
        )
        md.db.executemany(
            "INSERT INTO dentries VALUES(?,?,?,?)",
            zip(entries, [parent] * count, names, inodes, strict=True),
        )
    if packed:
        md.db.executescript(SCHEMA.format(s=""))  # the entry indexes, built by sorting
    return md


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def daemon_pid(mountpoint: Path) -> int:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                any(b"mount.encfs-cloud" in a for a in argv[:2])
                and str(mountpoint).encode() in argv
            ):
                return int(proc.name)
    raise RuntimeError("daemon not found")


def build_bucket(
    work: Path, files: int, big_dir: int, env: dict[str, str], packed: bool = False
) -> dict[str, float]:
    """A filesystem in `work/bucket` whose first commit is a snapshot of the built tree."""
    bucket = work / "bucket"
    bucket.mkdir(parents=True)
    source = f"file://{bucket}"
    subprocess.run(
        [str(BIN / "encfs-cloud"), "init", source, "--no-passphrase"],
        env=env,
        check=True,
        capture_output=True,
    )
    out: dict[str, float] = {}
    t = time.monotonic()
    md = build_tree(files, big_dir, packed)
    out["build_s"] = time.monotonic() - t
    store = open_store(source)
    unlocked = unlock(store, DeviceStore(), None)
    sealer = Sealer(unlocked.fs_id, unlocked.keys)
    t = time.monotonic()
    body = journal.export_snapshot(md)
    del md
    info = journal.CommitInfo(1, journal.KIND_SNAPSHOT, b"", 1, time.time_ns())
    sealed = journal.seal_commit(sealer, info, body)
    store.put(layout.commit_name(1), sealed, if_none_match=True)
    out["snapshot_s"] = time.monotonic() - t
    out["snapshot_MiB"] = len(sealed) / 2**20
    unlocked.wipe()
    return out


def measure_mount(
    bin_dir: Path, work: Path, env: dict[str, str], bucket: str = "bucket"
) -> dict[str, float]:
    """Mount with the install in `bin_dir`, time ls and one commit, unmount."""
    source, mnt = f"file://{work / bucket}", work / "mnt"
    mnt.mkdir(exist_ok=True)
    out: dict[str, float] = {}
    try:
        t = time.monotonic()
        subprocess.run([str(bin_dir / "mount.encfs-cloud"), source, str(mnt)], env=env, check=True)
        out["mount_s"] = time.monotonic() - t
        pid = daemon_pid(mnt)
        out["rss_after_mount_MiB"] = rss_mib(pid)
        t = time.monotonic()
        names = os.listdir(mnt / "big")
        out["listdir_big_s"] = time.monotonic() - t
        big = str(mnt / "big")
        t = time.monotonic()
        for name in names:  # str paths: pathlib's joins took 0.6 s of 0.9 on tmpfs here
            os.lstat(big + "/" + name)
        out["ls_l_big_s"] = time.monotonic() - t
        # The tool itself, second listing (the kernel holds the attributes by now).
        t = time.monotonic()
        subprocess.run(["ls", "-l", big], stdout=subprocess.DEVNULL, check=True)
        out["ls_l_tool_s"] = time.monotonic() - t
        target = mnt / "dir-00000" / "file-0000.txt"
        t = time.monotonic()
        fd = os.open(target, os.O_WRONLY)
        os.write(fd, b"changed")
        os.fsync(fd)
        os.close(fd)
        out["commit_one_change_s"] = time.monotonic() - t
        out["rss_end_MiB"] = rss_mib(pid)
    finally:
        subprocess.run([str(bin_dir / "encfs-cloud"), "umount", str(mnt)], env=env, check=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--big-dir", type=int, default=100_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--work", type=Path, help="keep the built bucket here and reuse it when present"
    )
    parser.add_argument(
        "--bin",
        type=Path,
        action="append",
        help="a venv's bin folder to measure (repeat to compare installs; default this one)",
    )
    parser.add_argument(
        "--packed", action="store_true", help="build fast, in key order (see build_tree)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved mounts per install")
    parser.add_argument(
        "--copy-per-bin",
        action="store_true",
        help="each install mounts its own copy of the built bucket",
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="encfs-scale-"))
    env = dict(os.environ, XDG_DATA_HOME=str(work / "xdg"))
    os.environ["XDG_DATA_HOME"] = env["XDG_DATA_HOME"]
    out: dict[str, object] = {"files": args.files, "big_dir": args.big_dir}
    try:
        if not (work / "bucket").exists():
            out.update(build_bucket(work, args.files, args.big_dir, env, args.packed))
            out["packed"] = args.packed
        bins = args.bin or [BIN]
        buckets = {
            str(b): f"bucket-{i}" if args.copy_per_bin else "bucket" for i, b in enumerate(bins)
        }
        envs = {str(b): env for b in bins}
        for i, b in enumerate(bins):
            if args.copy_per_bin:  # the device's record of what it saw differs per copy too
                for name in ("bucket", "xdg"):
                    if not (work / f"{name}-{i}").exists():
                        shutil.copytree(work / name, work / f"{name}-{i}")
                envs[str(b)] = dict(env, XDG_DATA_HOME=str(work / f"xdg-{i}"))
        runs: dict[str, list[dict[str, float]]] = {str(b): [] for b in bins}
        for _ in range(args.rounds):
            for b in bins:
                runs[str(b)].append(measure_mount(b, work, envs[str(b)], buckets[str(b)]))
        out["rounds"] = runs
        for b, measured in runs.items():
            medians = {k: statistics.median(m[k] for m in measured) for k in measured[0]}
            if len(bins) == 1:
                out.update(medians)  # one install: its figures at the top level
            else:
                out[b] = medians
    finally:
        if args.work is None:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
