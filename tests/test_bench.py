"""`bench/run.py` runs end to end (a small subset, in quick mode, without the llm venv).

It measures nothing here: no timing is asserted; only that the suite works and reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_subset_runs_and_reports(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--no-tools", "--only", "startup,append",
         "--runs", "2", "--out", str(tmp_path), "--work", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "results.md").read_text()
    for heading in ("### Start-up", "### History growth", "### Summary"):
        assert heading in report
    assert "targets met" in report
    assert (tmp_path / "results.json").exists()
    assert not list(tmp_path.glob("work-*")), "the bench left its stores behind"
