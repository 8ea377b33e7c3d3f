"""Every MQTT benchmark runs in --quick mode as a real process and prints our figure beside the raw one.

Each starts its own mosquitto on a free port (never the system broker on 1883) and real child
processes (repository, raw publisher, devices). These check that the benchmarks work and report
ratios, not the figures (a loaded CI machine would make a throughput threshold flaky): the
figures live in docs/benchmarks-mqtt.md. The loss benchmark's verdicts are about correctness,
not speed, so they are asserted.
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
    "mqtt_pull": ["ours MB/s", "raw MB/s", "ratio vs raw", "head ms", "chunks MB/s", "tail ms"],
    "mqtt_fanout": ["devices", "wall s", "published MB", "published vs model", "wall vs alone", "failed"],
    "mqtt_noloss": ["broker config", "protocol", "receiver", "sent", "acked by broker", "received", "lost",
                    "received vs sent"],
}


def run_quick(name: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    start = proc.stdout.find("\n{\n")
    assert proc.returncode == 0 and start >= 0, \
        f"bench.{name} failed or printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc, json.loads(proc.stdout[start:])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_mqtt_benchmark_quick_prints_ratios(name: str) -> None:
    proc, doc = run_quick(name)
    table = proc.stdout[:proc.stdout.find("\n{\n")]
    for column in EXPECTED[name]:
        assert column in doc["columns"], f"bench.{name}: column {column!r} missing from {doc['columns']}"
        assert column.split()[0] in table   # the printed table carries it too (rich may wrap headers)
    assert doc["rows"], f"bench.{name} measured nothing"
    ratio_columns = [i for i, c in enumerate(doc["columns"]) if " vs " in c]
    assert ratio_columns, f"bench.{name}: no ratio column in {doc['columns']}"
    filled = [row[i] for row in doc["rows"] for i in ratio_columns if row[i] not in (None, "-")]
    assert filled and all(str(cell).endswith("x") for cell in filled), f"bench.{name}: ratio cells {filled}"
    assert doc["machine"]["cores"] and doc["machine"]["date"]
    assert doc["verdicts"], f"bench.{name} states no verdict"
    if name == "mqtt_fanout":   # every simulated device really fetched the model
        assert next(v for v in doc["verdicts"] if v["name"] == "every device got the model")["passed"], doc["verdicts"]
    if name == "mqtt_noloss":   # correctness, not speed: our configuration and links lose nothing
        ours = [c for c in doc["cells"] if c["config"] == "litefleet generated"
                and c["receiver"] in ("MqttLink", "BlobLink")]
        assert {(c["protocol"], c["receiver"]) for c in ours} == {(p, r) for p in ("3.1.1", "5")
                                                                  for r in ("MqttLink", "BlobLink")}
        assert all(c["lost"] == 0 and c["received"] == c["sent"] for c in ours), ours
