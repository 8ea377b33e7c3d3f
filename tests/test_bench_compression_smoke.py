"""bench.compression in --quick mode on the digits CNN, as a real process: every variant is trained,
converted and measured, and each row carries its ratios to float32.

This checks that the benchmark works, not its figures (one fine-tuning epoch on a loaded CI
machine proves nothing about accuracy): the figures live in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.compression import VARIANTS
from tests.conftest import ROOT

COLUMNS = ["variant", "accuracy %", "file bytes", "size vs float32", "zlib -9 bytes", "zlib vs float32",
           "weight sparsity %", "median ms", "latency vs float32"]


def test_quick_digits_run_has_every_variant_with_ratios_to_float32() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-m", "bench.compression", "--quick", "--models", "digits", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    start = proc.stdout.find("\n{\n")
    assert start >= 0, f"no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    doc, table = json.loads(proc.stdout[start:]), proc.stdout[:start]
    for column in COLUMNS:
        assert column in doc["columns"], doc["columns"]
    col = {name: i for i, name in enumerate(doc["columns"])}
    rows = {row[col["variant"]]: row for row in doc["rows"]}
    assert list(rows) == list(VARIANTS)
    float32 = rows["float32"]
    assert float32[col["size vs float32"]] == "1.000x"
    for name, row in rows.items():
        assert 0 <= row[col["accuracy %"]] <= 100
        assert row[col["file bytes"]] > 0 and 0 < row[col["zlib -9 bytes"]] <= row[col["file bytes"]]
        for ratio in ("size vs float32", "zlib vs float32", "latency vs float32"):
            assert row[col[ratio]].endswith("x"), (name, ratio, row)
        assert name.split()[0] in table
    # the zeros of pruning survive conversion: read back from the .tflite
    assert rows["pruned 80% + int8"][col["weight sparsity %"]] > 70
    assert rows["distilled student + int8"][col["file bytes"]] < rows["int8"][col["file bytes"]]
    assert doc["results"]["digits"]["rows"]["pruned 50% + int8"]["train_s"] > 0
    assert doc["verdicts"]
    for verdict in doc["verdicts"]:
        assert f"{'PASS' if verdict['passed'] else 'FAIL'}  {verdict['name']}" in table
    assert proc.returncode == (0 if all(v["passed"] for v in doc["verdicts"]) else 1), proc.stderr[-3000:]
