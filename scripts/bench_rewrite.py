"""Issue #13's random-rewrite storage target, measured: a 10-minute fio randwrite on a 1 GiB file.

Mounts a fresh filesystem on a `file://` bucket with the real daemon, writes a 1 GiB file, runs

    fio --rw=randwrite --bs=4k --size=1G --time_based --runtime=600 --fsync=32 --direct=0

on it and, every 15 s while fio runs, sums the sizes of every object in the bucket (packs,
commits, keys, everything) and reads the mount's `status --json` storage figures. Then the ratio
after unmount, after a remount left idle until the compactor and the reaper are done (or
--idle-max seconds), and after `fsck --repair`. Writes docs/bench/rewrite-<date>.json:

    .venv/bin/python scripts/bench_rewrite.py [--runtime 600] [--fsync 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from storage_ratio import BIN, MiB, Session

LIVE = 1 << 30  # the file's logical size: the denominator of every ratio
SAMPLE_S = 15.0


def status(s: Session) -> dict[str, Any]:
    """The mount's own storage figures (pack table), or {} if it does not answer."""
    done = subprocess.run(
        [str(BIN / "encfs-cloud"), "status", str(s.mnt), "--json"],
        env=s.env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        return {}
    storage = json.loads(done.stdout).get("storage") or {}
    return dict(storage) if isinstance(storage, dict) else {}


def bucket(s: Session) -> tuple[int, int]:
    """(bytes, objects) of everything in the bucket folder; an upload's temporary file (or an
    object deleted meanwhile) that vanishes between the listing and its stat is skipped."""
    total = count = 0
    for path in s.bucket.rglob("*"):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
            count += 1
    return total, count


def sample(s: Session, t0: float) -> dict[str, Any]:
    stored, objects = bucket(s)
    row: dict[str, Any] = {
        "t_s": round(time.monotonic() - t0, 1),
        "stored_bytes": stored,
        "ratio": round(stored / LIVE, 4),
        "objects": objects,
    }
    st = status(s)
    if st:
        row["mount_live_bytes"] = st.get("live_bytes")
        row["mount_stored_bytes"] = st.get("stored_bytes")
        row["packs_compacted"] = st.get("packs_compacted")
    print(json.dumps(row), flush=True)
    return row


def mount(s: Session, log: Path) -> None:
    s.run("mount.encfs-cloud", s.source, str(s.mnt), "-o", f"log={log}")


def fill(path: Path) -> None:
    with open(path, "wb") as f:
        for _ in range(LIVE // MiB):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())


def fio_cmd(path: Path, runtime: int, fsync: int, rate_iops: int) -> list[str]:
    rate = [f"--rate_iops={rate_iops}"] if rate_iops else []
    return [
        "fio",
        *rate,
        "--name=randwrite",
        f"--filename={path}",
        "--rw=randwrite",
        "--bs=4k",
        "--size=1G",
        "--time_based",
        f"--runtime={runtime}",
        f"--fsync={fsync}",
        "--direct=0",
        "--ioengine=psync",
        "--output-format=json",
    ]


def run_fio(s: Session, cmd: list[str], t0: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run fio, sampling every SAMPLE_S seconds; returns the samples and fio's summary."""
    samples = []
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            next_at = time.monotonic() + SAMPLE_S
            while proc.poll() is None:
                time.sleep(max(0.0, min(1.0, next_at - time.monotonic())))
                if time.monotonic() >= next_at:
                    samples.append(sample(s, t0))
                    next_at += SAMPLE_S
        finally:
            if proc.poll() is None:  # the sampling failed: fio must not outlive us
                proc.kill()
                proc.wait()
        out.seek(0)
        text = out.read()
    if proc.returncode:
        raise SystemExit(f"fio: exit {proc.returncode}: {text[-2000:]}")
    job = json.loads(text[text.index("{") :])["jobs"][0]["write"]
    return samples, {"iops": job["iops"], "MBps": job["bw_bytes"] / 1e6, "ios": job["total_ios"]}


def idle(s: Session, t0: float, most: float) -> list[dict[str, Any]]:
    """Leave the remounted filesystem alone until the ratio stops moving (or `most` seconds)."""
    samples = [sample(s, t0)]
    end = time.monotonic() + most
    while time.monotonic() < end:
        time.sleep(SAMPLE_S)
        samples.append(sample(s, t0))
        # Stable for 3 minutes: past the 60 s check, the 60 s deletion wait and the 30 s reap.
        window = [r["stored_bytes"] for r in samples[-13:]]
        if len(window) == 13 and max(window) == min(window):
            break
    return samples


def summary(samples: list[dict[str, Any]]) -> dict[str, float]:
    ratios = [r["ratio"] for r in samples]
    return {"max": max(ratios), "median": statistics.median(ratios), "final": ratios[-1]}


def bench(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    s = Session(root)
    log = root / "daemon.log"
    mount(s, log)
    path = s.mnt / "db"
    t0 = time.monotonic()
    fill(path)
    result: dict[str, Any] = {"fill_s": round(time.monotonic() - t0, 1)}
    result["after_fill"] = sample(s, t0)
    cmd = fio_cmd(path, args.runtime, args.fsync, args.rate_iops)
    samples, result["fio"] = run_fio(s, cmd, t0)
    result["during"] = summary(samples)
    result["samples"] = samples
    s.umount()
    result["after_unmount"] = round(bucket(s)[0] / LIVE, 4)
    print(f"after unmount: {result['after_unmount']}", flush=True)
    mount(s, log)
    rest = idle(s, t0, args.idle_max)
    result["idle_samples"] = rest
    s.umount()
    result["after_idle_remount"] = round(bucket(s)[0] / LIVE, 4)
    print(f"after idle remount: {result['after_idle_remount']}", flush=True)
    fsck = subprocess.run(
        [str(BIN / "encfs-cloud"), "fsck", s.source, "--repair", "--yes"],
        env=s.env,
        capture_output=True,
        text=True,
        check=False,
    )
    if fsck.returncode not in (0, 30):  # 30: found something (dead bytes) and repaired it all
        raise SystemExit(f"fsck --repair: exit {fsck.returncode}: {fsck.stderr}")
    result["fsck_exit"] = fsck.returncode
    result["after_fsck_repair"] = round(bucket(s)[0] / LIVE, 4)
    print(f"after fsck --repair: {result['after_fsck_repair']}", flush=True)
    lines = log.read_text(errors="replace").splitlines()
    result["compactor_log"] = [ln for ln in lines if "compact" in ln or "delet" in ln][-200:]
    result["command"] = " ".join(cmd).replace(str(s.mnt), "MOUNTPOINT")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=600, help="fio seconds")
    parser.add_argument("--fsync", type=int, default=32, help="fio: an fsync every N writes")
    parser.add_argument("--rate-iops", type=int, default=0, help="fio: at most N writes/s")
    parser.add_argument("--idle-max", type=float, default=480.0, help="idle remount, seconds")
    parser.add_argument("--out", type=Path, help="JSON result (default docs/bench/rewrite-DATE)")
    args = parser.parse_args()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    out = args.out or Path(__file__).parent.parent / "docs" / "bench" / f"rewrite-{today}.json"
    with tempfile.TemporaryDirectory(prefix="bench-rewrite-") as tmp:
        root = Path(tmp)
        try:
            result = bench(root, args)
        finally:
            mnt = root / "mnt"
            if mnt.is_dir() and os.path.ismount(mnt):
                # Lazy: the daemon sees the unmount and exits once nothing holds the mount.
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    result.update(
        date=today,
        store="file:// bucket (local disk), real mount.encfs-cloud daemon",
        live_bytes=LIVE,
        target={"during_max": 1.5, "after_compaction": 1.05},
    )
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("during", "fio")}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
