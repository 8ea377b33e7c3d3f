"""The agent daemon: serve the active model, install new ones, watch health, report.

It composes the parts and owns the main loop; every decision it takes is made by a part that
is tested on its own (installer, health watch, spool). Installs and rollbacks are serialized
by one lock; the inference API keeps answering from the old model until the new one is live.

The loop sends WATCHDOG=1 only while the agent is healthy (the API threads alive, the spool
writable), so systemd restarts an agent that hangs or breaks.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Protocol

from agent import __version__, inbox
from agent import events as ev
from agent.access import load_tokens
from agent.api import InferenceServer
from agent.config import AgentConfig
from agent.engine import LoadedModel, load_model, smoke_test
from agent.errors import AgentError, ConfigError
from agent.events import Event
from agent.feedback import FEEDBACK_FILE, FeedbackBook
from agent.health import BREACH, HEALTHY, HealthWatch
from agent.installer import Installer, InstallResult
from agent.metrics import InferenceMetrics
from agent.model_slot import ModelSlot
from agent.notify import Notifier, systemd_credential
from agent.protocol import keys
from agent.protocol.errors import KeyFileError, LitefleetError
from agent.protocol.manifest import ModelData
from agent.spool import Spool
from agent.store import ModelStore
from agent.telemetry import collect

log = logging.getLogger("litefleet.agent")

STATUS_FILE = "status.json"
SPOOL_FILE = "spool.sqlite"
RECENT_EVENTS = 20
TOKENS_CREDENTIAL = "api-tokens"   # the name the unit's LoadCredential= gives api.tokens_file


class Transport(Protocol):
    """What the daemon needs from a link to the fleet (MQTT); absent on a standalone device."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def healthy(self) -> bool: ...
    def notify_changed(self) -> None: ...
    def wake(self) -> None: ...


def load_trusted(config: AgentConfig) -> list[keys.PublicKey]:
    """The device's trusted keys; a missing or empty directory is a configuration error."""
    try:
        trusted = keys.load_trusted_dir(config.trusted_keys_dir)
    except KeyFileError as exc:
        raise ConfigError(f"{config.path}: trusted_keys_dir: {exc}") from None
    if not any(k.role == "release" for k in trusted):
        raise ConfigError(f"{config.path}: trusted_keys_dir: {config.trusted_keys_dir} holds no release*.pub key; "
                          "the agent could never install a bundle")
    return trusted


class AgentDaemon:
    """One device's agent. ``start()`` → ``tick()`` from a loop → ``stop()``."""

    def __init__(self, config: AgentConfig, *, notifier: Notifier | None = None, connect: bool = True) -> None:
        self.config = config
        self.profile = config.load_profile()
        self.trusted = load_trusted(config)
        self.x25519_key = config.load_x25519_key()   # opens bundles encrypted for this device
        self.store = ModelStore(config.state_dir)
        self.spool = Spool(config.state_dir / SPOOL_FILE, config.spool_max_rows)
        self.metrics = InferenceMetrics()
        self.slot = ModelSlot()
        self.notifier = notifier or Notifier()
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_EVENTS)
        self.started_at = time.time()
        self.transport: Transport | None = None
        self._lock = threading.RLock()        # installs and rollbacks, one at a time
        self._health_lock = threading.Lock()  # the health watch is fed from API threads
        self._health: HealthWatch | None = None
        self._health_state: dict[str, Any] | None = None
        self._next_telemetry = 0.0
        self._telemetry_interval_s = config.telemetry_interval_s
        self._command_id = ""
        self._last_p95: float | None = None
        self.installer = Installer(self.store, self.trusted, self.profile, events=self.emit,
                                   on_activate=self._activated, workers=config.api.workers,
                                   decryption_key=self.x25519_key)
        api = config.api
        # TCP is off unless configured, and then needs bearer tokens (systemd's credential copy first)
        tokens = (load_tokens(api.tokens_file, systemd_credential(TOKENS_CREDENTIAL)) if api.tcp_port else None)
        self.feedback = FeedbackBook(config.state_dir / FEEDBACK_FILE, capacity=api.feedback_window)
        self.server = InferenceServer(
            self.slot, tcp=(api.tcp_host, api.tcp_port) if api.tcp_port else None,
            unix_socket=api.unix_socket or None, on_inference=self._on_inference,
            socket_group=api.socket_group or None, tokens=tokens, feedback=self.feedback,
            drift_window=api.drift_window)
        if connect and config.broker.url:
            from agent.transport import MqttTransport  # paho only when the device has a broker
            self.transport = MqttTransport(self)

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the active model, open the API, then tell systemd we are ready."""
        for note in self.store.recovered:
            self.emit(Event(ev.AGENT_STARTED, f"model store recovered an interrupted install: {note}"))
        self._load_active()
        self.server.start()
        model = self.slot.get()
        self.emit(Event(ev.AGENT_STARTED, f"agent {__version__} started on profile {self.profile.name}"
                        + (f", serving {model.name} v{model.version}" if model else ", no model installed yet"),
                        {"profile": self.profile.name, "api": self.api_addresses()}))
        if self.transport is not None:
            self.transport.start()
        self._write_status()
        self.notifier.ready(self.summary())

    def stop(self) -> None:
        self.notifier.stopping("stopping")
        if self.transport is not None:
            self.transport.stop()
        self.server.stop()
        self.feedback.flush()
        self.slot.close(timeout=5)   # requests in flight finish; the model is closed once idle
        self._write_status(running=False)
        self.spool.close()

    def run(self, stop: threading.Event) -> None:
        """The main loop: telemetry, health verdicts and the watchdog until ``stop`` is set."""
        self.start()
        period = min(1.0, (self.notifier.watchdog_interval() or 2.0) / 2)
        try:
            while not stop.wait(period):
                self.tick(time.time())
        finally:
            self.stop()

    def tick(self, now: float) -> None:
        """One turn of the loop; public so tests drive it with their own clock."""
        inbox.take_one(self.config.state_dir, self._install_from_inbox)
        self._check_health(time.monotonic())
        self.feedback.flush()       # field labels reach the disk within a loop turn
        if now >= self._next_telemetry:
            self._next_telemetry = now + self._telemetry_interval_s
            self.record_telemetry(now)
        if self.healthy():
            self.notifier.watchdog()

    def healthy(self) -> bool:
        threads_ok = all(t.is_alive() for t in getattr(self.server, "_threads", []))
        transport_ok = self.transport is None or self.transport.healthy()
        return threads_ok and transport_ok

    # installs ----------------------------------------------------------------------------

    def install_file(self, path: str | Path) -> InstallResult:
        with self._lock:
            return self.installer.install_file(path)

    def install_parts(self, manifest_bytes: bytes, signature_bytes: bytes, model: ModelData, source: str) -> InstallResult:
        with self._lock:
            return self.installer.install_parts(manifest_bytes, signature_bytes, model, source)

    def _install_from_inbox(self, path: Path) -> dict[str, Any]:
        result = self.install_file(path)
        return {**result.to_dict(), "message": result.message}

    def rollback(self, reason: str, *, if_active: tuple[str, int] | None = None) -> InstallResult:
        with self._lock:
            return self.installer.rollback(reason, if_active=if_active)

    def _activated(self, loaded: LoadedModel) -> None:
        """The installer made ``loaded`` active: serve it, and watch its health."""
        self.slot.swap(loaded)       # the old model finishes its requests, then the slot closes it
        baseline = self._last_p95
        with self._health_lock:
            self._health = HealthWatch(self.config.health, time.monotonic(), baseline)
            self._health_state = None
        self._write_status()
        self.notifier.status(self.summary())
        if self.transport is not None:
            self.transport.notify_changed()

    def _load_active(self) -> None:
        """Serve the active model at start; if it no longer loads, fall back to the previous one."""
        active = self.store.active()
        if active is None:
            return
        loaded = None
        try:
            verified = active.read_verified(self.trusted)
            model = self.installer.plaintext(verified.manifest, verified.model)  # decrypted in memory only
            loaded = load_model(model, verified.manifest, self.profile,
                                workers=self.config.api.workers, events=self.emit)
            smoke_test(loaded)
        except (LitefleetError, OSError) as exc:
            if loaded is not None:
                loaded.close()
            self.emit(Event(ev.INSTALL_FAILED, f"the active model {active.manifest.name} v{active.manifest.version} "
                                               f"cannot be served ({exc}); rolling back to the previous one",
                            {"code": "active_broken", "name": active.manifest.name,
                             "version": active.manifest.version}))
            result = self.installer.rollback(f"active model failed at start: {exc}")
            if not result.ok:
                log.error("no model can be served: %s", result.message)
            return
        self.slot.swap(loaded)

    # health ------------------------------------------------------------------------------

    def _on_inference(self, latency_ms: float, ok: bool) -> None:
        self.metrics.record(latency_ms, ok)
        watch = self._health
        if watch is not None:
            with self._health_lock:
                watch.record(latency_ms, ok, time.monotonic())

    def _check_health(self, now: float) -> None:
        with self._health_lock:
            watch = self._health
            if watch is None:
                return
            verdict = watch.verdict(now)
            self._health_state = verdict.to_dict()
            if verdict.state == "watching":
                return
            self._health = None
        if verdict.state == BREACH:
            self.emit(Event(ev.HEALTH_BREACH, f"health watch: {verdict.reason}; rolling back", verdict.to_dict()))
            self.rollback(f"health breach: {verdict.reason}")
        elif verdict.state == HEALTHY:
            log.info("health watch passed: %s", verdict.reason)

    # reporting ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def command_context(self, command_id: str) -> Iterator[None]:
        """Events emitted while a command runs carry its id, so the operator can follow it."""
        self._command_id = command_id
        try:
            yield
        finally:
            self._command_id = ""

    def apply_settings(self, settings: dict[str, Any]) -> None:
        """Settings an operator may change at run time by a signed config command."""
        if "telemetry_interval_s" in settings:
            self._telemetry_interval_s = float(settings["telemetry_interval_s"])
            self._next_telemetry = 0.0

    def emit(self, event: Event) -> None:
        """Every event is logged, spooled for the fleet, and kept for ``status``."""
        log.info("%s: %s", event.kind, event.reason)
        doc = event.to_dict()
        if self._command_id:
            doc["details"] = {**doc["details"], "command_id": self._command_id}
        self.recent.append(doc)
        try:
            self.spool.append("events", doc)
        except AgentError as exc:
            log.error("cannot spool event %s: %s", event.kind, exc)
        if self.transport is not None:
            self.transport.wake()

    def record_telemetry(self, now: float) -> dict[str, Any]:
        model = self.slot.get()
        info = {"name": model.name, "version": model.version, "sha256": model.sha256} if model else None
        doc = collect(self.metrics, info, model.report.to_dict() if model else None,
                      state_dir=self.config.state_dir, started_at=self.started_at, now=now,
                      drift=self.server.api.drift_report(), feedback=self.server.api.feedback_report(),
                      api=self.server.access.snapshot_and_reset())
        doc["spool"] = {"pending": self.spool.pending(), "dropped": self.spool.dropped()}
        p95 = (doc.get("inference") or {}).get("latency_ms", {}).get("p95")
        if p95 is not None and self._health is None:
            self._last_p95 = p95
        try:
            self.spool.append("telemetry", doc)
        except AgentError as exc:
            log.error("cannot spool telemetry: %s", exc)
        if self.transport is not None:
            self.transport.wake()
        self._write_status(telemetry=doc)
        return doc

    def public_keys(self) -> dict[str, str]:
        """What the birth message reports: the X25519 key bundles may be encrypted for (base64, raw)."""
        return {"x25519": keys.x25519_b64(self.x25519_key.public_key())} if self.x25519_key else {}

    def api_addresses(self) -> dict[str, Any]:
        tcp = self.server.tcp_address
        return {"tcp": f"http://{tcp[0]}:{tcp[1]}" if tcp else None,
                "unix_socket": str(self.server.unix_socket) if self.server.unix_socket else None}

    def summary(self) -> str:
        model = self.slot.get()
        if model is None:
            return f"no model; profile {self.profile.name}"
        return f"serving {model.name} v{model.version} on {model.report.delegate} ({model.report.runtime})"

    def status(self, telemetry: dict[str, Any] | None = None, running: bool = True) -> dict[str, Any]:
        model = self.slot.get()
        return {
            "device_id": self.config.device_id, "fleet": self.config.fleet, "profile": self.profile.name,
            "agent_version": __version__, "pid": os.getpid(), "running": running,
            "started_at": self.started_at, "updated_at": time.time(), "summary": self.summary(),
            "model": ({"name": model.name, "version": model.version, "sha256": model.sha256} if model else None),
            "engine": model.report.to_dict() if model else None,
            "store": self.store.status(), "health": self._health_state,
            "api": {**self.api_addresses(), "socket_group": self.config.api.socket_group or None,
                    "refused": self.server.access.totals()},
            "public_keys": self.public_keys() | (
                {"x25519_key_id": keys.x25519_key_id(self.x25519_key.public_key())} if self.x25519_key else {}),
            "spool": {"pending": self.spool.pending(), "dropped": self.spool.dropped()},
            "telemetry": telemetry, "recent_events": list(self.recent),
        }

    def _write_status(self, telemetry: dict[str, Any] | None = None, running: bool = True) -> None:
        """A snapshot for ``litefleet-agent status``, replaced atomically."""
        try:
            doc = self.status(telemetry, running)
            keys.atomic_write(self.config.state_dir / STATUS_FILE,
                              json.dumps(doc, indent=1, default=str).encode(), mode=0o640)
        except (OSError, AgentError) as exc:
            log.warning("cannot write %s: %s", STATUS_FILE, exc)
