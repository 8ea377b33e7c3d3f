"""Alert rules over the fleet's state: offline too long, too hot, slower after a deployment.

Why pure rules plus a thin engine: each rule is a function of plain dicts (a device row, its
telemetry rows, the time, whether the alert is already open) returning an open/close
:class:`Decision` or nothing, so every threshold is tested with made-up numbers; the
:class:`AlertEngine` only reads the store, calls the rules and writes decisions back with
``store.record_alert`` (keyed by device and kind: opening an open alert is not new).

Rules (thresholds in :class:`AlertConfig`):
- ``offline``: the device is offline and was last seen more than ``offline_after_s`` (300 s) ago.
- ``temperature``: the latest temperature is over the profile's ``hardware.max_temperature_c``
  (85 °C when the profile is unknown); it closes once back ``temperature_hysteresis_c`` below,
  so a device hovering at the limit does not flap.
- ``latency_regression``: the median of the per-interval p95 latencies after the device's latest
  ``installed`` event is more than ``latency_ratio`` (1.5) times the median before it, with at
  least ``latency_min_samples`` telemetry intervals on each side within ``latency_window_s``.
  Medians of interval p95s, because one slow interval (a GC pause, a cold cache right after the
  install) must not raise an alert.
- ``drift``: the device's latest drift score (PSI, docs/quality.md) for the model it runs is over
  ``drift_threshold`` (0.2, ``litefleet server --drift-threshold``); it closes once the score is
  ``drift_hysteresis`` (0.05) below the threshold, or the device runs another model.
- ``anomaly_latency``, ``anomaly_error_rate``, ``anomaly_temperature``, ``anomaly_memory``: the
  metric has been far above the device's own recent normal (rolling median and MAD,
  fleet/anomaly.py) for ``persist`` consecutive telemetry intervals; closes at the first normal
  interval. The message says the value, the normal (median), the robust z and since when.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.anomaly import AnomalyConfig, detect_all

log = logging.getLogger("litefleet.alerts")

OFFLINE = "offline"
TEMPERATURE = "temperature"
LATENCY_REGRESSION = "latency_regression"
DRIFT = "drift"
ANOMALY_KINDS = {"p95_ms": "anomaly_latency", "error_rate": "anomaly_error_rate",
                 "temperature_c": "anomaly_temperature", "memory_percent": "anomaly_memory"}
KINDS = (OFFLINE, TEMPERATURE, LATENCY_REGRESSION, DRIFT, *ANOMALY_KINDS.values())


@dataclass(frozen=True)
class AlertConfig:
    offline_after_s: float = 300.0
    temperature_hysteresis_c: float = 1.0
    default_max_temperature_c: float = 85.0
    latency_ratio: float = 1.5
    latency_min_samples: int = 5
    latency_window_s: float = 3600.0
    drift_threshold: float = 0.2
    drift_hysteresis: float = 0.05
    anomaly: AnomalyConfig = AnomalyConfig()
    anomaly_history_s: float = 1800.0     # raw telemetry read per evaluation for the anomaly detector


@dataclass(frozen=True)
class Decision:
    """Open (``active=True``) or close an alert keyed by (device_id, kind)."""

    device_id: str
    kind: str
    active: bool
    ts: float
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_alert(self) -> dict[str, Any]:
        """The dict ``store.record_alert`` takes."""
        return {"device_id": self.device_id, "kind": self.kind, "open": self.active, "active": self.active, "ts": self.ts,
                "message": self.message, "details": dict(self.details)}


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        minutes, rest = divmod(int(round(seconds)), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    return f"{seconds / 3600:.1f} h"


# Rules ------------------------------------------------------------------------------------

def offline_rule(device: Mapping[str, Any], now: float, is_open: bool, cfg: AlertConfig) -> Decision | None:
    device_id = str(device["device_id"])
    seen = device.get("last_seen") or device.get("status_ts")
    if device.get("online"):
        if is_open:
            return Decision(device_id, OFFLINE, False, now, f"{device_id} is back online")
        return None
    silent = now - float(seen) if seen is not None else float("inf")
    if silent > cfg.offline_after_s and not is_open:
        last = f"last seen {_ago(silent)} ago" if seen is not None else "never seen online"
        return Decision(device_id, OFFLINE, True, now,
                        f"{device_id} is offline: {last} (threshold {_ago(cfg.offline_after_s)})",
                        {"last_seen": seen, "offline_for_s": None if seen is None else round(silent, 1),
                         "threshold_s": cfg.offline_after_s})
    return None


def temperature_rule(device: Mapping[str, Any], max_c: float, now: float, is_open: bool,
                     cfg: AlertConfig) -> Decision | None:
    device_id = str(device["device_id"])
    temp = device.get("temperature_c")
    if temp is None:
        return None
    temp = float(temp)
    if temp > max_c and not is_open:
        return Decision(device_id, TEMPERATURE, True, now,
                        f"{device_id} is at {temp:.1f} °C, over its profile's limit of {max_c:g} °C "
                        f"(profile {device.get('profile') or 'unknown'})",
                        {"temperature_c": temp, "max_temperature_c": max_c, "profile": device.get("profile")})
    if is_open and temp <= max_c - cfg.temperature_hysteresis_c:
        return Decision(device_id, TEMPERATURE, False, now,
                        f"{device_id} cooled to {temp:.1f} °C (limit {max_c:g} °C)",
                        {"temperature_c": temp, "max_temperature_c": max_c})
    return None


def _p95s(rows: Iterable[Mapping[str, Any]]) -> list[float]:
    out = []
    for row in rows:
        value = row.get("p95_ms")
        if value is not None and (row.get("count") is None or row.get("count")):
            out.append(float(value))
    return out


def latency_rule(device_id: str, installed: Mapping[str, Any] | None, telemetry: Iterable[Mapping[str, Any]],
                 now: float, is_open: bool, cfg: AlertConfig) -> Decision | None:
    """Compare p95 before and after the latest ``installed`` event (``installed`` has its ``ts``).

    ``telemetry``: the device's rows from ``latency_window_s`` before the install until now.
    Not enough samples on either side: no decision (an open alert stays open until the data
    says otherwise, a new one is not opened on thin evidence).
    """
    if installed is None:
        return None
    t0 = float(installed["ts"])
    rows = list(telemetry)
    before = _p95s(r for r in rows if t0 - cfg.latency_window_s <= float(r["ts"]) < t0)
    after = _p95s(r for r in rows if t0 < float(r["ts"]) <= now)
    if len(before) < cfg.latency_min_samples or len(after) < cfg.latency_min_samples:
        return None
    p_before, p_after = statistics.median(before), statistics.median(after)
    ratio = p_after / p_before if p_before > 0 else float("inf")
    version = (installed.get("details") or {}).get("version")
    what = f"v{version}" if version is not None else "the latest install"
    details = {"p95_before_ms": round(p_before, 3), "p95_after_ms": round(p_after, 3),
               "ratio": round(ratio, 3) if ratio != float("inf") else None, "threshold": cfg.latency_ratio,
               "installed_at": t0, "samples_before": len(before), "samples_after": len(after),
               "command_id": installed.get("command_id") or None, "version": version}
    if ratio > cfg.latency_ratio and not is_open:
        return Decision(device_id, LATENCY_REGRESSION, True, now,
                        f"{device_id}: p95 latency {p_after:.1f} ms after {what} vs {p_before:.1f} ms before "
                        f"({ratio:.2f}x, threshold {cfg.latency_ratio:g}x)", details)
    if ratio <= cfg.latency_ratio and is_open:
        return Decision(device_id, LATENCY_REGRESSION, False, now,
                        f"{device_id}: p95 latency back to {p_after:.1f} ms ({ratio:.2f}x of before {what})",
                        details)
    return None


def drift_rule(device: Mapping[str, Any], now: float, is_open: bool, cfg: AlertConfig) -> Decision | None:
    """``device["drift"]``: the latest drift report for the model the device runs (fleet.store), or None."""
    device_id = str(device["device_id"])
    drift = device.get("drift") or {}
    score = drift.get("score")
    model = device.get("model_version") or "its model"
    if score is None:
        if is_open:
            return Decision(device_id, DRIFT, False, now, f"{device_id}: no drift report for {model} any more")
        return None
    score = float(score)
    details = {"score": score, "inputs": drift.get("inputs"), "outputs": drift.get("outputs"),
               "window": drift.get("window"), "threshold": cfg.drift_threshold, "model": device.get("model_version")}
    if score > cfg.drift_threshold:
        parts = [f"{k} {float(drift[k]):.2f}" for k in ("inputs", "outputs") if drift.get(k) is not None]
        window = f" over its last {drift['window']} inferences" if drift.get("window") else ""
        return Decision(device_id, DRIFT, True, now,
                        f"{device_id}: data drift {score:.2f} (PSI) on {model}{window}, over the threshold "
                        f"{cfg.drift_threshold:g}" + (f" ({', '.join(parts)})" if parts else ""), details)
    if is_open and score <= cfg.drift_threshold - cfg.drift_hysteresis:
        return Decision(device_id, DRIFT, False, now, f"{device_id}: drift back to {score:.2f} on {model}", details)
    return None


def anomaly_rules(device_id: str, rows: Iterable[Mapping[str, Any]], now: float, active: set[tuple[str, str]],
                  cfg: AlertConfig) -> list[Decision]:
    """Open (or refresh) an anomaly alert per metric the device is anomalous in now; close the others."""
    decisions = []
    found = detect_all(rows, cfg.anomaly)
    for metric, kind in ANOMALY_KINDS.items():
        is_open = (device_id, kind) in active
        anomaly = found.get(metric)
        if anomaly is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(anomaly.since))
            decisions.append(Decision(device_id, kind, True, now, f"{anomaly.describe(device_id)}, since {since}",
                                      dict(anomaly.details)))
        elif is_open:
            decisions.append(Decision(device_id, kind, False, now, f"{device_id}: {metric} back to normal"))
    return decisions


def evaluate(devices: Iterable[Mapping[str, Any]], *, now: float, active: set[tuple[str, str]],
             max_temperatures: Mapping[str, float], installs: Mapping[str, Mapping[str, Any]],
             telemetry: Mapping[str, list[Mapping[str, Any]]], cfg: AlertConfig = AlertConfig(),
             history: Mapping[str, list[Mapping[str, Any]]] | None = None) -> list[Decision]:
    """Every rule over every device: the open/close decisions that change something.

    ``history``: each device's recent telemetry rows for the anomaly detector (None: not judged).
    """
    decisions: list[Decision] = []
    for device in devices:
        device_id = str(device["device_id"])
        limit = max_temperatures.get(str(device.get("profile") or ""), cfg.default_max_temperature_c)
        for decision in (
            offline_rule(device, now, (device_id, OFFLINE) in active, cfg),
            temperature_rule(device, limit, now, (device_id, TEMPERATURE) in active, cfg),
            latency_rule(device_id, installs.get(device_id), telemetry.get(device_id, []), now,
                         (device_id, LATENCY_REGRESSION) in active, cfg),
            drift_rule(device, now, (device_id, DRIFT) in active, cfg),
        ):
            if decision is not None:
                decisions.append(decision)
        if history is not None:
            decisions += anomaly_rules(device_id, history.get(device_id, []), now, active, cfg)
    return decisions


# The engine -------------------------------------------------------------------------------

def profile_temperature_limits(directory: str | None = None) -> dict[str, float]:
    """profile name -> hardware.max_temperature_c, from the profiles directory (agent.protocol.profiles)."""
    from agent.protocol import profiles
    limits: dict[str, float] = {}
    for name in profiles.available(directory):
        try:
            limits[name] = float(profiles.load_profile(name, directory).hardware["max_temperature_c"])
        except Exception as exc:  # noqa: BLE001 - one broken profile must not disable every alert
            log.warning("alerts: profile %s unusable for temperature limits: %s", name, exc)
    return limits


class AlertEngine:
    """Evaluates the rules against ``store`` every ``interval_s`` and records the decisions.

    ``on_open(alert)`` is called for each newly opened alert (the server may publish it); each
    is also logged as a WARNING line ``alert opened: ...``.
    """

    def __init__(self, store: Any, cfg: AlertConfig = AlertConfig(), *,
                 max_temperatures: Mapping[str, float] | None = None, profiles_dir: str | None = None,
                 on_open: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.cfg = cfg
        self.max_temperatures = dict(max_temperatures if max_temperatures is not None
                                     else profile_temperature_limits(profiles_dir))
        self.on_open = on_open
        self.clock = clock
        self.runs = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _installs(self, now: float, active: set[tuple[str, str]]) -> dict[str, dict[str, Any]]:
        """The latest ``installed`` event of devices installed within the window or with an open regression."""
        latest: dict[str, dict[str, Any]] = {}
        for event in self.store.events(kinds=["installed"], since=now - self.cfg.latency_window_s, limit=100_000):
            device_id = event["device_id"]
            if device_id not in latest or float(event["ts"]) > float(latest[device_id]["ts"]):
                latest[device_id] = event
        for device_id, kind in active:
            if kind == LATENCY_REGRESSION and device_id not in latest:
                found = self.store.events(device_id=device_id, kinds=["installed"], limit=1)
                if found:
                    latest[device_id] = found[0]
        return latest

    def run_once(self, now: float | None = None) -> list[dict[str, Any]]:
        """One evaluation; returns the alerts opened by it (as recorded)."""
        now = self.clock() if now is None else now
        devices = self.store.devices()
        active = {(str(a["device_id"]), str(a["kind"])) for a in self.store.alerts(active_only=True)}
        installs = self._installs(now, active)
        telemetry = {device_id: self.store.telemetry(device_id, since=float(ev["ts"]) - self.cfg.latency_window_s,
                                                     until=now)
                     for device_id, ev in installs.items()}
        history: dict[str, list[dict[str, Any]]] = {}
        for row in self.store.telemetry(None, since=now - self.cfg.anomaly_history_s, until=now, resolution="raw"):
            history.setdefault(str(row["device_id"]), []).append(row)
        opened: list[dict[str, Any]] = []
        for decision in evaluate(devices, now=now, active=active, max_temperatures=self.max_temperatures,
                                 installs=installs, telemetry=telemetry, cfg=self.cfg, history=history):
            alert = decision.to_alert()
            new = self.store.record_alert(alert)
            if decision.active and new:
                log.warning("alert opened: %s: %s", decision.kind, decision.message)
                opened.append(alert)
                if self.on_open is not None:
                    try:
                        self.on_open(alert)
                    except Exception:  # noqa: BLE001 - a failing notifier must not stop the rules
                        log.exception("alerts: on_open callback failed")
            elif not decision.active:
                log.info("alert closed: %s: %s", decision.kind, decision.message)
        self.runs += 1
        return opened

    def start(self, interval_s: float = 30.0) -> None:
        """Evaluate every ``interval_s`` in a daemon thread; errors are logged and retried next time."""
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.run_once()
                    self.last_error = None
                except Exception as exc:  # noqa: BLE001 - e.g. the database is down: try again later
                    self.last_error = str(exc)
                    log.warning("alerts: evaluation failed (retrying in %g s): %s", interval_s, exc)
                self._stop.wait(interval_s)
        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="litefleet-alerts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


__all__ = ["ANOMALY_KINDS", "AlertConfig", "AlertEngine", "DRIFT", "Decision", "KINDS", "LATENCY_REGRESSION", "OFFLINE",
           "TEMPERATURE", "anomaly_rules", "drift_rule", "evaluate", "latency_rule", "offline_rule",
           "profile_temperature_limits", "temperature_rule"]
