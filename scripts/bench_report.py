"""Medians, ratios to rclone crypt and to the passthrough, targets, the table and the JSON."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from bench_targets import (
    REFS,
    Target,
    applies,
    external_row,
    format_measured,
    unmatched_reason,
    verdict,
)


@dataclass(frozen=True)
class Metric:
    """One reported figure."""

    key: str
    label: str
    unit: str
    higher_better: bool
    digits: int = 1


def metric_table(size_mib: int, files: int, fio_s: int, rename_files: int) -> list[Metric]:
    """The metrics in report order, labelled with this run's sizes."""
    return [
        Metric("write_fsync_MBps", f"write {size_mib} MiB, until fsync returns", "MB/s", True),
        Metric(
            "write_durable_MBps",
            f"write {size_mib} MiB, until unmounted and durable",
            "MB/s",
            True,
        ),
        Metric("mount_cold_s", "remount after drop_caches", "s", False, 2),
        Metric("read_cold_MBps", f"read {size_mib} MiB after remount (cold)", "MB/s", True),
        Metric("untar_s", f"untar {files} files (tar -x alone)", "s", False, 2),
        Metric(
            "untar_durable_s", f"untar {files} files, until unmounted and durable", "s", False, 2
        ),
        Metric("find_s", "find over the tree after remount (cold)", "s", False, 3),
        Metric("ls_lR_s", "ls -lR over the tree, right after find", "s", False, 3),
        Metric("find_ls_s", "find + ls -lR", "s", False, 3),
        Metric("fio_iops", f"4 KiB random reads, fio {fio_s}s O_DIRECT", "IOPS", True, 0),
        Metric("rename_ms", f"rename(2) of a directory of {rename_files} files", "ms", False, 2),
        Metric("rename_durable_s", "rename + unmount until durable", "s", False, 2),
        Metric("rss_MiB", "daemon peak RSS (sum of VmHWM)", "MiB", False, 0),
        Metric(
            "read_cached_MBps", f"read {size_mib} MiB after remount, disk cache kept", "MB/s", True
        ),
        Metric(
            "read_cached_requests",
            "S3 requests: read after remount, disk cache kept",
            "req",
            False,
            0,
        ),
        Metric(
            "copy_throttled_MBps",
            f"copy {size_mib} MiB onto a store throttled to 20 MB/s, until close",
            "MB/s",
            True,
        ),
        Metric("stored_ratio_file", f"bytes stored / written, {size_mib} MiB file", "x", False, 3),
        Metric("stored_ratio_tree", f"bytes stored / written, {files}-file tree", "x", False, 3),
        Metric("write_requests", "S3 requests: mount, write, unmount", "req", False, 0),
        Metric("read_requests", f"S3 requests: cold read of {size_mib} MiB", "req", False, 0),
        Metric("untar_requests", "S3 requests: untar until unmounted", "req", False, 0),
        Metric("server_cpu_ms_per_req", "S3 server CPU per request", "ms", False, 2),
        Metric("server_cpu_s", "S3 server CPU over the counted steps", "s", False, 2),
    ]


def summarize(runs: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Median over the runs that measured the metric, plus the raw values and errors."""
    vals = [r["values"][metric] for r in runs if metric in r.get("values", {})]
    errs = [r["errors"][metric] for r in runs if metric in r.get("errors", {})]
    out: dict[str, Any] = {"runs": [round(v, 4) for v in vals], "errors": errs}
    out["median"] = statistics.median(vals) if vals else None
    return out


def speedup(value: float | None, ref: float | None, higher_better: bool) -> float | None:
    """How many times better than ref (>1 = better), whatever the metric's direction."""
    if value is None or ref is None or value <= 0 or ref <= 0:
        return None
    return value / ref if higher_better else ref / value


def fmt_num(v: float | None, digits: int) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


class Report:
    """Builds medians/ratios/targets from raw run results and renders them."""

    def __init__(
        self,
        systems: list[dict[str, Any]],
        raw: dict[str, list[dict[str, Any]]],
        metrics: list[Metric],
        goals: list[Target],
    ) -> None:
        self.systems = systems  # [{key, base, title, rtt_ms, uses_s3, skipped}]
        self.raw = raw
        self.metrics = metrics
        self.goals = goals
        self.summary: dict[str, dict[str, Any]] = {}
        for s in systems:
            runs = raw.get(s["key"], [])
            self.summary[s["key"]] = {m.key: summarize(runs, m.key) for m in metrics}

    def _ref_key(self, system: dict[str, Any], base: str) -> str | None:
        """The reference column: same RTT for S3 systems, else the lowest-RTT one."""
        cands = [s for s in self.systems if s["base"] == base and not s.get("skipped")]
        if not cands:
            return None
        if system["uses_s3"]:
            same = [s for s in cands if s["rtt_ms"] == system["rtt_ms"]]
            if same:
                return str(same[0]["key"])
        return str(min(cands, key=lambda s: s["rtt_ms"])["key"])

    def median(self, key: str | None, metric: str) -> float | None:
        if key is None:
            return None
        med = self.summary.get(key, {}).get(metric, {}).get("median")
        return None if med is None else float(med)

    def evaluate(self) -> dict[str, Any]:
        """Ratios to each reference system and target verdicts, per system and metric."""
        out: dict[str, Any] = {}
        for s in self.systems:
            per: dict[str, Any] = {}
            for m in self.metrics:
                value = self.median(s["key"], m.key)
                entry: dict[str, Any] = {}
                for kind, base in REFS.items():
                    ref = self._ref_key(s, base)
                    entry[kind] = speedup(value, self.median(ref, m.key), m.higher_better)
                    entry[kind.replace("x_", "") + "_ref"] = ref
                verdicts = [self.judge(g, s) for g in self.goals if g.metric == m.key]
                verdicts = [v for v in verdicts if v is not None]
                if verdicts:
                    entry["targets"] = verdicts
                per[m.key] = entry
            out[s["key"]] = per
        return out

    def judge(self, goal: Target, s: dict[str, Any]) -> dict[str, Any] | None:
        """The verdict of one target on one column, None if it is not that column's target."""
        if not applies(goal, s):
            return None
        metric = next((m for m in self.metrics if m.key == goal.metric), None)
        value = self.median(s["key"], goal.metric)
        ratio = None
        if goal.kind in REFS and metric is not None:
            ref = self._ref_key(s, REFS[goal.kind])
            ref_value = self.median(ref, goal.ref_metric or goal.metric)
            ratio = speedup(value, ref_value, metric.higher_better)
        return verdict(goal, value, ratio)

    def render(self, header: list[str]) -> str:
        """The human table: one block per metric, one row per system."""
        ev = self.evaluate()
        lines = list(header)
        active = [s for s in self.systems if not s.get("skipped")]
        width = max([len(s["title"]) for s in self.systems] + [20])
        for m in self.metrics:
            if not any(
                self.summary[s["key"]][m.key]["runs"] or self.summary[s["key"]][m.key]["errors"]
                for s in active
            ):
                continue
            direction = "higher is better" if m.higher_better else "lower is better"
            lines.append("")
            lines.append(f"== {m.label}  [{m.unit}, {direction}]")
            lines.append(
                f"  {'system':<{width}}  {'median':>10}  {'runs':<26}  "
                f"{'vs rclone':>9}  {'vs passthru':>11}  target"
            )
            for s in self.systems:
                if s.get("skipped"):
                    continue
                summ = self.summary[s["key"]][m.key]
                e = ev[s["key"]][m.key]
                runs = " ".join(fmt_num(v, m.digits) for v in summ["runs"])
                if summ["errors"]:
                    runs += f" +{len(summ['errors'])} ERR"
                med = fmt_num(summ["median"], m.digits)
                if summ["median"] is None and summ["errors"]:
                    med = "ERR"
                tcell = "; ".join(f"{t['status']} ({t['target']})" for t in e.get("targets", []))
                lines.append(
                    f"  {s['title']:<{width}}  {med:>10}  {runs[:26]:<26}  "
                    f"{fmt_x(e['x_rclone']):>9}  {fmt_x(e['x_passthrough']):>11}  {tcell}"
                )
        lines.append("")
        lines.append("vs rclone / vs passthru: times better than that system (>1 = better)")
        lines.append("  (S3 systems are compared with rclone crypt at the same RTT).")
        skipped = [s for s in self.systems if s.get("skipped")]
        for s in skipped:
            lines.append(f"SKIPPED {s['title']}: {s['skipped']}")
        notes = self.note_lines()
        if notes:
            lines.append("")
            lines.append("Notes from the runs:")
            lines.extend(notes)
        errors = self.error_lines()
        if errors:
            lines.append("")
            lines.append("Errors:")
            lines.extend(errors)
        tsum = self.target_lines(ev)
        if tsum:
            lines.append("")
            lines.append("Targets of issue #13 (encfs-cloud):")
            lines.extend(tsum)
        return "\n".join(lines)

    def note_lines(self) -> list[str]:
        out: list[str] = []
        for s in self.systems:
            runs = self.raw.get(s["key"], [])
            for note in dict.fromkeys(n for r in runs for n in r.get("notes", [])):
                count = sum(note in r.get("notes", []) for r in runs)
                out.append(f"  {s['title']}: {note} ({count}/{len(runs)} runs)")
        return out

    def error_lines(self) -> list[str]:
        out: list[str] = []
        for s in self.systems:
            seen: set[str] = set()
            for m in self.metrics:
                for err in self.summary[s["key"]][m.key]["errors"]:
                    if err not in seen:
                        seen.add(err)
                        out.append(f"  {s['title']}: {err[:400]}")
        return out

    def target_lines(self, ev: dict[str, Any]) -> list[str]:
        """Every target of the issue, once per column it applies to, with the figure reached."""
        return [
            f"  {t['status']:<12} {t['target']}: {t['system']}"
            + (f": {t['shown']}" if t.get("shown") else "")
            + (f" ({t['why']})" if t.get("why") else "")
            for t in self.target_rows(ev)
        ]

    def target_rows(self, ev: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One row per (target, column), or one "not measured" row if no column fits."""
        ev = self.evaluate() if ev is None else ev
        units = {m.key: m.unit for m in self.metrics}
        rows: list[dict[str, Any]] = []
        for goal in self.goals:
            hits = [s for s in self.systems if applies(goal, s)]
            for s in hits:
                found = [
                    t
                    for t in ev[s["key"]].get(goal.metric, {}).get("targets", [])
                    if t["target"] == goal.text
                ]
                tgt = found[0] if found else verdict(goal, None, None)
                shown = format_measured(goal, tgt, units.get(goal.metric, ""))
                rows.append({**tgt, "system": s["title"], "system_key": s["key"], "shown": shown})
            if not hits:
                rows.append(
                    external_row(goal)
                    or {
                        "target": goal.text,
                        "metric": goal.metric,
                        "status": "not measured",
                        "system": "-",
                        "why": unmatched_reason(goal, self.systems),
                    }
                )
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": {
                m.key: {"label": m.label, "unit": m.unit, "higher_is_better": m.higher_better}
                for m in self.metrics
            },
            "summary": self.summary,
            "comparisons": self.evaluate(),
            "targets": self.target_rows(),
        }
