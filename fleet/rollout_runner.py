"""Drives the active rollouts: observe the store, step the machine, save, send signed commands.

Why the order save -> send -> mark sent -> save: the machine decides command ids and the state is
saved with those commands marked *unsent* before anything reaches the broker. A server that dies
in between re-sends the very same command (same id) after its restart; a device that had taken
it refuses the copy as a replay, which the machine ignores. Never two different deploys for one
decision, never a decision lost.

Commands go to each device's own command topic, retained, signed with the operator key by the
same code as ``litefleet push`` (:func:`fleet.push.publish_command`), so an offline device gets
its deploy (or rollback) when it returns, within the command's TTL. A deploy withdrawn by a
breach is cleared from the broker with an empty retained message on that topic.

What the server did not see is not held against the devices: a server that was down (or cut off
from the broker) longer than ``--stale-after`` or ``--install-timeout`` would otherwise find every
device "silent" and every pending install "late" on its first step after coming back, and abort a
healthy rollout. So the runner tells the machine since when it has been listening without a gap
(:meth:`RolloutRunner.watching_since`), and silences and waits are counted from there at the
earliest, while the broker redelivers what the devices said meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent.protocol.commands import make_command
from agent.protocol.topics import Topics
from fleet import push
from fleet.rollout import (D_DEPLOYING, D_INSTALLED, Action, DeviceObs, Observations, RolloutError,
                           RolloutMachine, RolloutSpec, RolloutState, Sample, outcome_from_events)
from fleet.rollout_store import RolloutConflict, RolloutStore

log = logging.getLogger("litefleet.rollout")

DEFAULT_INTERVAL_S = 1.0


def device_obs(doc: dict[str, Any]) -> DeviceObs:
    """A store device row as the machine sees it."""
    model = doc.get("model") or {}
    seen = [t for t in (doc.get("status_ts"), doc.get("telemetry_ts")) if t is not None]
    return DeviceObs(doc["device_id"], doc.get("profile") or "", bool(doc.get("online")), doc.get("last_seen"),
                     model.get("name"), model.get("version"), max(seen) if seen else None)


def sample(row: dict[str, Any]) -> Sample:
    return Sample(float(row["ts"]), row.get("model_version") or "", row.get("p50_ms"), row.get("p95_ms"),
                  row.get("p99_ms"), int(row.get("count") or 0), int(row.get("errors") or 0), row.get("cpu_percent"),
                  row.get("drift"), row.get("feedback_labels"), row.get("feedback_correct"))


def matching_devices(store: Any, target: str) -> list[DeviceObs]:
    """The store's devices addressed by ``target`` (device:ID, group:G, profile:P or all)."""
    parsed = push.parse_target(target)
    return [device_obs(d) for d in store.devices() if push.matches(parsed, d)]


def create_rollout(store: Any, doc: dict[str, Any], *, fleet: str, blob_store: Any = None,
                   now: float | None = None) -> RolloutState:
    """Create a rollout from an API request body (see :mod:`fleet.api_rollouts`)."""
    now = time.time() if now is None else now
    if not isinstance(doc, dict):
        raise RolloutError("the request body must be a JSON object")
    bundles = doc.get("bundles")
    if not isinstance(bundles, dict) or not bundles:
        raise RolloutError("bundles: required, an object {profile: deploy args} (litefleet rollout start fills it)")
    for profile, args in bundles.items():
        if not isinstance(args, dict) or not all(k in args for k in ("blob", "name", "version", "profile")):
            raise RolloutError(f"bundles.{profile}: needs blob, name, version and profile")
        if blob_store is not None:
            stored = blob_store.get(str(args["blob"]))
            if stored is None:
                raise RolloutError(f"bundles.{profile}: blob {args['blob']} is not in the repository "
                                   f"{blob_store.root}; add the bundle first (litefleet repo add, or rollout start "
                                   f"--repo)")
            # the blob id is the manifest's hash, so the stored manifest IS the one named; check that
            # the args describe it (a hand-written request could pair one blob with another's args)
            held = stored.manifest
            said = (args["name"], args["version"], args["profile"], args.get("model_sha256", held.sha256))
            if said != (held.name, held.version, held.profile, held.sha256) or held.profile != profile:
                raise RolloutError(f"bundles.{profile}: blob {str(args['blob'])[:12]} in the repository is "
                                   f"{held.name} v{held.version} for profile {held.profile} (model "
                                   f"{held.sha256[:12]}), not what these deploy args say ({said[0]} v{said[1]} "
                                   f"for profile {said[2]}); use the args `litefleet rollout start` fills in")
    target = str(doc.get("target") or "")
    try:
        push.parse_target(target)
    except ValueError as exc:
        raise RolloutError(f"target: {exc}") from None
    known = {f for f in RolloutSpec.__dataclass_fields__} - {"id", "fleet", "bundles", "target", "created_at"}
    unknown = sorted(set(doc) - known - {"id", "bundles", "target"})
    if unknown:
        raise RolloutError(f"unknown field {unknown[0]!r} (accepted: id, bundles, target, {', '.join(sorted(known))})")
    fields = {k: doc[k] for k in known if k in doc}
    for key in ("soak_s", "install_timeout_s", "stale_after_s", "baseline_window_s", "command_ttl_s"):
        if key in fields and isinstance(fields[key], str):
            try:
                fields[key] = push.parse_duration(fields[key])
            except ValueError as exc:
                raise RolloutError(f"{key}: {exc}") from None
    rollout_id = str(doc.get("id") or f"ro-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{uuid.uuid4().hex[:6]}")
    spec = RolloutSpec(id=rollout_id, fleet=fleet, target=target, bundles=bundles, created_at=now, **fields)
    return RolloutStore(store).create(spec, matching_devices(store, target), now)


class RolloutRunner:
    """Steps every active rollout every ``interval_s`` on a thread (``start``/``stop``), or on ``tick``."""

    def __init__(self, store: Any, link: Any, fleet: str, operator_key: Any, blob_store: Any = None, *,
                 interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.rollouts = RolloutStore(store)
        self.link = link
        self.fleet = fleet
        self.topics = Topics(fleet)
        self.operator_key = operator_key
        self.blob_store = blob_store
        self.interval_s = interval_s
        self.clock = clock
        self.stats = {"ticks": 0, "sent": 0, "send_failures": 0, "conflicts": 0, "errors": 0}
        self.last_error = ""
        self._watching_since: float | None = None
        self._connection: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> "RolloutRunner":
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rollout-runner", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the database away, a bug: keep going, say what is wrong
                self.stats["errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("rollout runner: %s", self.last_error, exc_info=not _is_unavailable(exc))
            self._stop.wait(self.interval_s)

    def create(self, doc: dict[str, Any]) -> RolloutState:
        return create_rollout(self.store, doc, fleet=self.fleet, blob_store=self.blob_store, now=self.clock())

    # one pass ------------------------------------------------------------------------------

    def tick(self) -> None:
        self.stats["ticks"] += 1
        for rollout_id in self.rollouts.active_ids():
            self.step(rollout_id)

    def step(self, rollout_id: str) -> RolloutState:
        state = self.rollouts.load(rollout_id)
        machine = RolloutMachine(state)
        before = state.state
        result = machine.step(self.observe(machine))
        try:
            if result.changed:
                self.rollouts.save(state)
        except RolloutConflict:
            self.stats["conflicts"] += 1       # an operator changed it meanwhile: next tick
            return state
        if state.state != before:
            log.info("rollout %s: %s -> %s: %s", rollout_id, before, state.state, state.reason)
        sent = 0
        for action in result.actions:
            if self._stop.is_set():
                break
            try:
                self.send(state, action)
            except Exception as exc:  # broker away or refusing: the command stays owed
                self.stats["send_failures"] += 1
                self.last_error = f"cannot send {action.kind} to {action.device_id}: {exc}"
                log.warning("rollout %s: %s", rollout_id, self.last_error)
                break
            machine.mark_sent(action)
            sent += 1
        if sent:
            try:
                self.rollouts.save(state)
            except RolloutConflict:            # re-sent next tick; the device ignores the replay
                self.stats["conflicts"] += 1
        return state

    def watching_since(self) -> float:
        """Since when this runner has been connected without a gap: its first look, or the broker's last
        CONNACK after that. While it is cut off: now (nothing counts as late while the server is deaf)."""
        now = self.clock()
        if not getattr(self.link, "connected", True):
            self._watching_since = None
            return now
        connection = getattr(self.link, "connect_info", None)    # a new object on every CONNACK
        if self._watching_since is None or connection is not self._connection:
            self._watching_since, self._connection = now, connection
        return self._watching_since

    def observe(self, machine: RolloutMachine) -> Observations:
        state = machine.state
        now = self.clock()
        watching_since = self.watching_since()
        ours = set(state.devices)
        devices = {d.device_id: d for d in map(device_obs, self.store.devices()) if d.device_id in ours}
        outcomes = {}
        for command_id, action in machine.commands_of_interest().items():
            events = self.store.events(command_id=command_id, limit=50)
            outcome = outcome_from_events(events, action)
            if outcome is not None:
                outcomes[command_id] = outcome
        wanted = set(machine.devices_of_interest())
        wanted |= {d for d, r in state.devices.items()
                   if r.state in (D_DEPLOYING, D_INSTALLED) and r.stage == state.stage}
        window = state.spec.baseline_window_s
        if state.stage_started_at is not None:
            window = max(window, now - state.stage_started_at + 60)
        telemetry = {d: [sample(r) for r in self.store.telemetry(d, since=now - window, until=now + 60,
                                                                   resolution="raw")]
                     for d in sorted(wanted)}
        return Observations(now, devices, outcomes, telemetry, watching_since=watching_since)

    # commands ------------------------------------------------------------------------------

    def send(self, state: RolloutState, action: Action) -> None:
        target = push.Target("device", action.device_id)
        ttl = state.spec.command_ttl_s
        if action.kind == "cancel":
            topic = push.command_topic(self.topics, target)
            token = self.link.publish(topic, b"", qos=1, retain=True)
            if not token.wait(15.0) or token.refused:
                raise push.PushError(f"clearing the retained deploy on {topic} was not acknowledged")
            return
        command = make_command(action.kind, action.args, fleet=self.fleet, scope="device", name=action.device_id,
                               operator_key=self.operator_key, seq=push.next_seq(), ttl_s=ttl, now=self.clock(),
                               command_id=action.command_id)
        push.publish_command(self.link, self.topics, target, command, ttl_s=ttl)
        self.stats["sent"] += 1
        log.info("rollout %s: sent %s to %s (command %s)", state.id, action.kind, action.device_id, action.command_id)


def _is_unavailable(exc: BaseException) -> bool:
    return any(c.__name__ == "StoreUnavailableError" for c in type(exc).__mro__)


__all__ = ["RolloutRunner", "create_rollout", "matching_devices", "device_obs", "sample"]
