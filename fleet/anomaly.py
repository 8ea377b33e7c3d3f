"""Anomalies in one device's telemetry against its own recent history: rolling median and MAD.

Why robust statistics and not a fixed threshold: a Pi at 70 °C and a Jetson at 45 °C are each
normal for themselves, and one slow interval (a GC pause) must not move the yardstick. For
each metric the detector keeps the device's previous ``window`` points, takes their median and
their median absolute deviation (MAD), and scores the new point

    robust z = 0.6745 * (x - median) / max(MAD, floor)

(0.6745 makes z comparable to a standard score for normal data). A point is anomalous when z
is over ``threshold`` (3.5, the usual cut for the modified z-score); only increases count,
because lower latency, fewer errors, a cooler or emptier device are not problems. The floor on
MAD (``max(abs_floor, rel_floor * |median|)`` per metric) keeps a nearly flat series from
turning tiny noise into huge z values. An anomaly is reported once ``persist`` consecutive
points are anomalous, and since the first of them; it ends at the first normal point.

Pure: no I/O, no clock. fleet/alerts.py feeds it the store's telemetry and turns what it finds
into alerts. docs/quality.md documents the method and its settings.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Z_SCALE = 0.6745


@dataclass(frozen=True)
class MetricSpec:
    """One watched metric: how to read it from a telemetry row, its unit, and its MAD floor."""

    name: str
    label: str
    unit: str
    abs_floor: float
    rel_floor: float = 0.0

    def floor(self, median: float) -> float:
        return max(self.abs_floor, self.rel_floor * abs(median))


# Floors: latency varies by a few per cent between quiet intervals; an error rate by a point; a
# temperature sensor by half a degree; memory use by half a point.
METRICS: dict[str, MetricSpec] = {
    "p95_ms": MetricSpec("p95_ms", "p95 latency", "ms", abs_floor=0.05, rel_floor=0.05),
    "error_rate": MetricSpec("error_rate", "error rate", "%", abs_floor=0.01),
    "temperature_c": MetricSpec("temperature_c", "temperature", "°C", abs_floor=0.5),
    "memory_percent": MetricSpec("memory_percent", "memory use", "%", abs_floor=0.5),
}


@dataclass(frozen=True)
class AnomalyConfig:
    window: int = 30            # previous points that form "normal" (15 min at the agent's 30 s telemetry)
    min_history: int = 10       # fewer previous points than this: no judgement yet
    threshold: float = 3.5      # robust z over this is anomalous
    persist: int = 3            # consecutive anomalous points before it is reported
    metrics: tuple[str, ...] = tuple(METRICS)


@dataclass(frozen=True)
class Point:
    """One judged point: its value, the median and MAD of the window before it, and its z."""

    ts: float
    value: float
    median: float
    mad: float
    z: float
    anomalous: bool


@dataclass(frozen=True)
class Anomaly:
    """A metric that has been anomalous for ``points`` consecutive points, since ``since``."""

    metric: str
    since: float
    points: int
    latest: Point
    peak_z: float
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self, device_id: str) -> str:
        spec = METRICS[self.metric]
        p = self.latest
        return (f"{device_id}: {spec.label} {_fmt(p.value, spec)} is far above its normal "
                f"{_fmt(p.median, spec)} (robust z {p.z:.1f}, MAD {_fmt(p.mad, spec)}) for {self.points} "
                f"interval(s)")


def _fmt(value: float, spec: MetricSpec) -> str:
    if spec.name == "error_rate":
        return f"{value * 100:.1f} %"
    digits = 2 if spec.name == "p95_ms" else 1
    return f"{value:.{digits}f} {spec.unit}"


def values_of(rows: Iterable[Mapping[str, Any]], metric: str) -> list[tuple[float, float]]:
    """(ts, value) of one metric from telemetry rows (the store's), oldest first, gaps left out.

    ``error_rate`` is errors / requests of each interval with traffic; ``p95_ms`` counts only
    intervals with traffic (an idle interval has no latency).
    """
    out = []
    for row in rows:
        count = row.get("count")
        if metric == "error_rate":
            if not count:
                continue
            value = float(row.get("errors") or 0) / float(count)
        else:
            raw = row.get(metric)
            if raw is None or (metric == "p95_ms" and count == 0):
                continue
            value = float(raw)
        out.append((float(row["ts"]), value))
    out.sort(key=lambda p: p[0])
    return out


def judge(series: Sequence[tuple[float, float]], i: int, spec: MetricSpec, cfg: AnomalyConfig) -> Point:
    """Point ``i`` against the ``window`` points before it (it needs ``min_history`` of them)."""
    history = [v for _, v in series[max(0, i - cfg.window):i]]
    median = statistics.median(history)
    mad = max(statistics.median(abs(v - median) for v in history), spec.floor(median))
    ts, value = series[i]
    z = Z_SCALE * (value - median) / mad
    return Point(ts, value, median, mad, z, z > cfg.threshold)


def score(series: Sequence[tuple[float, float]], metric: str, cfg: AnomalyConfig = AnomalyConfig()) -> list[Point]:
    """Judge every point that has at least ``min_history`` points before it."""
    spec = METRICS[metric]
    return [judge(series, i, spec, cfg) for i in range(cfg.min_history, len(series))]


def detect(series: Sequence[tuple[float, float]], metric: str,
           cfg: AnomalyConfig = AnomalyConfig()) -> Anomaly | None:
    """The anomaly the series is in now (its last ``persist``+ points anomalous), or None.

    Judges from the newest point backwards and stops at the first normal one, so a device
    that is fine costs one median per metric.
    """
    spec = METRICS[metric]
    run: list[Point] = []
    for i in range(len(series) - 1, cfg.min_history - 1, -1):
        point = judge(series, i, spec, cfg)
        if not point.anomalous:
            break
        run.append(point)
    if len(run) < cfg.persist:
        return None
    run.reverse()
    latest = run[-1]
    return Anomaly(metric, run[0].ts, len(run), latest, max(p.z for p in run),
                   {"metric": metric, "value": latest.value, "median": latest.median, "mad": latest.mad,
                    "z": round(latest.z, 2), "since": run[0].ts, "points": len(run),
                    "threshold": cfg.threshold, "window": cfg.window})


def detect_all(rows: Iterable[Mapping[str, Any]], cfg: AnomalyConfig = AnomalyConfig()) -> dict[str, Anomaly | None]:
    """metric -> the current anomaly or None, for every metric of ``cfg`` with enough history."""
    rows = list(rows)
    out: dict[str, Anomaly | None] = {}
    for metric in cfg.metrics:
        series = values_of(rows, metric)
        if len(series) > cfg.min_history:
            out[metric] = detect(series, metric, cfg)
    return out


__all__ = ["METRICS", "Z_SCALE", "Anomaly", "AnomalyConfig", "MetricSpec", "Point", "detect", "detect_all",
           "judge", "score", "values_of"]
