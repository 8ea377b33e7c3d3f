"""Prometheus exposition of the fleet: a custom collector that reads the store at scrape time.

Why a collector and not gauges updated by ingest: the store is the truth (several server
processes may ingest into one PostgreSQL), so each scrape asks it; nothing drifts, nothing is
kept in memory per device.

Bounded labels. Per-device series (``litefleet_device_*``) are exported for at most
``max_devices`` devices (default 1000), chosen deterministically by device id so a series does
not hop between scrapes; ``litefleet_device_series_omitted`` says how many were left out, and
the fleet-wide counts still cover every device. ``litefleet_messages_lost_total{device}`` lists
only devices that lost messages, the ``max_loss_devices`` (default 100) with the most losses,
the rest summed under ``device="_other"``. Model/profile/kind labels are bounded by what the
operator deploys; ``model_version`` is the store's label (``"digits v3"``, ``none`` without a model).

Model quality (docs/quality.md): ``litefleet_device_drift_score{device,model,version}`` is the
latest drift score of the model each device runs now, for the same ``max_devices`` devices as
the other per-device series (one series per device: the version label changes with the model,
it does not multiply). ``litefleet_model_drifting_devices{model,version}`` counts the devices
over the threshold and ``litefleet_model_field_accuracy{model,version}`` (with
``litefleet_model_feedback_labels``) sums the devices' feedback per model version: their labels
grow with what the operator deploys, not with the fleet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

log = logging.getLogger("litefleet.metrics")

DEFAULT_MAX_DEVICES = 1000
DEFAULT_MAX_LOSS_DEVICES = 100
ALERT_KINDS = ("offline", "temperature", "latency_regression", "drift", "anomaly_latency", "anomaly_error_rate",
               "anomaly_temperature", "anomaly_memory")
DEFAULT_DRIFT_THRESHOLD = 0.2


def _num(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _first(stats: Mapping[str, Any], *names: str) -> float | None:
    for name in names:
        if name in stats and _num(stats[name]) is not None:
            return _num(stats[name])
    return None


class FleetCollector(Collector):
    """Yields the litefleet_* families from ``store`` (and ``ingest_stats()``) on every scrape."""

    def __init__(self, store: Any, ingest_stats: Callable[[], Mapping[str, Any]] | None = None, *,
                 max_devices: int = DEFAULT_MAX_DEVICES, max_loss_devices: int = DEFAULT_MAX_LOSS_DEVICES,
                 drift_threshold: float = DEFAULT_DRIFT_THRESHOLD) -> None:
        self.store = store
        self.ingest_stats = ingest_stats
        self.max_devices = max_devices
        self.max_loss_devices = max_loss_devices
        self.drift_threshold = drift_threshold

    def collect(self) -> Iterator[Metric]:
        devices = self.store.devices()
        counts = self.store.counts()
        yield from self._counts(counts, devices)
        yield from self._ingest()
        yield from self._losses()
        yield from self._per_device(devices)
        yield from self._quality(devices)
        yield from self._alerts(counts)

    # fleet-wide ---------------------------------------------------------------------------

    def _counts(self, counts: Mapping[str, Any], devices: list[dict[str, Any]]) -> Iterator[Metric]:
        by_state = dict(counts.get("by_state") or {})
        state = GaugeMetricFamily("litefleet_devices", "Devices known to the server, by state", labels=["state"])
        for name in ("online", "offline"):
            state.add_metric([name], float(by_state.get(name, 0)))
        yield state

        by_model = GaugeMetricFamily("litefleet_devices_by_model", "Devices by active model and version",
                                     labels=["model", "version"])
        for key, n in sorted(self._model_counts(counts, devices).items()):
            by_model.add_metric(list(key), float(n))
        yield by_model

        by_profile = GaugeMetricFamily("litefleet_devices_by_profile", "Devices by device profile",
                                       labels=["profile"])
        for name, n in sorted((counts.get("by_profile") or {}).items()):
            by_profile.add_metric([str(name) or "none"], float(n))
        yield by_profile

    @staticmethod
    def _model_counts(counts: Mapping[str, Any], devices: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
        """(model, version) -> devices. From devices(): the store's counts join name and version in one label."""
        out: dict[tuple[str, str], int] = {}
        for device in devices:
            model = device.get("model") or {}
            version = model.get("version")
            key = (str(model.get("name") or "none"), "none" if version is None else str(version))
            out[key] = out.get(key, 0) + 1
        return out

    def _ingest(self) -> Iterator[Metric]:
        stats: Mapping[str, Any] = {}
        if self.ingest_stats is not None:
            try:
                stats = self.ingest_stats() or {}
            except Exception:  # noqa: BLE001 - a broken stats source must not fail the whole scrape
                log.exception("ingest stats unavailable")
        total = CounterMetricFamily("litefleet_ingest_messages", "Messages ingested since the server started")
        total.add_metric([], _first(stats, "messages", "messages_total", "received") or 0.0)
        yield total
        rate = GaugeMetricFamily("litefleet_ingest_rate", "Messages ingested per second (recent average)")
        rate.add_metric([], _first(stats, "messages_per_s", "rate", "msgs_per_s") or 0.0)
        yield rate
        for name, keys, doc in (("litefleet_ingest_db_errors", ("db_errors",), "Failed database writes"),
                                ("litefleet_ingest_duplicates", ("duplicates",), "Redelivered messages ignored"),
                                ("litefleet_ingest_batches", ("batches",), "Batches written")):
            value = _first(stats, *keys)
            if value is not None:
                c = CounterMetricFamily(name, doc)
                c.add_metric([], value)
                yield c
        lag = _first(stats, "lag_s", "lag")
        if lag is not None:
            g = GaugeMetricFamily("litefleet_ingest_lag_seconds", "Age of the oldest message not yet written")
            g.add_metric([], lag)
            yield g

    def _losses(self) -> Iterator[Metric]:
        losses = {d: int(v.get("lost") or 0) for d, v in self.store.losses().items()}
        lossy = sorted(((n, d) for d, n in losses.items() if n > 0), key=lambda x: (-x[0], x[1]))
        family = CounterMetricFamily("litefleet_messages_lost", "Messages lost (gaps in the device's sequence "
                                     f"numbers); the {self.max_loss_devices} worst devices, the rest as _other",
                                     labels=["device"])
        for n, device in lossy[:self.max_loss_devices]:
            family.add_metric([device], float(n))
        rest = sum(n for n, _ in lossy[self.max_loss_devices:])
        if rest:
            family.add_metric(["_other"], float(rest))
        yield family
        fleet = CounterMetricFamily("litefleet_fleet_messages_lost", "Messages lost over the whole fleet")
        fleet.add_metric([], float(sum(losses.values())))
        yield fleet

    # per device ---------------------------------------------------------------------------

    def _per_device(self, devices: list[dict[str, Any]]) -> Iterator[Metric]:
        chosen = sorted(devices, key=lambda d: str(d.get("device_id")))[:self.max_devices]
        omitted = GaugeMetricFamily("litefleet_device_series_omitted",
                                    f"Devices without per-device series (only {self.max_devices} are exported)")
        omitted.add_metric([], float(max(len(devices) - len(chosen), 0)))
        yield omitted
        p95 = GaugeMetricFamily("litefleet_device_p95_latency_ms", "Latest p95 inference latency",
                                labels=["device", "model_version"])
        ips = GaugeMetricFamily("litefleet_device_inferences_per_second", "Latest inference rate", labels=["device"])
        cpu = GaugeMetricFamily("litefleet_device_cpu_percent", "Latest CPU usage", labels=["device"])
        temp = GaugeMetricFamily("litefleet_device_temperature_celsius", "Latest CPU/SoC temperature",
                                 labels=["device"])
        online = GaugeMetricFamily("litefleet_device_online", "1 if the device is online", labels=["device"])
        for d in chosen:
            device_id = str(d.get("device_id"))
            online.add_metric([device_id], 1.0 if d.get("online") else 0.0)
            for family, key, labels in ((p95, "p95_ms", [device_id, str(d.get("model_version") or "none")]),
                                        (ips, "inferences_per_s", [device_id]), (cpu, "cpu_percent", [device_id]),
                                        (temp, "temperature_c", [device_id])):
                value = _num(d.get(key))
                if value is not None:
                    family.add_metric(labels, value)
        yield from (p95, ips, cpu, temp, online)

    # model quality ------------------------------------------------------------------------

    def _quality(self, devices: list[dict[str, Any]]) -> Iterator[Metric]:
        chosen = sorted(devices, key=lambda d: str(d.get("device_id")))[:self.max_devices]
        score = GaugeMetricFamily("litefleet_device_drift_score", "Latest drift score (PSI) of the model the device "
                                  "runs: < 0.1 stable, 0.1-0.25 moderate, > 0.25 major shift",
                                  labels=["device", "model", "version"])
        drifting: dict[tuple[str, str], int] = {}
        for d in devices:
            drift, model = d.get("drift") or {}, d.get("model") or {}
            value = _num(drift.get("score"))
            if value is None:
                continue
            key = (str(model.get("name") or "none"), str(model.get("version")))
            drifting[key] = drifting.get(key, 0) + (1 if value > self.drift_threshold else 0)
        for d in chosen:
            value = _num((d.get("drift") or {}).get("score"))
            if value is not None:
                model = d.get("model") or {}
                score.add_metric([str(d.get("device_id")), str(model.get("name") or "none"),
                                  str(model.get("version"))], value)
        yield score
        over = GaugeMetricFamily("litefleet_model_drifting_devices",
                                 f"Devices whose drift score is over the threshold ({self.drift_threshold:g})",
                                 labels=["model", "version"])
        for key, n in sorted(drifting.items()):
            over.add_metric(list(key), float(n))
        yield over
        from fleet.quality import group_rows, sum_confusions
        accuracy = GaugeMetricFamily("litefleet_model_field_accuracy", "Accuracy of the labels the devices' "
                                     "applications sent back, over the fleet", labels=["model", "version"])
        labels = GaugeMetricFamily("litefleet_model_feedback_labels", "Feedback labels counted in the field "
                                   "accuracy (cumulative per device and model version)", labels=["model", "version"])
        for (name, version), rows in group_rows(self.store.quality()).items():
            matrix = sum_confusions(r["feedback"]["confusion"] for r in rows if r.get("feedback"))
            total = sum(sum(row) for row in matrix)
            if not total:
                continue
            correct = sum(matrix[i][i] for i in range(len(matrix)))
            accuracy.add_metric([name, str(version)], correct / total)
            labels.add_metric([name, str(version)], float(total))
        yield accuracy
        yield labels

    def _alerts(self, counts: Mapping[str, Any]) -> Iterator[Metric]:
        by_kind = dict.fromkeys(ALERT_KINDS, 0)
        by_kind.update({str(k): int(n) for k, n in (counts.get("alerts_open") or {}).items()})
        family = GaugeMetricFamily("litefleet_alerts_active", "Open alerts by kind", labels=["kind"])
        for kind, n in sorted(by_kind.items()):
            family.add_metric([kind], float(n))
        yield family


def make_registry(store: Any, ingest_stats: Callable[[], Mapping[str, Any]] | None = None,
                  **limits: float) -> CollectorRegistry:
    """A registry holding only the fleet collector (not the server process's own metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(store, ingest_stats, **limits))
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """(body, content type) of a scrape."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


__all__ = ["ALERT_KINDS", "DEFAULT_MAX_DEVICES", "DEFAULT_MAX_LOSS_DEVICES", "FleetCollector", "exposition",
           "make_registry"]
