"""A/B of encfs-cloud's cold sequential read between two installs: interleaved rounds, with
the daemon's page faults, CPU and peak RSS around the read (from /proc), medians and raw rows.

    scripts/bench_ab_read.py --base /work/main/.venv/bin --rounds 4 --rtt 20 --json out.json

Both installs mount the same kind of filesystem on one SeaweedFS server (through the delay
proxy with --rtt); each round reads a file written once per install, after sync, a drop of
the page cache and an emptied disk cache, so every read is cold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_encfs
from bench import start_proxy
from bench_encfs import EncfsCloud
from bench_s3 import BUCKET, choose_server
from bench_system import Env
from bench_util import SCRIPTS, drop_caches, kill_all, run, venv_bin


def io(*args: str) -> dict[str, Any]:
    """One bench_io.py step; its JSON result."""
    cmd = [str(venv_bin() / "python"), str(SCRIPTS / "bench_io.py"), *args]
    result: dict[str, Any] = json.loads(run(cmd, timeout=1800).stdout.strip().splitlines()[-1])
    return result


def counters(pid: int) -> tuple[int, float, float]:
    """Minor page faults, user and system seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), int(fields[11]) / tick, int(fields[12]) / tick


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="bin/ of the install to compare against")
    p.add_argument("--new", default=str(venv_bin()), help="bin/ of the install under test")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--rtt", type=float, default=0.0, help="added round trip in ms")
    p.add_argument("--json", required=True, help="where the raw rows and medians go")
    a = p.parse_args()
    bins = {"base": a.base, "new": a.new}
    work = Path(tempfile.mkdtemp(prefix="encfs-ab-read-"))
    server = None
    systems: dict[str, EncfsCloud] = {}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in bins}
    real_tool = bench_encfs.tool

    def use(name: str) -> None:  # the bench's systems find their commands through `tool`
        bench_encfs.tool = lambda cmd: f"{bins[name]}/{cmd}"

    try:
        env = Env(workdir=work, cache_size_mib=256, encfs_opts="")
        server, _, _ = choose_server(work, "seaweedfs")
        server.create_bucket(BUCKET)
        env.s3 = server
        env.s3_urls[a.rtt] = start_proxy(work, server.port, a.rtt) if a.rtt else server.url
        for name in bins:
            use(name)
            system = EncfsCloud(env, a.rtt)
            why_not = system.unavailable()
            if why_not:
                raise SystemExit(why_not)
            system.prepare(work / f"run-{name}")
            system.mount()
            io("write", str(system.mnt / "big"), str(a.size_mib << 20))
            system.unmount()
            systems[name] = system
        for r in range(a.rounds):
            for name in list(bins) if r % 2 == 0 else list(reversed(bins)):
                use(name)
                system = systems[name]
                drop_caches()
                system.forget_local_cache()
                system.mount()
                pid = system.daemon_pids()[0]
                faults0, user0, sys0 = counters(pid)
                res = io("read", str(system.mnt / "big"))
                faults1, user1, sys1 = counters(pid)
                row = {
                    "MBps": res["bytes"] / res["s"] / 1e6,
                    "s": res["s"],
                    "minflt": faults1 - faults0,
                    "user_s": user1 - user0,
                    "sys_s": sys1 - sys0,
                    "hwm_mib": peak_rss_mib(pid),
                }
                system.unmount()
                rows[name].append(row)
                print(name, r, json.dumps(row), flush=True)
    finally:
        for system in systems.values():
            system.cleanup()
        bench_encfs.tool = real_tool
        kill_all()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    medians = {
        name: {key: statistics.median(row[key] for row in runs) for key in runs[0]}
        for name, runs in rows.items()
        if runs
    }
    print(json.dumps(medians, indent=1))
    out = {
        "what": f"cold sequential read {a.size_mib} MiB over SeaweedFS, rtt {a.rtt:g} ms",
        "bins": bins,
        "runs": rows,
        "medians": medians,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
