"""Smoke test of bench/ingest_scale.py: the quick run completes, prints its figures and loses nothing.

The throughput itself is recorded in docs/benchmarks-ingest.md, not asserted: other work on
this 2-core machine moves it by a factor of two.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ingest_scale_quick_runs_and_loses_nothing():
    proc = subprocess.run([sys.executable, "-m", "bench.ingest_scale", "--quick", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "ours (fleet.ingest -> store)" in out and "raw (mosquitto_sub -q 1)" in out and "ratio ours/raw" in out
    result = json.loads(out[out.index("\n{\n") + 1:])
    assert result["published"] == 30_000 and result["broker_acked"] == 30_000
    assert result["ours_stored"] == result["published"] and result["raw_lines"] >= result["published"]
    assert result["lost_total"] == 0 and result["lost_gaps"] == 0 and result["lost_tail"] == 0
    assert result["ours_rate"] > 0 and result["raw_rate"] > 0
