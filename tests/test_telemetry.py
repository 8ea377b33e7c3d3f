"""Telemetry documents from real psutil readings and real metrics, stored through the real spool."""

from __future__ import annotations

import json
import os
import shutil
import time

import psutil
import pytest

from agent import __version__
from agent.metrics import InferenceMetrics
from agent.spool import Spool
from agent.telemetry import TELEMETRY_SCHEMA, collect, cpu_temperature

MODEL = {"name": "digits", "version": 3, "sha256": "ab" * 32, "extra": "not reported"}
ENGINE = {"runtime": "ai-edge-litert", "runtime_version": "2.3.0", "delegate": "xnnpack", "threads": 2}


def test_document_carries_model_engine_inference_and_system(tmp_path):
    m = InferenceMetrics()
    for ms in (2.0, 4.0, 6.0, 8.0):
        m.record(ms, True)
    m.record(0.1, False)
    started = time.time() - 42
    doc = collect(m, MODEL, ENGINE, state_dir=tmp_path, started_at=started)

    assert doc["schema"] == TELEMETRY_SCHEMA and doc["type"] == "telemetry"
    assert "seq" not in doc                                   # the spool assigns it
    assert doc["agent"]["version"] == __version__
    assert 41 <= doc["agent"]["uptime_s"] <= 100
    assert doc["model"] == {"name": "digits", "version": 3, "sha256": "ab" * 32}
    assert doc["engine"] == {"runtime": "ai-edge-litert", "runtime_version": "2.3.0", "delegate": "xnnpack"}
    inf = doc["inference"]
    assert inf["count"] == 5 and inf["errors"] == 1
    assert inf["latency_ms"]["p50"] == pytest.approx(5.0)
    assert inf["latency_ms"]["p99"] == pytest.approx(7.94)
    assert inf["inferences_per_s"] > 0

    sysm = doc["system"]
    vm = psutil.virtual_memory()
    assert sysm["memory_total_bytes"] == vm.total
    assert 0 < sysm["memory_available_bytes"] <= vm.total
    assert 0 < sysm["memory_used_bytes"] <= vm.total
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < sysm["agent_rss_bytes"] < 2 * rss
    disk = shutil.disk_usage(tmp_path)
    assert sysm["disk_total_bytes"] == disk.total
    assert abs(sysm["disk_free_bytes"] - disk.free) < 512 * 1024 * 1024
    assert sysm["load_avg"] == pytest.approx(list(os.getloadavg()), abs=1.0)
    assert 0.0 <= sysm["cpu_percent"] <= 100.0
    temps = psutil.sensors_temperatures()
    if temps:
        assert isinstance(sysm["temperature_c"], float)
    else:                      # this machine (a VM) has no sensors: reported as None, not 0
        assert sysm["temperature_c"] is None and sysm["temperatures_c"] == {}

    # the interval was reset
    assert collect(m, MODEL, ENGINE, state_dir=tmp_path, started_at=started)["inference"]["count"] == 0


def test_no_model_yet(tmp_path):
    doc = collect(InferenceMetrics(), {}, None, state_dir=tmp_path, started_at=time.time())
    assert doc["model"] is None and doc["engine"] is None
    assert doc["inference"]["latency_ms"]["p95"] is None


def test_missing_state_dir_gives_none_not_an_exception(tmp_path):
    doc = collect(InferenceMetrics(), MODEL, ENGINE, state_dir=tmp_path / "gone", started_at=time.time())
    assert doc["system"]["disk_free_bytes"] is None
    assert doc["system"]["memory_total_bytes"] is not None


def test_agent_cpu_percent_sees_work(tmp_path):
    m = InferenceMetrics()
    collect(m, MODEL, ENGINE, state_dir=tmp_path, started_at=time.time())
    start = time.process_time()
    while time.process_time() - start < 0.3:    # burn 0.3 s of CPU in this process
        sum(range(1000))
    doc = collect(m, MODEL, ENGINE, state_dir=tmp_path, started_at=time.time())
    assert doc["system"]["agent_cpu_percent"] > 5


def test_collect_is_cheap(tmp_path):
    m = InferenceMetrics()
    collect(m, MODEL, ENGINE, state_dir=tmp_path, started_at=time.time())   # warm-up
    start = time.perf_counter()
    for _ in range(20):
        collect(m, MODEL, ENGINE, state_dir=tmp_path, started_at=time.time())
    per_call_ms = (time.perf_counter() - start) / 20 * 1000
    assert per_call_ms < 50, f"collect() took {per_call_ms:.1f} ms"


def test_document_round_trips_through_the_spool(tmp_path):
    m = InferenceMetrics()
    m.record(3.0, True)
    doc = collect(m, MODEL, ENGINE, state_dir=tmp_path, started_at=time.time())
    with Spool(tmp_path / "spool.db") as spool:
        seq = spool.append("telemetry", doc)
        (_, kind, stored), = spool.peek(10)
    assert kind == "telemetry"
    assert stored == json.loads(json.dumps({**doc, "seq": seq}))


def test_cpu_temperature_prefers_the_soc_sensor():
    assert cpu_temperature({"nvme": 70.0, "cpu_thermal": 48.5}) == 48.5
    assert cpu_temperature({"GPU-therm": 40.0, "CPU-therm": 45.0}) == 45.0
    assert cpu_temperature({"nvme": 70.0, "wifi": 50.0}) == 70.0
    assert cpu_temperature({}) is None
