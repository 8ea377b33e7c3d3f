"""The fleet server: one process hosting the host's long-running services.

- the repository service (bundles to devices in shared chunk streams),
- telemetry, status and event ingest into the store (SQLite or PostgreSQL),
- the HTTP API, the dashboard and ``/metrics``,
- alert rules, staged rollouts, and the periodic rollup that bounds the store.

The server owns the links' and threads' lifetimes and a periodic stats line; each service
only subscribes, answers, and reports. Ingest has a link of its own: it acknowledges a QoS 1
message only after the database committed it (manual acks), which the repository must not
wait for.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.repository import BlobStore, RepositoryService

log = logging.getLogger("litefleet.server")


@dataclass(frozen=True)
class ServerOptions:
    """What ``litefleet server`` was told; the defaults suit one machine."""

    fleet: str
    data_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8600              # 0: any free port; None-like -1: no HTTP
    metrics_token: bool = False
    share_group: str | None = "litefleet"
    raw_retention_s: float = 86400.0
    minute_retention_s: float = 30 * 86400.0
    rollup_interval_s: float = 300.0
    alert_interval_s: float = 30.0
    stats_interval_s: float = 60.0
    drift_threshold: float = 0.2       # drift score (PSI) over which a device is flagged (docs/quality.md)
    merge_window_s: float = 1.0


class FleetServer:
    """Runs every service until ``stop`` is set. ``store``/``ingest_link`` None: repository only."""

    def __init__(self, link: Any, blob_store: BlobStore, options: ServerOptions, *, store: Any = None,
                 ingest_link: Any = None, operator_key: Any = None, profiles_dir: str | None = None) -> None:
        self.link = link
        self.blob_store = blob_store
        self.options = options
        self.fleet = options.fleet
        self.store = store
        self.ingest_link = ingest_link
        self.operator_key = operator_key
        self.profiles_dir = profiles_dir
        self.repository = RepositoryService(link, blob_store, options.fleet, merge_window_s=options.merge_window_s)
        self.ingestor: Any = None
        self.api: Any = None
        self.alerts: Any = None
        self.rollouts: Any = None
        self.token: str | None = None
        self._next_rollup = 0.0
        self.started = threading.Event()

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.repository.start()
        if self.store is not None:
            self._start_store_services()
        self.link.start()
        if self.ingest_link is not None:
            self.ingest_link.start()
        log.info("fleet server for fleet %r: %d blob(s) in %s, broker %s%s", self.fleet, len(self.blob_store.list()),
                 self.blob_store.root, self.link.url, f", API {self.api.url}" if self.api else "")
        self.started.set()

    def _start_store_services(self) -> None:
        from fleet.alerts import AlertEngine
        from fleet.api import ApiServer, ServerApi, ensure_token
        from fleet.api_rollouts import MountedApi, RolloutApi
        from fleet.ingest import Ingestor

        version = self.store.migrate()
        log.info("store %s at schema version %d", self.store.backend, version)
        if self.ingest_link is not None:
            self.ingestor = Ingestor(self.ingest_link, self.store, self.fleet, share_group=self.options.share_group)
            self.ingestor.start()
        stats = self.ingestor.stats if self.ingestor is not None else None
        if self.options.http_port >= 0:
            self.token = ensure_token(self.options.data_dir)
            api = MountedApi(ServerApi(self.store, self.token, ingest_stats=stats,
                                       metrics_token=self.options.metrics_token, blob_store=self.blob_store,
                                       drift_threshold=self.options.drift_threshold),
                             RolloutApi(self.store, fleet=self.fleet, blob_store=self.blob_store))
            self.api = ApiServer(api, self.options.http_host, self.options.http_port).start()
        from fleet.alerts import AlertConfig
        self.alerts = AlertEngine(self.store, AlertConfig(drift_threshold=self.options.drift_threshold),
                                  profiles_dir=self.profiles_dir,
                                  on_open=lambda alert: log.warning("alert: %s", alert.get("message")))
        self.alerts.start(interval_s=self.options.alert_interval_s)
        if self.operator_key is not None:
            from fleet.rollout_runner import RolloutRunner
            self.rollouts = RolloutRunner(self.store, self.link, self.fleet, self.operator_key, self.blob_store)
            self.rollouts.start()
        else:
            log.info("no --operator-key: rollouts can be created but not driven by this server")

    def stop(self) -> None:
        final = self.stats_line()
        for service in (self.rollouts, self.alerts):
            if service is not None:
                service.stop()
        if self.api is not None:
            self.api.stop()
        if self.ingestor is not None:
            self.ingestor.stop()
        self.repository.stop()
        for link in (self.ingest_link, self.link):
            if link is not None:
                link.stop()
        if self.store is not None:
            self.store.close()
        log.info("stopped; %s", final)

    def run(self, stop: threading.Event) -> None:
        """Start, log a stats line every ``stats_interval_s``, roll up the store, until ``stop``."""
        self.start()
        next_stats = time.monotonic() + self.options.stats_interval_s
        try:
            while not stop.wait(1.0):
                if time.monotonic() >= next_stats:
                    log.info("stats: %s", self.stats_line())
                    next_stats = time.monotonic() + self.options.stats_interval_s
                self._maybe_rollup()
        finally:
            self.stop()

    def _maybe_rollup(self) -> None:
        if self.store is None or time.monotonic() < self._next_rollup:
            return
        self._next_rollup = time.monotonic() + self.options.rollup_interval_s
        try:
            done = self.store.rollup(time.time(), raw_retention_s=self.options.raw_retention_s,
                                     minute_retention_s=self.options.minute_retention_s)
            log.debug("rollup: %s", done)
        except Exception as exc:  # the database may be away; ingest reports that too
            log.warning("rollup failed, retrying later: %s", exc)

    # reporting ---------------------------------------------------------------------------

    def stats_line(self) -> str:
        s = self.repository.stats
        state = "connected" if self.link.connected else f"disconnected ({self.link.last_error or 'reconnecting'})"
        line = (f"broker {state}; {len(self.blob_store.list())} blob(s); requests {s['requests']} "
                f"(merged {s['merged']}, malformed {s['malformed']}, unknown blob {s['unknown_blob']}); "
                f"published {s['chunks_published']} chunk(s) + {s['heads_published']} head(s), "
                f"{s['bytes_published'] / 1e6:.2f} MB; publish failures {s['publish_failed']}")
        if self.ingestor is not None:
            i = self.ingestor.stats()
            line += (f"; ingest {i.get('messages', 0)} msgs ({i.get('messages_per_s', 0):.0f}/s, "
                     f"{i.get('pending', 0)} pending)" + (f"; PROBLEM: {i['problem']}" if i.get("problem") else ""))
        return line


__all__ = ["FleetServer", "ServerOptions"]
