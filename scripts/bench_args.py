"""Command line of scripts/bench.py: options, defaults, the smoke profile, fairness notes."""

from __future__ import annotations

import argparse
from typing import Any

from bench_systems import SYSTEM_NAMES
from bench_util import REPO
from bench_workloads import WORKLOADS

SMOKE: dict[str, Any] = {
    "size_mib": 8,
    "runs": 1,
    "fio_seconds": 2,
    "tree_files": 200,
    "rename_files": 100,
    "rtt": "0",
}
DEFAULTS: dict[str, Any] = {
    "size_mib": 256,
    "runs": 3,
    "fio_seconds": 15,
    "tree_files": 0,
    "rename_files": 1000,
    "rtt": "0,20",
}

EPILOG = """\
workloads: write (256 MiB, until fsync and until unmounted), read (cold, after remount),
  untar (stdlib tree, until unmounted), ls (find + ls -lR, cold), fio (4 KiB random reads),
  rename (rename(2) of a 1,000-file directory), rss (daemon peak VmHWM),
  cache (encfs-cloud's disk cache, when mount.encfs-cloud has cache_dir: a second cold read
  after remount, and a copy onto a store throttled to 20 MB/s, until close),
  multiwriter (encfs-cloud only, three devices on the S3 server: propagation delay from a
  write+close on A to visibility on B, commits/s with three writers, an idle mount's requests).
examples:
  scripts/bench.py                          # full: 3 runs, RTT 0 and 20 ms (~25 min)
  scripts/bench.py --rtt 0                  # no delayed profile (~13 min)
  scripts/bench.py --smoke                  # every system, tiny sizes, 1 run (< 2 min)
  scripts/bench.py --smoke --only passthrough --no-install
  scripts/bench.py --only encfs-s3,rclone-crypt --rtt 20 --workloads ls,rename
"""

FAIRNESS = [
    "rclone's fsync only reaches its local VFS cache and `rclone mount` exits on unmount without "
    "uploading what is still queued, so rclone's 'until durable' waits (rc vfs/stats, polled "
    "every 20 ms) until its upload queue is empty, then unmounts; --vfs-write-back is 100ms "
    "(default 5s) so rclone is not charged an idle delay.",
    "Local-directory systems (encfs-cloud file://, gocryptfs, passthrough): 'durable' "
    "includes a sync(2) after the unmount.",
    "The S3 server, the delay proxy, fio/tar and the daemons share the same cores.",
    "Cold = sync + drop_caches + remount; rclone's VFS cache dir and encfs-cloud's "
    "XDG_CACHE_HOME are wiped before each cold remount.",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark encfs-cloud side by side with rclone crypt, gocryptfs and a "
        "pyfuse3 passthrough.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--runs", type=int, help="runs per system, interleaved (default 3)")
    p.add_argument("--size-mib", type=int, help="sequential file size (default 256)")
    p.add_argument("--fio-seconds", type=int, help="random-read duration (default 15)")
    p.add_argument("--fio-jobs", type=int, default=1, help="fio jobs (psync, default 1)")
    p.add_argument("--rename-files", type=int, help="files in the renamed dir (default 1000)")
    p.add_argument("--tree-files", type=int, help="cap on files in the untar tree (0 = all)")
    p.add_argument(
        "--only", default=",".join(SYSTEM_NAMES), help=f"systems, from {','.join(SYSTEM_NAMES)}"
    )
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="subset of the workloads")
    p.add_argument(
        "--rtt",
        help="round trip(s) in ms between the S3 systems and the server; each value is a "
        "separate column (default 0,20; --smoke: 0)",
    )
    p.add_argument(
        "--s3-server",
        choices=["seaweedfs", "moto", "rclone", "auto"],
        default="seaweedfs",
        help="S3 server on 127.0.0.1 (default seaweedfs: it enforces conditional writes; "
        "auto probes all and keeps the cheapest one that enforces them)",
    )
    p.add_argument("--cache-size-mib", type=int, default=256, help="encfs-cloud cache_size")
    p.add_argument("--encfs-opts", default="", help="extra -o options for mount.encfs-cloud")
    p.add_argument("--rclone-write-back", default="100ms", help="rclone --vfs-write-back")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one run")
    p.add_argument(
        "--update-readme",
        action="store_true",
        help="write the results to docs/bench/ and regenerate the README's table (make bench)",
    )
    p.add_argument("--no-install", action="store_true", help="never pip/apt install")
    p.add_argument("--out-dir", default=str(REPO / "bench-results"))
    p.add_argument("--json", help="write the results here instead of --out-dir/bench-<ts>.json")
    p.add_argument("--workdir", default=None, help="parent of the temp dir (default $TMPDIR)")
    p.add_argument("--step-timeout", type=float, default=900.0)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    args = p.parse_args(argv)
    base = SMOKE if args.smoke else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [s for s in args.only if s not in SYSTEM_NAMES] + [
        w for w in args.workloads if w not in WORKLOADS
    ]
    if bad:
        p.error(f"unknown system/workload: {', '.join(bad)}")
    try:
        args.rtts = sorted({float(x) for x in str(args.rtt).split(",") if x.strip()})
    except ValueError:
        p.error("--rtt takes numbers in ms, e.g. 0,20")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    return args
