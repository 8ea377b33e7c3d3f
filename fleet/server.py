"""The fleet server process: for now the repository service on one shared MQTT link.

Why a class around the service: ``litefleet server`` will host more services on the same link
(telemetry ingest, rollouts, the HTTP API); the server owns the link's lifetime and the
periodic stats line, each service only subscribes and answers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from fleet.repository import BlobStore, RepositoryService

log = logging.getLogger("litefleet.server")


class FleetServer:
    """Runs the repository service on ``link`` until ``stop`` is set."""

    def __init__(self, link: Any, store: BlobStore, fleet: str, *, stats_interval_s: float = 60.0,
                 merge_window_s: float = 1.0) -> None:
        self.link = link
        self.store = store
        self.fleet = fleet
        self.stats_interval_s = stats_interval_s
        self.repository = RepositoryService(link, store, fleet, merge_window_s=merge_window_s)

    def stats_line(self) -> str:
        s = self.repository.stats
        state = "connected" if self.link.connected else f"disconnected ({self.link.last_error or 'reconnecting'})"
        return (f"broker {state}; {len(self.store.list())} blob(s); requests {s['requests']} "
                f"(merged {s['merged']}, malformed {s['malformed']}, unknown blob {s['unknown_blob']}); "
                f"published {s['chunks_published']} chunk(s) + {s['heads_published']} head(s), "
                f"{s['bytes_published'] / 1e6:.2f} MB; publish failures {s['publish_failed']}")

    def run(self, stop: threading.Event) -> None:
        """Subscribe, connect, log a stats line every ``stats_interval_s`` until ``stop``; then disconnect."""
        self.repository.start()
        self.link.start()
        log.info("fleet server for fleet %r: serving %d blob(s) from %s on %s", self.fleet,
                 len(self.store.list()), self.store.root, self.link.url)
        next_stats = time.monotonic() + self.stats_interval_s
        try:
            while not stop.wait(min(1.0, max(0.0, next_stats - time.monotonic()))):
                if time.monotonic() >= next_stats:
                    log.info("stats: %s", self.stats_line())
                    next_stats = time.monotonic() + self.stats_interval_s
        finally:
            final = self.stats_line()
            self.repository.stop()
            self.link.stop()
            log.info("stopped; %s", final)


__all__ = ["FleetServer"]
