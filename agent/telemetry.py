"""One telemetry document per interval: the device's health, the model's traffic and speed.

Cheap by design (it runs every ``telemetry_interval_s`` on a Pi): CPU usage is the delta since
the previous call (``cpu_percent(interval=None)`` never sleeps), and every reading is optional:
a sensor or /proc file that is missing or hidden by the sandbox gives ``None`` instead of an
exception, because one absent number must not cost the fleet all the others.
The sequence number is not set here: the spool assigns it when the document is stored.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import psutil

from agent import __version__
from agent.metrics import InferenceMetrics

log = logging.getLogger(__name__)

TELEMETRY_SCHEMA = 1

# psutil sensor names that mean "the SoC / CPU", best first: Raspberry Pi, Rockchip and other
# Arm boards, Jetson, Intel, AMD, ACPI.
CPU_SENSORS = ("cpu_thermal", "cpu-thermal", "soc_thermal", "CPU-therm", "cpu", "coretemp", "k10temp",
               "acpitz")

T = TypeVar("T")
_process: psutil.Process | None = None


def _read(what: str, fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except (OSError, psutil.Error, AttributeError, ValueError) as exc:
        log.debug("telemetry: cannot read %s: %s", what, exc)
        return None


def _me() -> psutil.Process:
    """The agent's own process, kept so that its cpu_percent() measures since the last call."""
    global _process
    if _process is None or _process.pid != os.getpid():
        _process = psutil.Process()
    return _process


def temperatures() -> dict[str, float]:
    """The hottest reading of each sensor, in °C; empty where the kernel exposes none (VMs)."""
    sensors = getattr(psutil, "sensors_temperatures", None)   # absent on some platforms
    if sensors is None:
        return {}
    found = _read("temperature sensors", sensors) or {}
    return {name: round(max(e.current for e in entries), 1)
            for name, entries in found.items() if entries}


def cpu_temperature(temps: Mapping[str, float]) -> float | None:
    """The CPU/SoC temperature: a known CPU sensor if there is one, else the hottest sensor."""
    for name in CPU_SENSORS:
        if name in temps:
            return temps[name]
    return max(temps.values()) if temps else None


def system_metrics(state_dir: Path) -> dict[str, Any]:
    vm = _read("memory", psutil.virtual_memory)
    disk = _read(f"disk usage of {state_dir}", lambda: shutil.disk_usage(state_dir))
    load = _read("load average", os.getloadavg)
    me = _me()
    temps = temperatures()
    return {
        "cpu_percent": _read("cpu usage", lambda: psutil.cpu_percent(interval=None)),
        "load_avg": [round(x, 2) for x in load] if load else None,
        "memory_total_bytes": vm.total if vm else None,
        "memory_used_bytes": vm.used if vm else None,
        "memory_available_bytes": vm.available if vm else None,
        "agent_rss_bytes": _read("agent RSS", lambda: me.memory_info().rss),
        "agent_cpu_percent": _read("agent cpu usage", lambda: me.cpu_percent(interval=None)),
        "temperature_c": cpu_temperature(temps),
        "temperatures_c": temps,
        "disk_free_bytes": disk.free if disk else None,
        "disk_total_bytes": disk.total if disk else None,
    }


def collect(metrics: InferenceMetrics, model_info: Mapping[str, Any] | None, engine: Mapping[str, Any] | None,
            *, state_dir: str | Path, started_at: float, now: float | None = None,
            drift: Mapping[str, Any] | None = None, feedback: Mapping[str, Any] | None = None,
            api: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The telemetry document for the interval that ends now; resets the interval's metrics.

    ``model_info``: the active model's ``name``, ``version``, ``sha256`` (empty or None: no
    model). ``engine``: ``EngineReport.to_dict()`` (its ``runtime``, ``runtime_version``,
    ``delegate`` are reported). ``started_at``: ``time.time()`` when the agent started.
    ``drift`` (``DriftMonitor.report()``) and ``feedback`` (``FeedbackBook.report()``) are
    included when there is something to report; ``api`` (refused requests of the interval:
    ``unauthorized``, ``forbidden``) always when given.
    """
    now = time.time() if now is None else now
    inference = metrics.snapshot_and_reset()
    model = None
    if model_info:
        model = {"name": model_info.get("name"), "version": model_info.get("version"),
                 "sha256": model_info.get("sha256")}
    engine_doc = None
    if engine:
        engine_doc = {"runtime": engine.get("runtime"), "runtime_version": engine.get("runtime_version"),
                      "delegate": engine.get("delegate")}
    doc: dict[str, Any] = {
        "schema": TELEMETRY_SCHEMA,
        "type": "telemetry",
        "time": round(now, 3),
        "agent": {"version": __version__, "uptime_s": round(max(now - started_at, 0.0), 1)},
        "model": model,
        "engine": engine_doc,
        "inference": inference,
        "system": system_metrics(Path(state_dir)),
    }
    if drift:
        doc["drift"] = dict(drift)
    if feedback:
        doc["feedback"] = dict(feedback)
    if api is not None:
        doc["api"] = {"unauthorized": int(api.get("unauthorized", 0)), "forbidden": int(api.get("forbidden", 0))}
    return doc
