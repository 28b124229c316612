"""Several writers: propagation delay, three-writer commit rate and an idle mount's requests.

Real mounts (separate device folders) of one filesystem. Propagation: a file written and
closed (fsync) on A, until B can read it (B polls every `poll` seconds). Throughput: three
mounts each write and fsync small files in a loop; every fsync is a commit, and lost races
rebase. Idle: one mount left alone, its S3 requests counted by the server. `make bench` runs
this against its S3 server (the two-writer column); alone, over a `file://` bucket:
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
ENCFS, MOUNT = str(BIN / "encfs-cloud"), str(BIN / "mount.encfs-cloud")
WRITERS = 3


class MultiwriterError(RuntimeError):
    """A command of the measurement failed; the message names it."""


class Fleet:
    """Three enrolled devices of one filesystem, each with its own folders and mount point."""

    def __init__(self, root: Path, source: str, env: Mapping[str, str], opts: list[str]) -> None:
        self.root, self.source, self.base_env, self.opts = root, source, dict(env), opts
        self.homes = [root / f"dev{i}" for i in range(WRITERS)]
        self.points = [root / f"m{i}" for i in range(WRITERS)]
        self.mounted: list[int] = []

    def env(self, i: int) -> dict[str, str]:
        home = self.homes[i]
        return dict(
            self.base_env,
            XDG_DATA_HOME=str(home / "data"),
            XDG_CACHE_HOME=str(home / "cache"),
            XDG_RUNTIME_DIR=str(home / "run"),
        )

    def run(self, i: int, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            list(args), env=self.env(i), input=stdin, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise MultiwriterError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr}")
        return done.stdout

    def create(self) -> None:
        for home in self.homes:
            for sub in ("data", "cache", "run"):
                (home / sub).mkdir(parents=True, mode=0o700)
        self.run(0, ENCFS, "init", self.source, "--no-passphrase", "--device-name", "dev0")
        for i in range(1, WRITERS):
            out = self.run(
                i, ENCFS, "device", "request", self.source, "--no-passphrase",
                "--device-name", f"dev{i}",
            )  # fmt: skip
            rid, code = _field(out, "request id"), _field(out, "verification code")
            self.run(
                0, ENCFS, "device", "approve", self.source, rid, "--code-file", "-", "--yes",
                stdin=code + "\n",
            )  # fmt: skip

    def mount(self, i: int, poll: float) -> None:
        self.points[i].mkdir(exist_ok=True)
        opts = ",".join([*self.opts, f"poll_interval={poll:g}"])
        self.run(i, MOUNT, self.source, str(self.points[i]), "-o", opts)
        self.mounted.append(i)

    def unmount(self, i: int) -> None:
        if i in self.mounted:
            self.mounted.remove(i)
            self.run(i, ENCFS, "umount", str(self.points[i]))

    def unmount_all(self) -> None:
        for i in list(self.mounted):
            try:
                self.unmount(i)
            except MultiwriterError:
                subprocess.run(["fusermount3", "-u", "-z", str(self.points[i])], check=False)


def _field(out: str, label: str) -> str:
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(label))


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def propagation(a: Path, b: Path, rounds: int, poll: float, timeout: float = 120) -> list[float]:
    """Seconds from the start of a write+fsync on A until B reads the new file whole."""
    delays = []
    for n in range(rounds):
        name, data = f"p{n}", f"round {n}\n".encode() * 10
        start = time.monotonic()
        _write_synced(a / name, data)
        while True:
            try:
                if (b / name).read_bytes() == data:
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() - start > timeout:
                raise MultiwriterError(f"{name} never appeared on the other mount")
            time.sleep(0.01)
        delays.append(time.monotonic() - start)
        time.sleep(random.uniform(0, poll))  # start the next write anywhere in B's poll cycle
    return delays


def throughput(points: list[Path], seconds: float) -> tuple[int, list[str]]:
    """Commits made by all mounts together, each writing and fsyncing small files in a loop,
    and the fsyncs that failed (a writer that fails goes on: the figure counts successes)."""
    counts = [0] * len(points)
    errors: list[str] = []
    end = time.monotonic() + seconds

    def loop(i: int) -> None:
        n = 0
        while time.monotonic() < end:
            try:
                _write_synced(points[i] / f"w{i}-{n}", b"y" * 1000)
                counts[i] += 1
            except OSError as exc:
                errors.append(f"mount {i}: {exc}")
            n += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(points))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), errors


def measure(
    workdir: Path,
    source: str,
    env: Mapping[str, str],
    *,
    mount_opts: list[str] | None = None,
    poll: float = 5.0,
    rounds: int = 20,
    seconds: float = 20,
    idle_seconds: float = 180,
    count_requests: Callable[[], dict[str, int]] | None = None,
) -> dict[str, Any]:
    """Run the three measurements on a fresh filesystem at `source`; always unmounts."""
    fleet = Fleet(workdir, source, env, mount_opts or [])
    fleet.create()
    result: dict[str, Any] = {"poll_interval_s": poll, "rounds": rounds}
    try:
        fleet.mount(0, poll)
        if count_requests is not None:
            # Before any burst: what a mount that nobody writes to costs. (After the
            # three-writer loop, the deletions of what its snapshots freed run for minutes.)
            time.sleep(2 * poll)
            before = count_requests()
            time.sleep(idle_seconds)
            used = {k: v - before.get(k, 0) for k, v in count_requests().items()}
            per_hour = 3600 / idle_seconds
            result["idle_seconds"] = idle_seconds
            result["idle_requests_per_hour"] = round(sum(used.values()) * per_hour)
            result["idle_requests_by_type_per_hour"] = {
                k: round(v * per_hour) for k, v in sorted(used.items()) if v
            }
        for i in range(1, WRITERS):
            fleet.mount(i, poll)
        delays = sorted(propagation(fleet.points[0], fleet.points[1], rounds, poll))
        result["propagation_median_s"] = round(statistics.median(delays), 2)
        result["propagation_p95_s"] = round(delays[round(0.95 * (len(delays) - 1))], 2)
        commits, errors = throughput(fleet.points, seconds)
        result["three_writers_commits_per_s"] = round(commits / seconds, 1)
        result["three_writers_failed_fsyncs"] = len(errors)
        result["three_writers_errors"] = sorted(set(errors))[:5]
    finally:
        fleet.unmount_all()
    return result


def lines(result: dict[str, Any]) -> list[str]:
    """The two-writer figures as report lines (encfs-cloud only: no peer can do this)."""
    if "error" in result:
        return [f"two writers: not measured: {result['error']}"]
    idle = result.get("idle_requests_per_hour")
    return [
        f"two writers (encfs-cloud only; poll_interval {result['poll_interval_s']:g} s, "
        f"{result['rounds']} rounds): write+close on A to visible on B median "
        f"{result['propagation_median_s']} s, p95 {result['propagation_p95_s']} s; "
        f"{WRITERS} writers committing in a loop: {result['three_writers_commits_per_s']} "
        f"commits/s ({result.get('three_writers_failed_fsyncs', 0)} failed fsyncs); idle mount: "
        + (f"{idle} S3 requests/hour (counted by the server)" if idle is not None else "-"),
    ]


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
        env = dict(os.environ, ENCFS_CLOUD_TEST_FAST_KDF="1")
        result = measure(
            root, f"file://{root / 'bucket'}", env,
            poll=args.poll, rounds=args.rounds, seconds=args.seconds,
        )  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
