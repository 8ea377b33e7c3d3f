"""The device's link to the fleet: status, telemetry and events out; signed commands in.

- On every connect it publishes a retained birth message (inventory: profile, runtime,
  delegates, active model, agent version, hardware); its last will marks it offline.
- It publishes the spool (telemetry and events) at QoS 1, oldest first, and deletes only what
  the broker acknowledged, so nothing is lost while the broker is away (up to the spool bound).
- It listens on its own, its groups', its profile's and the fleet's command topics. Each
  command is checked by :class:`~agent.protocol.commands.CommandGuard` (signature, expiry,
  replay, address, profile); deploys are pulled with :class:`~agent.transfer.Downloader` (over
  an :class:`~agent.blob_link.BlobLink` of their own) and installed by the daemon's pipeline. Commands run one at a time on a worker thread, never on
  the MQTT handler thread.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent import events as ev
from agent.errors import InstallError
from agent.events import Event
from agent.blob_link import BlobLink
from agent.mqtt import Message, MqttLink, TlsFiles, Will, parse_url
from agent.notify import systemd_credential
from agent.protocol import messages
from agent.protocol.commands import CheckedCommand, CommandGuard, CommandRejected, Identity
from agent.protocol.keys import atomic_write
from agent.protocol.topics import Topics
from agent.transfer import Downloader, TransferError

if TYPE_CHECKING:
    from agent.daemon import AgentDaemon

log = logging.getLogger("litefleet.transport")

GUARD_FILE = "commands.json"
PENDING_FILE = "pending_deploy.json"   # an accepted deploy not finished yet: resumed after a restart
PUBLISH_BATCH = 200
ACK_TIMEOUT_S = 30.0
QUIET_REJECTIONS = ("replayed", "expired")   # a retained command seen again after a reconnect
CONFIG_KEYS = {"telemetry_interval_s": (float, 1.0, 86400.0)}


class MqttTransport:
    """Connects an :class:`~agent.daemon.AgentDaemon` to the fleet over MQTT."""

    def __init__(self, daemon: "AgentDaemon", *, link: MqttLink | None = None,
                 fetch_timeout_s: float = 60.0) -> None:
        self.daemon = daemon
        cfg = daemon.config
        self.topics = Topics(cfg.fleet)
        self.identity = Identity(cfg.device_id, cfg.fleet, tuple(cfg.groups), daemon.profile.name)
        self.guard_path = cfg.state_dir / GUARD_FILE
        self.guard = CommandGuard.from_dict(self.identity, _read_json(self.guard_path))
        self.pending_path = cfg.state_dir / PENDING_FILE
        self.fetch_timeout_s = fetch_timeout_s
        self.link = link or MqttLink(cfg.broker.url, cfg.device_id, tls=_tls(cfg), will=self._will(),
                                     clean_start=False, keepalive_s=cfg.broker.keepalive_s,
                                     on_connect=self._on_connect)
        # Models come over a second, lean connection opened only while a fetch runs (agent/blob_link.py),
        # with the same identity, and the protocol version the main link negotiated.
        self.stream_link = BlobLink(cfg.broker.url, f"{cfg.device_id}.blob", tls=_tls(cfg),
                                    protocol=lambda: self.link.protocol_version, keepalive_s=cfg.broker.keepalive_s)
        self.downloader = Downloader(self.stream_link, self.topics, cfg.device_id, cfg.state_dir,
                                     daemon.installer, daemon.emit)
        self._commands: queue.Queue[Message | CheckedCommand | None] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for topic_filter in self.topics.device_subscriptions(self.identity.device_id, self.identity.groups,
                                                             self.identity.profile):
            self.link.subscribe(topic_filter, self._commands.put, qos=1)
        pending = _read_json(self.pending_path)
        if pending.get("body"):
            # The guard already remembers this command, so its retained copy would be ignored as a
            # replay: an agent killed mid-deploy must finish it from here (the download resumes).
            self._commands.put(CheckedCommand(pending["body"], str(pending.get("signer", ""))))
        self.link.start()
        for target, name in ((self._command_loop, "commands"), (self._publish_loop, "publisher")):
            thread = threading.Thread(target=target, name=f"transport-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.downloader.cancel()
        self._commands.put(None)
        for thread in self._threads:
            thread.join(timeout=10)
        try:
            if self.link.connected:
                self.link.publish(str(self.topics.status(self.identity.device_id)),
                                  messages.encode(self._offline("stopped")), qos=1, retain=True).wait(5)
        finally:
            self.stream_link.stop()
            self.link.stop()

    def healthy(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def notify_changed(self) -> None:
        """The active model changed: publish a fresh birth message."""
        self._publish_birth()

    # status ------------------------------------------------------------------------------

    def _will(self) -> Will:
        return Will(str(self.topics.status(self.identity.device_id)),
                    messages.encode(self._offline("connection lost")), qos=1, retain=True)

    def _offline(self, reason: str) -> dict[str, Any]:
        # groups and profile too: an operator targeting a group must count its offline members
        return {"v": messages.MESSAGE_VERSION, "state": "offline", "device_id": self.identity.device_id,
                "ts": time.time(), "reason": reason, "fleet": self.identity.fleet,
                "groups": list(self.identity.groups), "profile": self.identity.profile}

    def birth(self) -> dict[str, Any]:
        daemon = self.daemon
        model = daemon.slot.get()
        engine = model.report.to_dict() if model else {}
        return {
            "v": messages.MESSAGE_VERSION, "state": "online", "device_id": self.identity.device_id,
            "ts": time.time(), "fleet": self.identity.fleet, "groups": list(self.identity.groups),
            "labels": dict(daemon.config.labels), "profile": self.identity.profile, "agent_version": __version__,
            "runtime": {"name": engine.get("runtime"), "version": engine.get("runtime_version")},
            "delegates_available": [a["kind"] for a in engine.get("attempts", []) if a.get("outcome") == "used"],
            "engine": engine,
            "active_model": ({"name": model.name, "version": model.version, "sha256": model.sha256}
                             if model else None),
            "hardware": {"machine": platform.machine(), "cores": os.cpu_count() or 0,
                         "system": platform.system(), "release": platform.release()},
            "public_keys": daemon.public_keys(),   # encrypted bundles are sealed for these
        }

    def _on_connect(self, info: Any) -> None:
        log.info("connected to %s (MQTT %s, session %s)", self.daemon.config.broker.url, info.protocol,
                 "resumed" if info.session_present else "new")
        self._publish_birth()
        self._wake.set()

    def _publish_birth(self) -> None:
        try:
            self.link.publish(str(self.topics.status(self.identity.device_id)),
                              messages.encode(self.birth()), qos=1, retain=True)
        except Exception as exc:  # not connected: the next connect publishes it
            log.debug("birth not published now: %s", exc)

    # telemetry and events ------------------------------------------------------------------

    def _publish_loop(self) -> None:
        spool = self.daemon.spool
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while not self._stop.is_set() and self.link.connected:
                rows = spool.peek(PUBLISH_BATCH)
                if not rows:
                    break
                sent = []
                for row_id, kind, doc in rows:
                    topic, payload = self._wire(kind, doc)
                    try:
                        sent.append((row_id, self.link.publish(topic, payload, qos=1)))
                    except Exception as exc:
                        log.debug("publish interrupted: %s", exc)
                        break
                acked = [row_id for row_id, token in sent if token.wait(ACK_TIMEOUT_S) and token.acked]
                spool.ack(acked)
                if len(acked) < len(sent):
                    break  # the connection dropped; what was not acknowledged stays spooled

    def wake(self) -> None:
        self._wake.set()

    def _wire(self, kind: str, doc: dict[str, Any]) -> tuple[str, bytes]:
        me = self.identity.device_id
        if kind == "events":
            details = dict(doc.get("details") or {})
            message = {"v": messages.MESSAGE_VERSION, "device_id": me, "seq": doc["seq"],
                       "ts": float(doc.get("time", time.time())), "kind": doc.get("kind", ""),
                       "reason": doc.get("reason", ""), "command_id": str(details.pop("command_id", "")),
                       "details": details}
            return str(self.topics.events(me)), messages.encode(message)
        message = {"v": messages.MESSAGE_VERSION, "device_id": me, "seq": doc["seq"],
                   "ts": float(doc.get("time", time.time())), "data": {k: v for k, v in doc.items() if k != "seq"}}
        return str(self.topics.telemetry(me)), messages.encode(message)

    # commands ----------------------------------------------------------------------------

    def _command_loop(self) -> None:
        while not self._stop.is_set():
            message = self._commands.get()
            if message is None:
                return
            try:
                if isinstance(message, CheckedCommand):
                    self._resume(message)
                else:
                    self.handle(message)
            except Exception:  # a bug must not take the device off the fleet
                log.exception("command on %s failed", getattr(message, "topic", "(resumed deploy)"))

    def handle(self, message: Message) -> None:
        """Check one command message and act on it; anything bad is dropped with a reason."""
        try:
            doc = messages.decode(message.payload, "cmd", message.topic)
        except messages.MessageError as exc:
            log.warning("dropped a malformed command on %s: %s", message.topic, exc)
            return
        try:
            checked = self.guard.check(doc, self.daemon.trusted)
        except CommandRejected as exc:
            if message.retain and exc.code in QUIET_REJECTIONS:
                log.debug("ignored retained command on %s: %s", message.topic, exc)
                return
            body = doc.get("body") if isinstance(doc.get("body"), dict) else {}
            self.daemon.emit(Event(ev.DEPLOY_REJECTED, f"command rejected ({exc.code}): {exc}",
                                   {"code": exc.code, "command_id": str(body.get("id", "")),
                                    "topic": message.topic}))
            self.wake()
            return
        self.guard.accept(checked)
        atomic_write(self.guard_path, json.dumps(self.guard.to_dict()).encode(), mode=0o600)
        with self.daemon.command_context(checked.id):
            if checked.action == "deploy":
                self._run_deploy(checked)
            elif checked.action == "rollback":
                self._run_rollback(checked)
            elif checked.action == "config":
                self._configure(checked)
        self._publish_birth()
        self.wake()

    def _run_rollback(self, command: CheckedCommand) -> None:
        reason = str(command.args.get("reason", "operator requested a rollback"))
        try:
            condition = _if_active(command.args.get("if_active"))
        except ValueError as exc:
            self.daemon.emit(Event(ev.DEPLOY_REJECTED, f"command rejected (bad_args): {exc}",
                                   {"code": "bad_args", "command_id": command.id}))
            return
        self.daemon.rollback(reason, if_active=condition)

    def _run_deploy(self, command: CheckedCommand, resumed: bool = False) -> None:
        """Run a deploy, remembering it on disk until it ends so that a restart resumes it."""
        atomic_write(self.pending_path, json.dumps({"body": command.body, "signer": command.signer}).encode(),
                     mode=0o600)
        keep = False
        try:
            keep = self._deploy(command, resumed)
        finally:
            if not keep:
                self.pending_path.unlink(missing_ok=True)

    def _resume(self, command: CheckedCommand) -> None:
        if command.body.get("expires_at", 0) < time.time():
            self.pending_path.unlink(missing_ok=True)
            with self.daemon.command_context(command.id):
                self.daemon.emit(Event(ev.INSTALL_FAILED, "an interrupted deploy expired before the agent came "
                                                          "back; push it again", {"code": "expired"}))
            self.wake()
            return
        with self.daemon.command_context(command.id):
            self._run_deploy(command, resumed=True)
        self._publish_birth()
        self.wake()

    def _deploy(self, command: CheckedCommand, resumed: bool = False) -> bool:
        """Fetch and install; True when it was interrupted by the agent stopping (resume it later)."""
        args = command.args
        blob = str(args.get("blob", ""))
        verb = "resuming interrupted deploy" if resumed else "deploy"
        self.daemon.emit(Event(ev.DEPLOY_ACCEPTED, f"{verb} of {args.get('name')} v{args.get('version')} accepted; "
                                                   f"fetching blob {blob[:12]}", {"blob": blob, "resumed": resumed}))
        self.wake()
        try:
            manifest_bytes, signature_bytes, model = self.downloader.fetch(blob, timeout_s=self.fetch_timeout_s)
        except TransferError as exc:
            if exc.code == "cancelled" and self._stop.is_set():
                log.info("deploy of blob %s interrupted by shutdown; it resumes at the next start", blob[:12])
                return True
            self.daemon.emit(Event(ev.INSTALL_FAILED, f"download failed ({exc.code}): {exc}",
                                   {"code": exc.code, "blob": blob, "missing": exc.missing}))
            return False
        except InstallError as exc:  # the head was refused (signature, profile, version, space): say why
            self.daemon.emit(Event(ev.DEPLOY_REJECTED, f"deploy refused ({exc.code}): {exc}",
                                   {"code": exc.code, "blob": blob}))
            return False
        try:
            self.daemon.install_parts(manifest_bytes, signature_bytes, model, f"blob {blob[:12]}")
        finally:
            self.downloader.discard(blob)
        return False

    def _configure(self, command: CheckedCommand) -> None:
        applied, refused = {}, {}
        for key, value in command.args.items():
            spec = CONFIG_KEYS.get(key)
            if spec is None or not isinstance(value, (int, float)) or not spec[1] <= float(value) <= spec[2]:
                refused[key] = value
                continue
            applied[key] = spec[0](value)
        self.daemon.apply_settings(applied)
        reason = f"config applied: {applied}" + (f"; refused (unknown or out of range): {refused}" if refused else "")
        self.daemon.emit(Event(ev.CONFIG_APPLIED, reason, {"applied": applied, "refused": refused}))


def _tls(cfg: Any) -> TlsFiles | None:
    _, _, tls = parse_url(cfg.broker.url)
    if not tls:
        return None
    key = systemd_credential("device.key") or cfg.broker.key_file
    return TlsFiles(cfg.broker.ca_file, cfg.broker.cert_file, str(key))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _if_active(value: Any) -> tuple[str, int] | None:
    """A rollback's optional ``if_active: {"name", "version"}``, read strictly: treating a malformed
    condition as "no condition" could roll a device back from a model it should keep."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) \
            or not isinstance(value.get("version"), int) or isinstance(value.get("version"), bool):
        raise ValueError(f"rollback if_active must be {{\"name\": str, \"version\": int}}, got {value!r}")
    return value["name"], value["version"]
