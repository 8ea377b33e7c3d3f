"""Every benchmark runs in --quick mode as a real process and prints our figure beside the raw one.

These check that the benchmarks work and report ratios, not the figures themselves (a loaded
CI machine would make any threshold flaky): the figures live in docs/benchmarks.md.
Converted models are cached in bench/.cache/; on an empty cache the first run converts the
small MobileNetV2 (about a minute), later runs take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# benchmark -> columns that must be in its table (the ratio against the baseline among them)
EXPECTED = {
    "converter_digits": ["accuracy %", "Δ vs Keras pts", "size vs float32", "median ms"],
    "runtime_mobilenet": ["litert median ms", "2.14 median ms", "ratio 2.14/litert", "2.14 loads it"],
    "agent_inference": ["median ms", "raw median ms", "ratio vs raw", "overhead"],
    "agent_idle": ["CPU % of a core", "RSS MB (median)", "RSS vs raw", "CPU vs raw (points)"],
    "decrypt_load": ["raw load ms", "encrypted load ms", "ratio vs raw"],
}


def run_quick(name: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    start = proc.stdout.find("\n{\n")
    assert start >= 0, f"bench.{name} printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc, json.loads(proc.stdout[start:])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_benchmark_quick_prints_ratios(name: str) -> None:
    proc, doc = run_quick(name)
    table = proc.stdout[:proc.stdout.find("\n{\n")]
    for column in EXPECTED[name]:
        assert column in doc["columns"], f"bench.{name}: column {column!r} missing from {doc['columns']}"
        assert column.split()[0] in table   # the printed table carries it too (rich may wrap headers)
    assert doc["rows"], f"bench.{name} measured nothing"
    ratio_columns = [i for i, c in enumerate(doc["columns"]) if "vs" in c or "ratio" in c]
    assert ratio_columns, f"bench.{name}: no ratio column in {doc['columns']}"
    filled = [row[i] for row in doc["rows"] for i in ratio_columns if row[i] not in (None, "-")]
    assert filled, f"bench.{name}: every ratio cell is empty: {doc['rows']}"
    assert doc["machine"]["cores"] and doc["machine"]["date"]
    # the exit status tells whether every acceptance check passed, and the output says which
    assert doc["verdicts"], f"bench.{name} printed no PASS/FAIL verdict"
    for verdict in doc["verdicts"]:
        assert f"{'PASS' if verdict['passed'] else 'FAIL'}  {verdict['name']}" in table
    all_passed = all(v["passed"] for v in doc["verdicts"])
    assert proc.returncode == (0 if all_passed else 1), proc.stderr[-3000:]
