"""The README's benchmark table and targets, regenerated from one run's results."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bench_report import Report, fmt_num

BEGIN = "<!-- bench-table -->"
END = "<!-- /bench-table -->"
# Figures that explain others but would crowd the README (they stay in the JSON and the text).
LEFT_OUT = {"write_fsync_MBps", "mount_cold_s", "untar_s", "find_s", "ls_lR_s", "rename_durable_s"}


def short_title(system: dict[str, Any]) -> str:
    """Column title: 'encfs-cloud S3 20 ms' rather than the long label."""
    names = {
        "encfs-s3": "encfs-cloud S3",
        "rclone-crypt": "rclone crypt S3",
        "encfs-file": "encfs-cloud file://",
        "gocryptfs": "gocryptfs",
        "passthrough": "pyfuse3 passthrough",
    }
    title = str(names.get(system["base"], system["title"]))
    if system["uses_s3"] and system["rtt_ms"]:
        title += f" {system['rtt_ms']:g} ms"
    return title


def markdown(report: Report, doc: dict[str, Any]) -> str:
    """The section between the README's markers: intro, figures table, targets table."""
    cols = [s for s in report.systems if not s.get("skipped")]
    cfg, machine = doc["config"], doc["machine"]
    server = doc.get("s3", {}).get("server", "none")
    intro = (
        f"Medians of {cfg['runs']} interleaved run(s), `make bench` on {doc['started'][:10]} "
        f"({machine['cores']} cores, load {machine['loadavg_at_start'][0]:.2f} at the start; "
        f"quote ratios, not absolute figures). S3 is {server} on 127.0.0.1; "
        '"20 ms" puts a delaying proxy between the mount and the server. '
        f"cache_size {cfg['cache_size_mib']}M. Raw results: `docs/bench/`."
    )
    lines = [BEGIN, intro, ""]
    lines.append("| workload | " + " | ".join(short_title(s) for s in cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for m in report.metrics:
        if m.key in LEFT_OUT:
            continue
        cells = [fmt_num(report.median(s["key"], m.key), m.digits) for s in cols]
        if all(c == "-" for c in cells):
            continue
        lines.append(f"| {m.label} ({m.unit}) | " + " | ".join(cells) + " |")
    lines += ["", "| target (issue #13) | column | reached | status |", "|---|---|---|---|"]
    by_key = {s["key"]: s for s in report.systems}
    for row in report.target_rows():
        reached = row.get("shown") or row.get("why", "")
        system = by_key.get(row.get("system_key", ""))
        column = short_title(system) if system else row["system"]
        lines.append(f"| {row['target']} | {column} | {reached} | {row['status']} |")
    lines += _multiwriter_rows(doc.get("multiwriter") or {})
    lines.append(END)
    return "\n".join(lines)


def _multiwriter_rows(mw: dict[str, Any]) -> list[str]:
    """Issue #11's two-writer column: encfs-cloud only (no peer mounts read-write twice)."""
    if not mw or "error" in mw:
        return []
    idle = mw.get("idle_requests_per_hour")
    return [
        "",
        f"| two writers, encfs-cloud S3 (poll_interval {mw['poll_interval_s']:g} s) | figure |",
        "|---|---|",
        f"| write+close on A until visible on B, median / p95 (s) | "
        f"{mw['propagation_median_s']} / {mw['propagation_p95_s']} |",
        f"| commits/s, 3 writers in a loop (failed fsyncs) | "
        f"{mw['three_writers_commits_per_s']} ({mw.get('three_writers_failed_fsyncs', 0)}) |",
        f"| idle mount, S3 requests per hour | {idle if idle is not None else '-'} |",
    ]


def replace_section(text: str, section: str) -> str:
    """Put section in place of the one between the markers (or of the lone BEGIN marker's
    paragraphs up to the next heading, for a README written before END existed)."""
    if BEGIN in text and END in text:
        pattern = re.escape(BEGIN) + r".*?" + re.escape(END)
        return re.sub(pattern, lambda _: section, text, count=1, flags=re.S)
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        nxt = re.search(r"^## ", rest, flags=re.M)
        tail = rest[nxt.start() :] if nxt else ""
        return head + section + "\n\n" + tail
    raise ValueError(f"README has no {BEGIN} marker")


def publish(report: Report, doc: dict[str, Any], text: str, repo: Path) -> list[Path]:
    """Write the raw results to docs/bench/ and regenerate the README's table."""
    day = doc["started"][:10]
    out = repo / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    raw, txt = out / f"bench-{day}.json", out / f"bench-{day}.txt"
    raw.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    txt.write_text(text + "\n")
    readme = repo / "README.md"
    readme.write_text(replace_section(readme.read_text(), markdown(report, doc)))
    return [raw, txt, readme]
