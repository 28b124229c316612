"""Smoke test of scripts/bench.py: a tiny passthrough-only run writes well-formed JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3"),
]


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
