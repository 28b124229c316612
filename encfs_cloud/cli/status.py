"""`encfs-cloud status MOUNTPOINT`: what a mount's daemon is doing, asked over its socket."""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

from encfs_cloud.daemon import control

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ago(time_ns: int) -> str:
    when = datetime.datetime.fromtimestamp(time_ns / 1e9).astimezone()
    seconds = max(0, int(time.time() - time_ns / 1e9))
    return f"{when:%Y-%m-%d %H:%M:%S %Z} ({seconds} s ago)"


def render(s: dict[str, Any]) -> str:
    """The status as a few lines for people; `--json` gives the same fields to programs."""
    cache, dirty, tr, commit, err = (
        s["cache"],
        s["dirty"],
        s["transfers"],
        s["last_commit"],
        s["errors"],
    )
    rate = "n/a" if cache["hit_rate"] is None else f"{cache['hit_rate']:.0%}"
    last = (
        f"#{commit['seq']} at {_ago(commit['time_ns'])}"
        if commit["time_ns"]
        else f"#{commit['seq']} (none since mounting)"
    )
    if commit.get("queued"):  # sealed, waiting for the store to accept them
        last += f"; {commit['queued']} more queued"
    lines = [
        f"{s['mountpoint']}: {s.get('source', '?')}, daemon pid {s['pid']}"
        + (", read-only" if s["read_only"] else ""),
        f"  contents:    {s['files']['inodes']} inodes, {human_bytes(s['files']['bytes'])}",
        f"  cache:       {human_bytes(cache['clean_bytes'])} of {human_bytes(cache['capacity'])},"
        f" hit rate {rate} ({cache['hits']} hits, {cache['misses']} misses)",
        f"  dirty:       {human_bytes(dirty['dirty_bytes'])} waiting,"
        f" {human_bytes(dirty['uploading_bytes'])} uploading"
        f" (limit {human_bytes(dirty['limit'])})",
        f"  transfers:   {tr['uploads_in_flight']} uploads"
        f" ({human_bytes(tr['upload_bytes_in_flight'])}), {tr['downloads_in_flight']} downloads"
        f" in flight; up {human_bytes(tr['upload_rate'])}/s,"
        f" down {human_bytes(tr['download_rate'])}/s",
        f"  since mount: {human_bytes(tr['bytes_uploaded'])} uploaded,"
        f" {human_bytes(tr['bytes_fetched'])} fetched, {commit['commits_since_mount']} commits",
        f"  last commit: {last}",
        f"  key generation: {s['key_generation']}",
    ]
    others = s.get("other_devices")
    if isinstance(others, dict):
        lines.append(
            f"  other devices: {others['commits_applied']} commits applied,"
            f" {others['conflicts']} conflict copies made"
        )
    lease = s.get("lease")
    if isinstance(lease, dict):
        lines.append("  lease:       " + ", ".join(f"{k} {v}" for k, v in lease.items()))
    lines.append(
        f"  errors:      {err['upload']} upload, {err['read']} read, {err['integrity']} integrity"
    )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    report = control.query(Path(args.mountpoint))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render(report))
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    from encfs_cloud.cli.args import EXIT_HELP

    p = sub.add_parser(
        "status",
        parents=[common],
        help="show a mount's cache, pending uploads, transfers, last commit and errors",
        description="Ask the daemon serving MOUNTPOINT over its local socket; the bucket is "
        "not contacted, so this answers even while the store is unreachable.",
        epilog=EXIT_HELP,
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_status)
