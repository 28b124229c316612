"""Benchmark encfs-cloud side by side with rclone crypt, gocryptfs and a pyfuse3 passthrough."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import select
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import bench_multiwriter
from bench_args import FAIRNESS, parse_args
from bench_cache import THROTTLE_MBPS
from bench_install import ensure_tools, machine_baseline, versions
from bench_readme import publish
from bench_report import Report, metric_table
from bench_s3 import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, S3Server, choose_server
from bench_systems import Env, System, make_systems
from bench_targets import targets
from bench_util import (
    REPO,
    SCRIPTS,
    BenchError,
    kill_all,
    log,
    rmtree,
    spawn,
    unmount_all_under,
    venv_bin,
)
from bench_workloads import Config, Tree, build_tree, run_once


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def start_proxy(workdir: Path, upstream_port: int, rtt_ms: float, rate_mbps: float = 0) -> str:
    """Start bench_proxy.py in front of the S3 server and return its URL."""
    cmd = [
        str(venv_bin() / "python"),
        str(SCRIPTS / "bench_proxy.py"),
        "--upstream",
        f"127.0.0.1:{upstream_port}",
        "--rtt-ms",
        f"{rtt_ms:g}",
        "--rate-mbps",
        f"{rate_mbps:g}",
    ]
    name = f"proxy-{rtt_ms:g}" + (f"-{rate_mbps:g}MBps" if rate_mbps else "")
    proc = spawn(cmd, log_path=workdir / f"{name}.log", stdout_pipe=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("LISTENING "):
        raise BenchError(f"delay proxy did not start: {line!r}")
    return f"http://127.0.0.1:{int(line.split()[1])}"


def needed_tools(systems: list[System], workloads: list[str], s3_server: str) -> set[str]:
    need = {"fusermount3"}
    bases = {s.base for s in systems}
    if "rclone-crypt" in bases:
        need.add("rclone")
    if "gocryptfs" in bases:
        need.add("gocryptfs")
    if any(s.uses_s3 for s in systems):
        need |= {"weed", "moto_server", "rclone"} if s3_server == "auto" else set()
        need |= {"weed"} if s3_server == "seaweedfs" else set()
        need |= {"moto_server"} if s3_server == "moto" else set()
        need |= {"rclone"} if s3_server == "rclone" else set()
    if "fio" in workloads:
        need.add("fio")
    if "untar" in workloads or "ls" in workloads:
        need.add("tar")
    return need


class Bench:
    """Holds one benchmark invocation's state so cleanup can always find everything."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.argv = argv
        self.started = dt.datetime.now()
        parent = args.workdir or tempfile.gettempdir()
        self.workdir = Path(tempfile.mkdtemp(prefix="encfs-bench-", dir=parent))
        self.systems: list[System] = []
        self.server: S3Server | None = None
        self.raw: dict[str, list[dict[str, Any]]] = {}
        self.skipped: dict[str, str] = {}
        self.abandoned: set[str] = set()
        self.doc: dict[str, Any] = {}
        self.multiwriter: dict[str, Any] = {}
        out_dir = Path(args.out_dir)
        stamp = self.started.strftime("%Y%m%d-%H%M%S")
        self.json_path = Path(args.json) if args.json else out_dir / f"bench-{stamp}.json"

    # -- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        env = Env(
            workdir=self.workdir,
            cache_size_mib=a.cache_size_mib,
            encfs_opts=a.encfs_opts,
            rclone_write_back=a.rclone_write_back,
            unmount_timeout=a.step_timeout,
        )
        self.env = env
        self.systems = make_systems(env, a.only, a.rtts)
        self.notes: list[str] = []
        if not Path("/dev/fuse").exists():
            for s in self.systems:
                self.skipped[s.key] = "/dev/fuse missing"
        if os.geteuid() != 0:
            self.notes.append("not root: page caches cannot be dropped, apt cannot install")
        missing = ensure_tools(
            needed_tools(self.systems, a.workloads, a.s3_server), not a.no_install
        )
        self.notes.extend(missing.values())
        self.versions = versions()
        self.machine = machine_baseline(self.workdir)
        for s in self.systems:
            if s.key in self.skipped:
                continue
            if s.base == "rclone-crypt" and "rclone" in missing:
                self.skipped[s.key] = missing["rclone"]
            elif s.base == "gocryptfs" and "gocryptfs" in missing:
                self.skipped[s.key] = missing["gocryptfs"]
        # S3 server and, per RTT, a delay proxy.
        self.s3_doc: dict[str, Any] = {}
        wants_s3 = [s for s in self.systems if s.uses_s3 and s.key not in self.skipped]
        if wants_s3:
            try:
                self.server, probe, why = choose_server(self.workdir, a.s3_server)
                self.server.create_bucket(BUCKET)
                env.s3 = self.server
                for rtt in a.rtts:
                    env.s3_urls[rtt] = (
                        start_proxy(self.workdir, self.server.port, rtt) if rtt else self.server.url
                    )
                if "cache" in a.workloads and any(s.base == "encfs-s3" for s in wants_s3):
                    env.s3_throttled_url = start_proxy(
                        self.workdir, self.server.port, 0, THROTTLE_MBPS
                    )
                self.s3_doc = {
                    "server": self.server.name,
                    "why": why,
                    "probe": probe,
                    "notes": self.server.notes,
                    "urls": {f"{k:g}": v for k, v in env.s3_urls.items()},
                }
            except Exception as exc:
                for s in wants_s3:
                    self.skipped[s.key] = f"S3 server: {exc}"
                self.s3_doc = {"error": str(exc)}
        for s in self.systems:
            if s.key not in self.skipped:
                why_not = s.unavailable()
                if why_not:
                    self.skipped[s.key] = why_not
        need_tree = any(w in a.workloads for w in ("untar", "ls"))
        self.tree = (
            build_tree(self.workdir, max_files=a.tree_files)
            if need_tree
            else Tree(self.workdir / "none.tar", 0, 0, 0, "not built")
        )

    # -- running --------------------------------------------------------------------------
    def config(self) -> Config:
        a = self.args
        return Config(
            size_mib=a.size_mib,
            fio_seconds=a.fio_seconds,
            fio_jobs=a.fio_jobs,
            rename_files=a.rename_files,
            workloads=a.workloads,
            step_timeout=a.step_timeout,
        )

    def run(self) -> None:
        cfg = self.config()
        active = [s for s in self.systems if s.key not in self.skipped]
        for r in range(self.args.runs):
            for s in active:
                if s.key in self.skipped:
                    continue
                log(f"run {r + 1}/{self.args.runs}: {s.key}")
                run_dir = self.workdir / "runs" / f"{s.key.replace('@', '-')}-{r + 1}"
                result = run_once(s, cfg, self.tree, run_dir)
                result["run"] = r + 1
                self.raw.setdefault(s.key, []).append(result)
                got = ", ".join(f"{k}={v:.3g}" for k, v in result["values"].items())
                log(f"  {s.key}: {got or 'nothing measured'} ({result['wall_s']}s)")
                if r == 0 and not result["values"] and self.args.runs > 1:
                    first = next(iter(result["errors"].values()), "failed")
                    self.skipped[s.key] = f"abandoned after run 1 failed: {first[:200]}"
                    self.abandoned.add(s.key)
                self.write_json(final=False)

    def run_multiwriter(self) -> None:
        """The two-writer column: encfs-cloud alone (no peer mounts read-write twice)."""
        if "multiwriter" not in self.args.workloads:
            return
        ours = [s for s in self.systems if s.base == "encfs-s3" and s.rtt_ms == 0]
        if self.server is None or not ours or ours[0].key in self.skipped:
            self.multiwriter = {"error": "no encfs-cloud over S3 at 0 ms in this run"}
            return
        server = self.server
        env = dict(
            os.environ,
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_DEFAULT_REGION=REGION,
            AWS_ENDPOINT_URL=server.url,
            **server.client_env,
        )
        smoke = self.args.smoke
        log("two writers: propagation, three-writer commits, idle requests")
        try:
            self.multiwriter = bench_multiwriter.measure(
                self.workdir / "multiwriter",
                f"s3://{BUCKET}/multiwriter",
                env,
                mount_opts=[f"endpoint_url={server.url}"],
                poll=1.0 if smoke else 5.0,
                rounds=5 if smoke else 30,
                seconds=5 if smoke else 20,
                idle_seconds=20 if smoke else 300,
                count_requests=server.requests if server.requests() else None,
            )
        except (bench_multiwriter.MultiwriterError, OSError) as exc:
            self.multiwriter = {"error": str(exc)[:300]}
        finally:
            server.delete_prefix(BUCKET, "multiwriter")
        for line in bench_multiwriter.lines(self.multiwriter):
            log(line)

    # -- output ---------------------------------------------------------------------------
    def report(self) -> Report:
        a = self.args
        metrics = metric_table(a.size_mib, self.tree.files, a.fio_seconds, a.rename_files)
        wanted = {m for w in a.workloads for m in _workload_metrics(w)}
        metrics = [m for m in metrics if m.key in wanted]
        sysdocs = [
            {
                "key": s.key,
                "base": s.base,
                "title": s.title,
                "rtt_ms": s.rtt_ms,
                "uses_s3": s.uses_s3,
                "skipped": None if s.key in self.abandoned else self.skipped.get(s.key),
                "note": self.skipped.get(s.key),
            }
            for s in self.systems
        ]
        return Report(sysdocs, self.raw, metrics, targets(a.cache_size_mib, a.size_mib))

    def header(self) -> list[str]:
        m, a = self.machine, self.args
        lines = [
            f"encfs-cloud benchmark  {self.started:%Y-%m-%d %H:%M:%S}  "
            f"command: {' '.join(self.argv) or '(defaults)'}",
            f"machine: {m['cores']} cores ({m['cores_usable']} usable), {m['cpu_model']}, "
            f"kernel {m['kernel']}, {m['mem_total_MiB']} MiB RAM, "
            f"load {m['loadavg_at_start'][0]:.2f}",
            f"baseline: sha256 {m['sha256_MBps_1thread']} MB/s, AES-256-GCM "
            f"{m['aes256gcm_MBps_1thread']} MB/s (1 thread), memcpy {m['memcpy_MBps']} MB/s, "
            f"disk write+fsync {m['disk_write_fsync_MBps']} MB/s",
            "versions: " + "; ".join(f"{k} {v}" for k, v in self.versions.items()),
            f"config: {a.runs} runs (median, systems interleaved), {a.size_mib} MiB file, "
            f"fio {a.fio_seconds}s x {a.fio_jobs} job(s), rename {a.rename_files} files, "
            f"encfs-cloud cache_size {a.cache_size_mib} MiB, "
            f"RTT {','.join(f'{r:g}' for r in a.rtts)} ms",
        ]
        if self.tree.files:
            lines.append(
                f"tree: {self.tree.files} files, {self.tree.dirs} dirs, "
                f"{self.tree.nbytes / 1e6:.1f} MB ({self.tree.note})"
            )
        if self.s3_doc:
            lines.append(f"S3 server: {self.s3_doc.get('why') or self.s3_doc.get('error')}")
            probe = self.s3_doc.get("probe", {}).get(self.server.name if self.server else "", {})
            if self.server is not None and not probe:
                probe = next(iter(self.s3_doc.get("probe", {}).values()), {})
            if "server_cpu_ms_per_request" in probe:
                lines.append(
                    f"  server CPU in the probe: {probe['server_cpu_ms_per_request']} ms per "
                    f"small request (4 KiB PUT, 4 KiB ranged GET), {probe['server_cpu_s_per_GB']} "
                    "s per GB moved (8 MiB PUT+GET); per run: 'S3 server CPU per request' below"
                )
            lines.extend(f"  note: {n}" for n in self.s3_doc.get("notes", []))
        if any(r > 0 for r in a.rtts) and self.server is not None:
            lines.append(
                "RTT: scripts/bench_proxy.py delays every chunk by RTT/2 each way (one RTT per "
                "request/response turn, +1 RTT per new connection; no bandwidth/window limit)"
            )
        lines.extend(f"fairness: {n}" for n in FAIRNESS)
        lines.extend(f"note: {n}" for n in self.notes)
        return lines

    def write_json(self, final: bool) -> dict[str, Any]:
        rep = self.report()
        doc: dict[str, Any] = {
            "schema": "encfs-cloud-bench/1",
            "complete": final,
            "started": self.started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now().isoformat(timespec="seconds") if final else None,
            "command": [sys.executable, *sys.argv],
            "config": {
                "runs": self.args.runs,
                "size_mib": self.args.size_mib,
                "fio_seconds": self.args.fio_seconds,
                "fio_jobs": self.args.fio_jobs,
                "rename_files": self.args.rename_files,
                "tree_files": self.tree.files,
                "workloads": self.args.workloads,
                "rtt_ms": self.args.rtts,
                "cache_size_mib": self.args.cache_size_mib,
                "rclone_write_back": self.args.rclone_write_back,
                "smoke": self.args.smoke,
            },
            "machine": self.machine,
            "versions": self.versions,
            "s3": self.s3_doc,
            "tree": {
                "files": self.tree.files,
                "dirs": self.tree.dirs,
                "bytes": self.tree.nbytes,
                "note": self.tree.note,
            },
            "fairness": FAIRNESS,
            "notes": self.notes,
            "systems": rep.systems,
            "raw": self.raw,
            "multiwriter": self.multiwriter,
            **rep.to_json(),
        }
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.json_path)
        return doc

    def cleanup(self) -> None:
        for s in self.systems:
            try:
                s.cleanup()
            except Exception as exc:
                log(f"cleanup {s.key}: {exc}")
        kill_all()
        unmount_all_under(self.workdir)
        if self.args.keep:
            log(f"kept {self.workdir}")
        else:
            rmtree(self.workdir)


def _workload_metrics(workload: str) -> list[str]:
    from bench_workloads import WORKLOAD_METRICS

    return WORKLOAD_METRICS.get(workload, [])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; exit 0 unless the harness itself broke."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    bench = Bench(args, argv)
    t0 = time.monotonic()
    try:
        bench.setup()
        for line in bench.header():
            print(line, flush=True)
        bench.run()
        bench.run_multiwriter()
        doc = bench.write_json(final=True)
        report = bench.report()
        table = report.render([])
        if bench.multiwriter:
            table += "\n\n" + "\n".join(bench_multiwriter.lines(bench.multiwriter))
        print(table)
        if args.update_readme:
            text = "\n".join([*bench.header(), table])
            for path in publish(report, doc, text, REPO):
                log(f"wrote {path}")
        print(f"\nresults: {bench.json_path}  ({time.monotonic() - t0:.0f}s)")
        return 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
