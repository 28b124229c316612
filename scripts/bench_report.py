"""Medians, ratios to rclone crypt and to the passthrough, targets, the table and the JSON."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any


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
        Metric("fio_iops", f"4 KiB random reads, fio {fio_s}s O_DIRECT (IOPS)", "IOPS", True, 0),
        Metric("rename_ms", f"rename(2) of a directory of {rename_files} files", "ms", False, 2),
        Metric("rename_durable_s", "rename + unmount until durable", "s", False, 2),
        Metric("rss_MiB", "daemon peak RSS (sum of VmHWM)", "MiB", False, 0),
    ]


@dataclass(frozen=True)
class Target:
    """A goal from the project's issue; applies to encfs-cloud rows."""

    metric: str
    text: str
    kind: str  # "x_rclone" (speed-up >= value), "max" (value <= limit)
    value: float
    min_rtt_ms: float = 0.0
    s3_only: bool = True


def targets(cache_size_mib: int) -> list[Target]:
    """The project's targets for encfs-cloud."""
    return [
        Target("write_durable_MBps", ">=1.0x rclone", "x_rclone", 1.0),
        Target("read_cold_MBps", ">=1.0x rclone", "x_rclone", 1.0),
        Target("untar_durable_s", ">=3x rclone", "x_rclone", 3.0),
        Target("find_ls_s", ">=5x rclone at >=20 ms RTT", "x_rclone", 5.0, min_rtt_ms=20),
        Target("fio_iops", ">=1.0x rclone", "x_rclone", 1.0),
        Target("rename_ms", "<=50 ms", "max", 50.0, s3_only=False),
        Target(
            "rss_MiB",
            f"<= cache_size+150 = {cache_size_mib + 150} MiB",
            "max",
            cache_size_mib + 150.0,
            s3_only=False,
        ),
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
        """Ratios and target verdicts per system and metric."""
        out: dict[str, Any] = {}
        for s in self.systems:
            per: dict[str, Any] = {}
            for m in self.metrics:
                value = self.median(s["key"], m.key)
                r_key = self._ref_key(s, "rclone-crypt")
                p_key = self._ref_key(s, "passthrough")
                entry: dict[str, Any] = {
                    "x_rclone": speedup(value, self.median(r_key, m.key), m.higher_better),
                    "x_passthrough": speedup(value, self.median(p_key, m.key), m.higher_better),
                    "rclone_ref": r_key,
                    "passthrough_ref": p_key,
                }
                goal = next((g for g in self.goals if g.metric == m.key), None)
                if goal is not None and s["base"].startswith("encfs"):
                    entry["target"] = self._verdict(s, goal, value, entry["x_rclone"])
                per[m.key] = entry
            out[s["key"]] = per
        return out

    @staticmethod
    def _verdict(
        s: dict[str, Any], goal: Target, value: float | None, x_rclone: float | None
    ) -> dict[str, Any] | None:
        if goal.s3_only and not s["uses_s3"]:
            return None
        if s["rtt_ms"] < goal.min_rtt_ms:
            return {"target": goal.text, "status": f"n/a (needs --rtt {goal.min_rtt_ms:g})"}
        measured = x_rclone if goal.kind == "x_rclone" else value
        if value is None:
            return {"target": goal.text, "status": "unknown (no figure)"}
        if measured is None:
            return {"target": goal.text, "status": "unknown (no rclone figure)"}
        met = measured >= goal.value if goal.kind == "x_rclone" else measured <= goal.value
        return {"target": goal.text, "status": "met" if met else "NOT met", "measured": measured}

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
                tgt = e.get("target")
                tcell = f"{tgt['status']} ({tgt['target']})" if tgt else ""
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
            lines.append("Targets (encfs-cloud):")
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
        out: list[str] = []
        for s in self.systems:
            if s.get("skipped") or not s["base"].startswith("encfs"):
                continue
            for m in self.metrics:
                tgt = ev[s["key"]][m.key].get("target")
                if not tgt:
                    continue
                measured = tgt.get("measured")
                shown = ""
                if measured is not None:
                    goal = next(g for g in self.goals if g.metric == m.key)
                    shown = (
                        f"{measured:.2f}x rclone"
                        if goal.kind == "x_rclone"
                        else f"{measured:.1f} {m.unit}"
                    )
                out.append(
                    f"  {tgt['status']:<9} {s['title']}: {m.label}: {shown} "
                    f"(target {tgt['target']})"
                )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": {
                m.key: {"label": m.label, "unit": m.unit, "higher_is_better": m.higher_better}
                for m in self.metrics
            },
            "summary": self.summary,
            "comparisons": self.evaluate(),
        }
