"""`encfs-cloud status MOUNTPOINT`: what a mount's daemon is doing, asked over its socket."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from encfs_cloud.cli.progress import size as human_bytes
from encfs_cloud.daemon import controlclient, runtime
from encfs_cloud.errors import EncfsCloudError, MountpointError
from encfs_cloud.keys.device import DeviceStore
from encfs_cloud.store.profile import StoreProfile


def _ago(time_ns: int) -> str:
    when = datetime.datetime.fromtimestamp(time_ns / 1e9).astimezone()
    seconds = max(0, int(time.time() - time_ns / 1e9))
    return f"{when:%Y-%m-%d %H:%M:%S %Z} ({seconds} s ago)"


def _local(iso: str | None) -> str:
    if not iso:
        return "never"
    return f"{datetime.datetime.fromisoformat(iso).astimezone():%Y-%m-%d %H:%M:%S %Z}"


def _store_line(store: dict[str, Any]) -> str:
    if store.get("reachable") is None:
        return "not asked yet"
    if store["reachable"]:
        line = f"answering (last answer {_local(store.get('last_success'))})"
        oldest = store.get("oldest_request")
        if oldest and oldest["seconds"] >= 5:
            line += f"; waiting {oldest['seconds']:.0f} s for {oldest['request']}"
        return line
    return (
        f"UNREACHABLE since {_local(store.get('failing_since'))}: {store.get('last_error')}"
        f" (last answer {_local(store.get('last_success'))})"
    )


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
    # "uploading" counts data handed to packs, "pack uploads" the packs on the wire: the open
    # pack is sent at the next commit, so the first can be non-zero while the second is 0.
    packs = f"{tr['uploads_in_flight']} pack uploads ({human_bytes(tr['upload_bytes_in_flight'])})"
    if not tr["uploads_in_flight"] and dirty["uploading_bytes"]:
        packs += " (the open pack goes at the next commit)"
    lines = [
        f"{s['mountpoint']}: {s.get('source', '?')}, daemon pid {s['pid']}"
        + (", read-only" if s["read_only"] else ""),
        f"  contents:    {s['files']['inodes']} inodes, {human_bytes(s['files']['bytes'])}",
        f"  cache:       {human_bytes(cache['clean_bytes'])} of {human_bytes(cache['capacity'])},"
        f" hit rate {rate} ({cache['hits']} hits, {cache['misses']} misses)",
        f"  dirty:       {human_bytes(dirty['dirty_bytes'])} waiting,"
        f" {human_bytes(dirty['uploading_bytes'])} in packs not yet in the bucket"
        f" (limit {human_bytes(dirty['limit'])})",
        f"  transfers:   {packs}, {tr['downloads_in_flight']} downloads"
        f" in flight; up {human_bytes(tr['upload_rate'])}/s,"
        f" down {human_bytes(tr['download_rate'])}/s",
        f"  since mount: {human_bytes(tr['bytes_uploaded'])} uploaded,"
        f" {human_bytes(tr['bytes_fetched'])} fetched, {commit['commits_since_mount']} commits",
        f"  last commit: {last}",
        f"  key generation: {s['key_generation']}",
    ]
    if isinstance(s.get("store"), dict):
        lines.append(f"  store:       {_store_line(s['store'])}")
    storage = s.get("storage")
    if isinstance(storage, dict):
        live, stored = storage["live_bytes"], storage["stored_bytes"]
        lines.append(
            f"  storage:     {human_bytes(live)} live in {human_bytes(stored)} stored"
            + (f" ({stored / live:.2f}x)" if live else "")
            + f"; {storage['packs_compacted']} packs compacted since mount"
        )
    disk = s.get("disk_cache")
    if isinstance(disk, dict):
        lines.append(
            f"  disk cache:  {human_bytes(disk['bytes'])} of {human_bytes(disk['capacity'])}"
            f" ({human_bytes(disk['spilled_bytes'])} spilled, waiting for upload),"
            f" {disk['hits']} hits, {disk['misses']} misses, {disk['dropped']} dropped"
        )
    others = s.get("other_devices")
    if isinstance(others, dict):
        lines.append(
            f"  other devices: {others['commits_applied']} commits applied,"
            f" {others['conflicts']} conflict copies made"
        )
    lines.append(
        f"  errors:      {err['upload']} upload, {err['read']} read, {err['integrity']} integrity"
    )
    profile = StoreProfile.from_json(s.get("store_profile"))
    if profile is not None:
        lines.append(f"  store fit:   {profile.summary()}")
    return "\n".join(lines)


# Prometheus text format, for node-exporter's textfile collector: (name, type, help, value).
def _metrics(s: dict[str, Any]) -> list[tuple[str, str, str, float | None]]:
    cache, dirty, tr, commit, err = (
        s["cache"],
        s["dirty"],
        s["transfers"],
        s["last_commit"],
        s["errors"],
    )
    store = s.get("store") or {}
    reachable = store.get("reachable")
    oldest = store.get("oldest_request") or {}
    return [
        ("up", "gauge", "1 while the mount's daemon answers", 1),
        ("read_only", "gauge", "1 for a read-only mount", int(bool(s["read_only"]))),
        ("inodes", "gauge", "inodes in the filesystem", s["files"]["inodes"]),
        ("file_bytes", "gauge", "bytes in files", s["files"]["bytes"]),
        ("cache_clean_bytes", "gauge", "clean bytes in the chunk cache", cache["clean_bytes"]),
        ("cache_capacity_bytes", "gauge", "chunk cache capacity", cache["capacity"]),
        ("cache_hits_total", "counter", "chunk cache hits", cache["hits"]),
        ("cache_misses_total", "counter", "chunk cache misses", cache["misses"]),
        ("dirty_bytes", "gauge", "changed bytes not yet packed", dirty["dirty_bytes"]),
        ("uploading_bytes", "gauge", "in packs not in the bucket", dirty["uploading_bytes"]),
        ("uploads_in_flight", "gauge", "pack uploads in flight", tr["uploads_in_flight"]),
        ("downloads_in_flight", "gauge", "downloads in flight", tr["downloads_in_flight"]),
        ("upload_rate_bytes", "gauge", "upload rate, recent", tr["upload_rate"]),
        ("download_rate_bytes", "gauge", "download rate, recent", tr["download_rate"]),
        ("uploaded_bytes_total", "counter", "bytes uploaded since mounting", tr["bytes_uploaded"]),
        ("fetched_bytes_total", "counter", "bytes fetched since mounting", tr["bytes_fetched"]),
        ("last_commit_seq", "gauge", "number of the newest commit", commit["seq"]),
        (
            "last_commit_timestamp_seconds",
            "gauge",
            "time of the last commit made by this mount",
            commit["time_ns"] / 1e9 if commit["time_ns"] else None,
        ),
        ("commits_total", "counter", "commits since mounting", commit["commits_since_mount"]),
        ("commits_queued", "gauge", "sealed commits waiting for the store", commit["queued"]),
        ("key_generation", "gauge", "key generation sealing new data", s["key_generation"]),
        ("upload_errors_total", "counter", "failed uploads and commits", err["upload"]),
        ("read_errors_total", "counter", "failed reads from the store", err["read"]),
        ("integrity_errors_total", "counter", "failed authentication", err["integrity"]),
        (
            "store_reachable",
            "gauge",
            "1 if the store answered last, 0 if it failed last",
            None if reachable is None else int(bool(reachable)),
        ),
        (
            "store_oldest_request_seconds",
            "gauge",
            "how long the oldest request to the store has waited",
            oldest.get("seconds", 0),
        ),
    ]  # fmt: skip


def prometheus(s: dict[str, Any]) -> str:
    """Every number of the status as Prometheus metrics labelled with the mount point."""

    def quoted(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    labels = f'mountpoint="{quoted(str(s["mountpoint"]))}"'
    out = []
    for name, kind, text, value in _metrics(s):
        if value is None:
            continue
        out.append(f"# HELP encfs_cloud_{name} {text}")
        out.append(f"# TYPE encfs_cloud_{name} {kind}")
        out.append(f"encfs_cloud_{name}{{{labels}}} {float(value):g}")
    return "\n".join(out) + "\n"


def _store_profile(mountpoint: Path) -> dict[str, Any] | None:
    """The profile this device remembered for the mounted store (read locally, not asked)."""
    entry = runtime.registered(mountpoint)
    fs_hex = entry.get("fs_id") if entry else None
    if not isinstance(fs_hex, str):
        return None
    try:
        return DeviceStore().load_state(bytes.fromhex(fs_hex)).store_profile
    except (ValueError, EncfsCloudError):
        return None


def _show(args: argparse.Namespace, report: dict[str, Any]) -> str:
    report["store_profile"] = _store_profile(Path(args.mountpoint))
    if args.json:
        return json.dumps(report, indent=2, sort_keys=True)
    if args.prometheus:
        return prometheus(report).rstrip("\n")
    return render(report)


def cmd_status(args: argparse.Namespace) -> int:
    mountpoint = Path(args.mountpoint)
    if args.watch is None:
        print(_show(args, controlclient.query(mountpoint)))
        return 0
    clear = sys.stdout.isatty() and not (args.json or args.prometheus)
    while True:
        try:
            text = _show(args, controlclient.query(mountpoint))
        except MountpointError:
            print(f"{args.mountpoint}: no longer mounted")
            return 0
        if clear:
            sys.stdout.write("\x1b[H\x1b[2J")  # home and clear: a screen that updates in place
        print(text, flush=True)
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:  # the way to stop watching; nothing to tell
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
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the status as JSON")
    form.add_argument(
        "--prometheus",
        action="store_true",
        help="print Prometheus text format (for node-exporter's textfile collector)",
    )
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="show it again every SECONDS (default 2) until Ctrl-C or the unmount",
    )
    p.set_defaults(func=cmd_status)
