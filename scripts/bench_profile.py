"""Profile the encfs-cloud daemon (py-spy) during one bench workload, with S3 request counts.

    scripts/bench_profile.py --workload read --size-mib 256 --rtt 20
    scripts/bench_profile.py --workload untar --gil      # only samples that hold the GIL
    scripts/bench_profile.py --workload write --store file   # over file://, no S3 server
    scripts/bench_profile.py --workload copy             # no fsync, store capped at 20 MB/s

Prints the wall time, the S3 requests by type and the server's CPU for the workload alone,
then where the daemon's samples went (per thread, inclusive and self, by function); the raw
folded stacks stay in --out for a flame graph.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_cache import THROTTLE_MBPS
from bench_encfs import EncfsCloud, EncfsCloudFile
from bench_install import ensure_tools
from bench_s3 import BUCKET, choose_server
from bench_system import Env
from bench_util import SCRIPTS, BenchError, drop_caches, kill_all, run, tool, venv_bin
from bench_workloads import build_tree

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def io(*args: str) -> str:
    """One bench_io.py step; its JSON line."""
    cmd = [str(venv_bin() / "python"), str(SCRIPTS / "bench_io.py"), *args]
    return run(cmd, timeout=1800).stdout.strip().splitlines()[-1]


def summarize(folded: Path, top: int = 25) -> list[str]:
    """Per-thread share and the heaviest functions of a py-spy raw (folded) profile."""
    threads: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0].split(":")[0][:60]] += n
        names = []
        for frame in frames[1:]:
            m = FRAME.match(frame)
            names.append(f"{m['func']} ({Path(m['file']).name})" if m else frame)
        for name in dict.fromkeys(names):
            incl[name] += n
        if names:
            self_[names[-1]] += n
    if not total:
        return ["no samples"]
    out = [f"{total} samples"]
    out += [f"  {100 * n / total:5.1f}%  {t}" for t, n in threads.most_common(8)]
    out.append("inclusive:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    out.append("self:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_.most_common(top)]
    return out


def main(argv: list[str] | None = None) -> int:
    """Set up, profile one workload, print the findings; exit 0 unless something broke."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workload", choices=["read", "write", "copy", "untar"], default="read")
    p.add_argument("--store", choices=["s3", "file"], default="s3", help="the daemon's store")
    p.add_argument("--size-mib", type=int, default=256, help="file size for read/write")
    p.add_argument("--tree-files", type=int, default=0, help="cap on untar files (0 = all)")
    p.add_argument("--rtt", type=float, default=0.0, help="added round trip in ms")
    p.add_argument("--s3-server", choices=["seaweedfs", "moto", "rclone"], default="seaweedfs")
    p.add_argument("--cache-size-mib", type=int, default=256)
    p.add_argument("--encfs-opts", default="")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--gil", action="store_true", help="only sample threads holding the GIL")
    p.add_argument("--out", default="daemon-profile.txt", help="raw folded stacks")
    a = p.parse_args(argv)
    s3 = a.store == "s3"
    if not s3 and (a.workload == "copy" or a.rtt):
        p.error("--store file has no network: no --rtt, no copy workload")
    need = {"py-spy", "tar"} | ({"weed"} if s3 and a.s3_server == "seaweedfs" else set())
    missing = ensure_tools(need, True)
    if missing:
        sys.exit(f"bench_profile: {'; '.join(missing.values())}")
    from bench import start_proxy  # the proxy launcher lives with the bench's setup

    work = Path(tempfile.mkdtemp(prefix="encfs-profile-"))
    server = None
    system = None
    try:
        env = Env(workdir=work, cache_size_mib=a.cache_size_mib, encfs_opts=a.encfs_opts)
        if s3:
            server, _, _ = choose_server(work, a.s3_server)
            server.create_bucket(BUCKET)
            env.s3 = server
            env.s3_urls[a.rtt] = start_proxy(work, server.port, a.rtt) if a.rtt else server.url
        system = EncfsCloud(env, a.rtt) if s3 else EncfsCloudFile(env)
        if a.workload == "copy":  # the disk-cache case: a store slower than the disk
            assert server is not None
            system.endpoint_override = start_proxy(work, server.port, 0, THROTTLE_MBPS)
        why_not = system.unavailable()
        if why_not:
            raise BenchError(why_not)
        system.prepare(work / "run")
        size = a.size_mib << 20
        tree = build_tree(work, max_files=a.tree_files) if a.workload == "untar" else None
        system.mount()
        if a.workload == "read":
            io("write", str(system.mnt / "big"), str(size))
            system.unmount()
            drop_caches()
            system.forget_local_cache()
            system.mount()
        pid = system.daemon_pids()[0]
        spy_cmd = [tool("py-spy") or "py-spy", "record", "-p", str(pid), "-o", a.out]
        spy_cmd += ["-f", "raw", "-r", str(a.rate), "--threads", "--nonblocking"]
        spy_cmd += ["--gil"] if a.gil else ["--idle"]
        spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attached before the workload starts
        reqs0 = server.requests() if server else {}
        cpu0, t0 = server.cpu() if server else 0.0, time.perf_counter()
        if a.workload == "read":
            result = io("read", str(system.mnt / "big"))
        elif a.workload == "write":
            result = io("write", str(system.mnt / "big"), str(size))
        elif a.workload == "copy":
            result = io("write", str(system.mnt / "big"), str(size), "--no-fsync")
        else:
            assert tree is not None
            cmd = ["tar", "--no-same-owner", "-xf", str(tree.tarball), "-C", str(system.mnt)]
            subprocess.run(cmd, check=True)
            result = f"{tree.files} files"
        wall = time.perf_counter() - t0
        reqs = server.requests() if server else {}
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        by_type = {k: v - reqs0.get(k, 0) for k, v in reqs.items() if v - reqs0.get(k, 0)}
        print(f"{a.workload} over {a.store} at {a.rtt:g} ms RTT: {wall:.2f}s ({result})")
        if server is not None:
            cpu = server.cpu() - cpu0
            print(f"S3 requests: {sum(by_type.values())} {by_type}; server CPU {cpu:.2f}s")
        print("\n".join(summarize(Path(a.out))))
        print(f"raw folded stacks: {a.out}")
        return 0
    except BenchError as exc:
        print(f"bench_profile: {exc}", file=sys.stderr)
        return 1
    finally:
        if system is not None:
            system.cleanup()
        kill_all()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
