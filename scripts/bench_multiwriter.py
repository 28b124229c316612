"""Several writers: propagation delay between two mounts and commit throughput of three.

Real mounts (separate device folders) over a `file://` bucket. Propagation: a file written and
closed on A, until B can read it (B polls every `--poll` seconds; A commits at close+fsync).
Throughput: three mounts each write and fsync small files in a loop for `--seconds`; every
fsync is a commit, and lost races rebase. Run (as root, needs /dev/fuse):
    .venv/bin/python scripts/bench_multiwriter.py --json docs/bench/multiwriter.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ENCFS, MOUNT = str(BIN / "encfs-cloud"), str(BIN / "mount.encfs-cloud")


def run(home: Path, *args: str, stdin: str | None = None) -> str:
    env = dict(os.environ, XDG_DATA_HOME=str(home), ENCFS_CLOUD_TEST_FAST_KDF="1")
    done = subprocess.run(
        list(args), env=env, input=stdin, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def field(out: str, label: str) -> str:
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(label))


def enroll(approver: Path, new: Path, source: str, name: str) -> None:
    out = run(new, ENCFS, "device", "request", source, "--no-passphrase", "--device-name", name)
    rid, code = field(out, "request id"), field(out, "verification code")
    run(approver, ENCFS, "device", "approve", source, rid, "--code", code, "--yes")


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def propagation(a: Path, b: Path, rounds: int, poll: float) -> list[float]:
    delays = []
    for n in range(rounds):
        name = f"p{n}"
        start = time.monotonic()
        write_synced(a / name, b"x" * 100)
        while True:
            try:
                if (b / name).read_bytes() == b"x" * 100:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        delays.append(time.monotonic() - start)
        time.sleep(random.uniform(0, poll))  # start the next write anywhere in B's poll cycle
    return delays


def throughput(points: list[Path], seconds: float) -> int:
    counts = [0] * len(points)
    end = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < end:
            write_synced(points[i] / f"w{i}-{counts[i]}", b"y" * 1000)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(points))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--poll", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bucket").mkdir()
        source = f"file://{root / 'bucket'}"
        homes = [root / f"dev{i}" for i in range(3)]
        run(homes[0], ENCFS, "init", source, "--no-passphrase", "--device-name", "dev0")
        for i in (1, 2):
            enroll(homes[0], homes[i], source, f"dev{i}")
        points = [root / f"m{i}" for i in range(3)]
        for home, point in zip(homes, points, strict=True):
            point.mkdir()
            run(home, MOUNT, source, str(point), "-o", f"poll_interval={args.poll}")
        try:
            delays = propagation(points[0], points[1], args.rounds, args.poll)
            commits = throughput(points, args.seconds)
        finally:
            for home, point in zip(homes, points, strict=True):
                subprocess.run(
                    [ENCFS, "umount", str(point)],
                    env=dict(os.environ, XDG_DATA_HOME=str(home)),
                    check=False,
                )
    delays.sort()
    result = {
        "poll_interval_s": args.poll,
        "propagation_median_s": round(statistics.median(delays), 2),
        "propagation_p95_s": round(delays[int(0.95 * (len(delays) - 1))], 2),
        "three_writers_commits_per_s": round(commits / args.seconds, 1),
        # From the code, not measured: one GET per poll, one LIST every 12th, one PUT a minute.
        "idle_requests_per_hour": round(3600 / args.poll + 3600 / args.poll / 12 + 60),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
