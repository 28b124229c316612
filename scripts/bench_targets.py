"""Issue #13's targets for encfs-cloud and their verdicts (met / NOT met / not measured)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Reference systems a target can be a ratio to, by their base name.
REFS = {"x_rclone": "rclone-crypt", "x_passthrough": "passthrough", "x_gocryptfs": "gocryptfs"}


@dataclass(frozen=True)
class Target:
    """One goal. kind: a key of REFS (speed-up over that system >= value), "max" (figure <=
    value), or "external" (measured elsewhere: reported, never judged here)."""

    metric: str
    text: str
    kind: str
    value: float
    store: str = "s3"  # which encfs-cloud systems it applies to: "s3", "file" or "any"
    rtt_ms: float | None = None  # only this RTT column; None = every column
    ref_metric: str = ""  # compare with this metric of the reference (default: the same)


def targets(cache_size_mib: int, size_mib: int) -> list[Target]:
    """The table of issue #13, in its order."""
    big = "" if size_mib == 256 else f" (this run: {size_mib} MiB)"
    return [
        Target("write_durable_MBps", "write until durable >= 1.5x rclone crypt", "x_rclone", 1.5),
        Target("read_cold_MBps", "cold sequential read >= 1.5x rclone crypt", "x_rclone", 1.5),
        Target(
            "untar_durable_s", "untar until durable >= 3x rclone crypt", "x_rclone", 3.0, rtt_ms=0
        ),
        Target(
            "untar_durable_s",
            "untar until durable <= 1.5x the passthrough's time",
            "x_passthrough",
            1 / 1.5,
            rtt_ms=0,
        ),
        Target("find_ls_s", "find + ls -lR >= 5x rclone crypt", "x_rclone", 5.0, rtt_ms=0),
        Target("find_ls_s", "find + ls -lR >= 30x rclone crypt", "x_rclone", 30.0, rtt_ms=20),
        Target("fio_iops", "4 KiB random reads >= 3x rclone crypt", "x_rclone", 3.0),
        Target("write_durable_MBps", "write >= 1.0x gocryptfs", "x_gocryptfs", 1.0, store="file"),
        Target("read_cold_MBps", "read >= 1.0x gocryptfs", "x_gocryptfs", 1.0, store="file"),
        Target(
            "untar_durable_s",
            "untar <= 1.3x gocryptfs's time",
            "x_gocryptfs",
            1 / 1.3,
            store="file",
        ),
        Target(
            "rss_MiB",
            f"daemon peak RSS <= cache_size + 100 MiB = {cache_size_mib + 100} MiB",
            "max",
            cache_size_mib + 100.0,
            store="any",
        ),
        Target(
            "stored_ratio_file",
            f"bytes stored / written <= 1.03 for a 256 MiB file{big}",
            "max",
            1.03,
            store="any",
        ),
        Target(
            "stored_ratio_tree", "bytes stored / written <= 1.15 for the tree", "max", 1.15, "any"
        ),
        # The disk cache (issue #13): "at disk speed" = the passthrough's figure on this disk.
        Target(
            "read_cached_MBps",
            "second cold read after remount (disk cache) >= 0.8x passthrough cold read",
            "x_passthrough",
            0.8,
            ref_metric="read_cold_MBps",
        ),
        Target(
            "copy_throttled_MBps",
            "copy onto a store throttled to 20 MB/s >= 0.8x passthrough write",
            "x_passthrough",
            0.8,
            rtt_ms=0,
            ref_metric="write_fsync_MBps",
        ),
        Target(
            "rewrite_stored_ratio",
            "random rewrite: stored/written <= 1.5 always, <= 1.05 after compaction",
            "external",
            0.0,
            store="any",
        ),
        Target(
            "scale",
            "1,000,000-file tree: mount 1.4 s, RSS 150 MiB, ls -l of 100,000 entries 0.5 s",
            "external",
            0.0,
            store="any",
        ),
    ]


EXTERNAL = {
    "rewrite_stored_ratio": "not measured by make bench: run scripts/bench_rewrite.py (10 min)",
    "scale": "not measured by make bench: scripts/bench_scale.py --json docs/bench/scale-DATE.json",
}


BENCH_DIR = Path(__file__).resolve().parent.parent / "docs" / "bench"


def external_row(goal: Target) -> dict[str, Any] | None:
    """A target measured by a script of its own, judged from the newest result it wrote in
    docs/bench/ (None if it never ran)."""
    judged = {"rewrite_stored_ratio": _rewrite, "scale": _scale}.get(goal.metric)
    found = judged() if judged else None
    if found is None:
        return None
    met, measured, shown = found
    return {
        "target": goal.text,
        "metric": goal.metric,
        "kind": goal.kind,
        "system": "encfs-cloud file://",
        "status": "met" if met else "NOT met",
        "measured": measured,
        "shown": shown,
    }


def _newest(pattern: str, keep: Callable[[dict[str, Any]], bool]) -> tuple[str, Any] | None:
    """The last by name of the results in docs/bench/ matching `pattern` that `keep` accepts."""
    for path in sorted(BENCH_DIR.glob(pattern), reverse=True):
        run = json.loads(path.read_text())
        if keep(run):
            return path.name, run
    return None


def _rewrite() -> tuple[bool, float, str] | None:
    """scripts/bench_rewrite.py at full speed (runs slowed with --rate-iops are not the
    target's workload): the most during fio, and after the remounted filesystem's own
    compaction."""
    found = _newest("rewrite-2*.json", lambda run: "--rate_iops" not in str(run.get("command")))
    if found is None:
        return None
    name, run = found
    during, after = run["during"]["max"], run["after_idle_remount"]
    shown = (
        f"max {during:.2f}x during fio, {after:.3f}x after the mount compacted,"
        f" {run['after_fsck_repair']:.3f}x after fsck --repair ({name})"
    )
    return during <= 1.5 and after <= 1.05, during, shown


def _scale() -> tuple[bool, float, str] | None:
    """scripts/bench_scale.py at 1,000,000 files: mount, RSS after it, `ls -l` of the
    100,000-entry directory (listing + lstats where `ls -l` itself was not timed)."""
    found = _newest("scale-2*.json", lambda run: run.get("files") == 1_000_000)
    if found is None:
        return None
    name, run = found
    listed = run["listdir_big_s"] + run["ls_l_big_s"]
    mount, rss = run["mount_s"], run["rss_after_mount_MiB"]
    # `ls -l` itself when the run timed it: it also asks xattrs of every file, which the
    # listing and lstats (served from readdirplus) do not.
    tool = run.get("ls_l_tool_s")
    ls = listed if tool is None else tool
    shown = f"mount {mount:.2f} s, RSS {rss:.0f} MiB, listing + lstats {listed:.2f} s"
    shown += "" if tool is None else f", ls -l {tool:.1f} s"
    return mount <= 1.4 and rss <= 150 and ls <= 0.5, rss, shown + f" ({name})"


def applies(goal: Target, system: dict[str, Any]) -> bool:
    """Is this target about this (encfs-cloud) column?"""
    if goal.kind == "external" or not system["base"].startswith("encfs") or system.get("skipped"):
        return False
    if goal.store == "s3" and not system["uses_s3"]:
        return False
    if goal.store == "file" and system["uses_s3"]:
        return False
    return goal.rtt_ms is None or not system["uses_s3"] or system["rtt_ms"] == goal.rtt_ms


def verdict(goal: Target, value: float | None, ratio: float | None) -> dict[str, Any]:
    """Judge one figure: value is the system's median, ratio its speed-up over the reference."""
    out: dict[str, Any] = {"target": goal.text, "metric": goal.metric, "kind": goal.kind}
    if goal.kind == "external":
        out["status"] = "not measured"
        out["why"] = EXTERNAL.get(goal.metric, "")
        return out
    measured = value if goal.kind == "max" else ratio
    if value is None:
        out["status"] = "not measured"
        out["why"] = "no figure: workload not run, failed or unsupported (see above)"
        return out
    if measured is None:
        out["status"] = "not measured"
        out["why"] = f"no {REFS.get(goal.kind, 'reference')} figure"
        return out
    met = measured <= goal.value if goal.kind == "max" else measured >= goal.value
    out.update(status="met" if met else "NOT met", measured=measured, value=value)
    return out


def unmatched_reason(goal: Target, systems: list[dict[str, Any]]) -> str:
    """Why no column of this run is judged against the target."""
    if goal.kind == "external":
        return EXTERNAL.get(goal.metric, "")
    wanted = {"s3": "encfs-s3", "file": "encfs-file", "any": "encfs-s3 or encfs-file"}[goal.store]
    if goal.rtt_ms is not None and goal.store == "s3":
        return f"needs {wanted} at --rtt {goal.rtt_ms:g}"
    return f"needs {wanted} in --only"


def format_measured(goal: Target, tgt: dict[str, Any], unit: str) -> str:
    """The figure reached, in the target's terms."""
    measured = tgt.get("measured")
    if measured is None:
        return ""
    if goal.kind == "max":
        return f"{measured:.3g} {unit}".rstrip()
    ref = REFS[goal.kind].replace("-crypt", " crypt")
    if goal.value < 1:  # a time budget: show it as a time ratio
        return f"{1 / measured:.2f}x {ref}'s time"
    return f"{measured:.2f}x {ref}"
