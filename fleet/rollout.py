"""Staged rollouts that stop themselves: the pure decisions, no I/O, time passed in.

Why pure: a rollout runs for hours across server restarts; every decision it takes (which
devices form a stage, when a stage is healthy, when to stop and roll back) is a function of its
persisted state and what the fleet reported, so it is tested with made-up clocks and telemetry.
:mod:`fleet.rollout_runner` gathers observations from the store, calls :meth:`RolloutMachine.step`,
saves the state (:mod:`fleet.rollout_store`) and sends the commands it returns.

A rollout moves ``pending -> deploying (stage N) -> soaking (stage N) -> deploying (N+1) ... ->
completed``. A breach (install failures over ``max_failures`` of the stage's devices, the health
rule violated by the stage's updated devices, updated devices that stopped reporting) rolls back
every device the rollout updated (``rolling_back``) and ends ``paused`` or ``aborted`` as
``on_breach`` says. An operator's ``pause`` freezes the rollout without touching devices;
``abort`` rolls back like a breach; ``resume`` of a paused rollout re-runs its current stage.

Command ids are chosen here and persisted *before* the runner publishes (``unsent`` marks a
command the runner still owes the broker), so a server that crashed between the two re-sends
the same command instead of issuing a second one the device would refuse as not newer.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.protocol.errors import LitefleetError

# rollout states
PENDING, DEPLOYING, SOAKING, PAUSED, ROLLING_BACK, ABORTED, COMPLETED = (
    "pending", "deploying", "soaking", "paused", "rolling_back", "aborted", "completed")
ACTIVE_STATES = (PENDING, DEPLOYING, SOAKING, ROLLING_BACK)
# a paused rollout still owns its devices: no other rollout may take them
OWNING_STATES = ACTIVE_STATES + (PAUSED,)
FINAL_STATES = (ABORTED, COMPLETED)

# device states
D_WAITING = "waiting"            # in the target, not yet part of a stage
D_DEPLOYING = "deploying"        # deploy command sent (or owed), no final answer yet
D_INSTALLED = "installed"
D_FAILED = "failed"              # refused, failed, or no answer in time
D_ROLLING_BACK = "rolling_back"
D_ROLLED_BACK = "rolled_back"
D_ROLLBACK_FAILED = "rollback_failed"
D_EXCLUDED = "excluded"
D_CANCELLED = "cancelled"        # its deploy was withdrawn before it answered

ON_BREACH = ("pause", "abort")


class RolloutError(LitefleetError, ValueError):
    """A rollout specification (stages, health rule, bound) or an operator request is invalid."""


# --- stages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One step: ``count`` devices, or ``percent`` of the target set (cumulative)."""

    count: int | None = None
    percent: float | None = None

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent:g}%"

    def resolve(self, total: int) -> int:
        """Cumulative number of devices updated by the end of this stage, out of ``total``."""
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, max(1, math.ceil(self.percent * total / 100 - 1e-9))) if total else 0


def parse_stages(text: str) -> list[Stage]:
    """``1,10%,50%,100%``: absolute counts or percentages of the target set, growing, ending at 100%."""
    items = [item.strip() for item in str(text).split(",")]
    if not items or items == [""]:
        raise RolloutError("--stages is empty; give e.g. 1,10%,50%,100%")
    stages: list[Stage] = []
    for i, item in enumerate(items, 1):
        where = f"--stages {text!r}: stage {i} ({item!r})"
        if item.endswith("%"):
            try:
                pct = float(item[:-1])
            except ValueError:
                raise RolloutError(f"{where}: not a percentage like 10%") from None
            if not 0 < pct <= 100 or not math.isfinite(pct):
                raise RolloutError(f"{where}: a percentage must be over 0% and at most 100%")
            if stages and stages[-1].percent is not None and pct <= stages[-1].percent:
                raise RolloutError(f"{where}: stages must grow; {pct:g}% does not exceed {stages[-1]}")
            stages.append(Stage(percent=pct))
        else:
            if not re.fullmatch(r"\d+", item):
                raise RolloutError(f"{where}: not a device count (like 1) or a percentage (like 10%)")
            count = int(item)
            if count < 1:
                raise RolloutError(f"{where}: a stage needs at least 1 device")
            if stages and stages[-1].percent is not None:
                raise RolloutError(f"{where}: an absolute count cannot follow a percentage; write counts first")
            if stages and stages[-1].count is not None and count <= stages[-1].count:
                raise RolloutError(f"{where}: stages must grow; {count} does not exceed {stages[-1]}")
            stages.append(Stage(count=count))
    if stages[-1].percent != 100:
        raise RolloutError(f"--stages {text!r}: the last stage must be 100% so that every target device is updated")
    return stages


def resolve_stages(stages: list[Stage], total: int) -> list[int]:
    """Cumulative device counts per stage for ``total`` devices; stages that add nobody are dropped."""
    out: list[int] = []
    for stage in stages:
        n = stage.resolve(total)
        if n > (out[-1] if out else 0):
            out.append(n)
    return out


# --- failure bound ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureBound:
    """``5%`` (fraction of the stage's devices) or ``2`` (devices). Breach when failures exceed it."""

    fraction: float | None = None
    count: int | None = None

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else str(self.count)

    def exceeded(self, failures: int, total: int) -> bool:
        if failures <= 0:
            return False
        if self.count is not None:
            return failures > self.count
        assert self.fraction is not None
        return total > 0 and failures / total > self.fraction + 1e-12


def parse_failure_bound(text: str) -> FailureBound:
    text = str(text).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return FailureBound(fraction=pct / 100)
        count = int(text)
        if count < 0:
            raise ValueError
        return FailureBound(count=count)
    except ValueError:
        raise RolloutError(f"--max-failures {text!r}: give a percentage of the stage's devices (5%) or a "
                           f"number of devices (2)") from None


# --- health rule -------------------------------------------------------------------------------

METRICS = {
    "p50_latency_ms": "p50", "p95_latency_ms": "p95", "p99_latency_ms": "p99",
    "error_rate": "error_rate", "cpu_percent": "cpu",
    # model quality in the field (docs/quality.md): the devices' drift score (PSI) and the accuracy
    # of the labels their applications sent back, as a fraction (95% = 0.95)
    "drift": "drift", "field_accuracy": "field_accuracy",
}
FRACTIONS = ("error_rate", "field_accuracy")   # written as 0.01 or 1%; an offset in % is points
FIELD_MIN_LABELS = 20                           # fewer labels than this: field accuracy is not judged
OPS = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, ">": lambda a, b: a > b}
_CLAUSE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*(.+?)\s*$")
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"


@dataclass(frozen=True)
class Clause:
    """``metric op bound`` where bound is ``value`` (absolute) or ``factor * baseline``."""

    metric: str
    op: str
    value: float | None = None
    factor: float | None = None
    text: str = ""
    offset: float = 0.0          # baseline-1% / baseline+0.02: added to factor * baseline

    def bound(self, baseline: float | None) -> float | None:
        if self.factor is None:
            return self.value
        return None if baseline is None else self.factor * baseline + self.offset

    def holds(self, observed: float, baseline: float | None) -> bool | None:
        """True/False, or None when the bound needs a baseline that is unknown."""
        bound = self.bound(baseline)
        return None if bound is None else OPS[self.op](observed, bound)


@dataclass(frozen=True)
class HealthRule:
    clauses: tuple[Clause, ...] = ()
    text: str = ""

    def __str__(self) -> str:
        return self.text


def _parse_bound(metric: str, raw: str, clause: str) -> tuple[float | None, float | None, float]:
    raw = raw.replace(" ", "")
    pct = metric in FRACTIONS or metric == "cpu_percent"
    m = re.fullmatch(rf"(?:({_NUMBER})\*)?baseline(?:\*({_NUMBER}))?(?:([+-])({_NUMBER})(%?))?", raw)
    if m:
        if m.group(1) and m.group(2):
            raise RolloutError(f"health clause {clause!r}: write the factor once, e.g. 1.2*baseline")
        offset = 0.0
        if m.group(3):
            offset = float(m.group(4)) * (1 if m.group(3) == "+" else -1)
            if m.group(5):
                if metric not in FRACTIONS:
                    raise RolloutError(f"health clause {clause!r}: an offset in % is only for "
                                       f"{' and '.join(FRACTIONS)} (percentage points)")
                offset /= 100
        return None, float(m.group(1) or m.group(2) or 1.0), offset
    m = re.fullmatch(rf"({_NUMBER})(%?)", raw)
    if m:
        value = float(m.group(1))
        if m.group(2):
            if metric in FRACTIONS:
                value /= 100
            elif not pct:
                raise RolloutError(f"health clause {clause!r}: {metric} is not a rate; '%' is only for error_rate, "
                                   f"field_accuracy and cpu_percent")
        if metric in FRACTIONS and value > 1:
            raise RolloutError(f"health clause {clause!r}: {metric} is a fraction (0.01) or a percentage (1%), "
                               f"at most 1 (100%)")
        return value, None, 0.0
    raise RolloutError(f"health clause {clause!r}: the bound {raw!r} must be a number (50), a percentage (1%), "
                       f"a multiple of the baseline (1.2*baseline) or the baseline plus or minus an offset "
                       f"(baseline-1%)")


def parse_health(text: str) -> HealthRule:
    """``p95_latency_ms<=1.2*baseline,error_rate<1%`` (also absolute: ``p95_latency_ms<=50``).

    Metrics: p50/p95/p99_latency_ms, error_rate, cpu_percent, drift, field_accuracy (e.g.
    ``drift<0.2,field_accuracy>=baseline-1%``). An empty text means no health rule.
    """
    text = (text or "").strip()
    if not text:
        return HealthRule((), "")
    clauses = []
    for part in text.split(","):
        if not part.strip():
            raise RolloutError(f"--health {text!r}: empty clause (two commas, or a trailing comma)")
        m = _CLAUSE.match(part)
        if not m:
            raise RolloutError(f"health clause {part.strip()!r}: expected METRIC OP BOUND, e.g. "
                               f"p95_latency_ms<=1.2*baseline (OP is <, <=, > or >=)")
        metric, op, raw = m.groups()
        if metric not in METRICS:
            raise RolloutError(f"health clause {part.strip()!r}: unknown metric {metric!r}; use one of "
                               f"{', '.join(METRICS)}")
        value, factor, offset = _parse_bound(metric, raw, part.strip())
        clauses.append(Clause(metric, op, value, factor, part.strip(), offset))
    return HealthRule(tuple(clauses), text)


# --- observations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceObs:
    """What the store knows about one device now."""

    device_id: str
    profile: str
    online: bool
    last_seen: float | None = None
    model_name: str | None = None
    model_version: int | None = None
    model_ts: float | None = None     # when the store learnt the device's current model


@dataclass(frozen=True)
class Outcome:
    """The final answer of a device to one command: ``kind`` is the event kind."""

    kind: str
    ts: float
    reason: str = ""
    code: str = ""


@dataclass(frozen=True)
class Sample:
    """One telemetry interval of one device."""

    ts: float
    model_version: str = ""
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    count: int = 0
    errors: int = 0
    cpu: float | None = None
    drift: float | None = None         # the device's drift score (PSI) for this interval's model
    fb_labels: int | None = None       # cumulative feedback labels for this interval's model version
    fb_correct: int | None = None      # ... of which the prediction was right


@dataclass
class Observations:
    now: float
    devices: dict[str, DeviceObs] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)          # command id -> final answer
    telemetry: dict[str, list[Sample]] = field(default_factory=dict)    # device id -> samples
    busy: dict[str, str] = field(default_factory=dict)                  # device id -> other active rollout id
    # Since when the observer (the server) has been listening without a gap. Silence and missing
    # answers from before it are the server's own blindness (down, restarted, cut off from the
    # broker), not the devices': timeouts and "stopped reporting" count from here at the earliest.
    watching_since: float | None = None

    def elapsed(self, since: float) -> float:
        """Seconds the observer has waited for something that started at ``since``."""
        return self.now - max(since, self.watching_since if self.watching_since is not None else since)


DEPLOY_OK = ("installed",)
DEPLOY_BAD = ("install_failed", "deploy_rejected")
ROLLBACK_OK = ("rolled_back", "rollback_skipped")   # skipped: the device no longer ran it
IGNORED_CODES = ("replayed",)    # our own re-send of a command the device had already taken


def outcome_from_events(events: list[dict[str, Any]], action: str) -> Outcome | None:
    """The final answer among one command's events (oldest first), or None while it is still running."""
    ok = DEPLOY_OK if action == "deploy" else ROLLBACK_OK
    for event in sorted(events, key=lambda e: (e.get("ts") or 0, e.get("seq") or 0)):
        kind = event.get("kind", "")
        details = event.get("details") or {}
        code = str(details.get("code", "")) if isinstance(details, dict) else ""
        if code in IGNORED_CODES:
            continue
        if kind in ok or kind in DEPLOY_BAD:
            return Outcome(kind, float(event.get("ts") or 0.0), str(event.get("reason", "")), code)
    return None


# --- persisted state -------------------------------------------------------------------------------


@dataclass
class RolloutSpec:
    """What the operator asked for; fixed at creation."""

    id: str
    fleet: str
    target: str
    bundles: dict[str, dict[str, Any]]     # profile -> deploy args (blob, name, version, profile, model_sha256)
    stages: str = "1,10%,50%,100%"
    soak_s: float = 600.0
    max_failures: str = "5%"
    health: str = ""
    on_breach: str = "abort"
    install_timeout_s: float = 900.0       # a device that answers a command later than this counts as failed
    stale_after_s: float = 120.0           # an updated device silent this long "stopped reporting"
    min_samples: int = 3                   # telemetry samples of the stage before the health rule is judged
    baseline_window_s: float = 600.0       # telemetry before a device's update that forms its baseline
    command_ttl_s: float = 3600.0
    created_at: float = 0.0

    def check(self) -> None:
        """Raise RolloutError naming the first invalid field."""
        parse_stages(self.stages)
        parse_failure_bound(self.max_failures)
        parse_health(self.health)
        if self.on_breach not in ON_BREACH:
            raise RolloutError(f"--on-breach {self.on_breach!r}: use pause or abort")
        if not self.bundles:
            raise RolloutError("a rollout needs at least one bundle")
        names = {(b.get("name")) for b in self.bundles.values()}
        if len(names) > 1:
            raise RolloutError(f"one rollout carries one model; the bundles name {sorted(map(str, names))}")
        for profile, args in self.bundles.items():
            if args.get("profile") != profile:
                raise RolloutError(f"bundle for profile {profile!r} says profile {args.get('profile')!r}")
        for name in ("soak_s", "install_timeout_s", "stale_after_s", "baseline_window_s", "command_ttl_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise RolloutError(f"{name} must be a non-negative number of seconds, got {value!r}")
        if self.min_samples < 1:
            raise RolloutError("min_samples must be at least 1")

    @property
    def model(self) -> str:
        return str(next(iter(self.bundles.values())).get("name", ""))


@dataclass
class DeviceRecord:
    device_id: str
    profile: str
    order: str                        # stable position: sha256(rollout id + device id)
    state: str = D_WAITING
    stage: int | None = None          # 0-based stage that updated it
    reason: str = ""
    command_id: str = ""              # current deploy command
    deployed_at: float | None = None
    installed_at: float | None = None
    rollback_command_id: str = ""
    rollback_at: float | None = None
    unsent: str = ""                  # "deploy" | "rollback" | "cancel": a command the runner still owes
    attempts: int = 0
    baseline: list[dict[str, Any]] = field(default_factory=list)   # pre-update samples (compact dicts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "DeviceRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in doc.items() if k in known})


@dataclass
class RolloutState:
    spec: RolloutSpec
    state: str = PENDING
    stage: int = 0                    # index into the resolved stages
    stage_counts: list[int] = field(default_factory=list)
    stage_started_at: float | None = None
    soak_started_at: float | None = None
    reason: str = ""
    updated_at: float = 0.0
    breach: str = ""                  # what stopped it, if anything
    then: str = ""                    # while rolling back: the state it ends in (paused | aborted)
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    revision: int = 0                 # bumped by every save: concurrent writers detect each other
    health: dict[str, Any] = field(default_factory=dict)   # the last soak's verdict: figures vs baseline

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def owned_devices(self) -> list[str]:
        """Devices this rollout holds (no other rollout may take them while it is not final)."""
        if self.state in FINAL_STATES:
            return []
        return sorted(d for d, r in self.devices.items() if r.state != D_EXCLUDED)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for record in self.devices.values():
            counts[record.state] = counts.get(record.state, 0) + 1
        return {"id": self.id, "state": self.state, "stage": self.stage + 1 if self.stage_counts else 0,
                "stages": len(self.stage_counts), "stage_target": (self.stage_counts[self.stage]
                                                                   if self.stage_counts else 0),
                "target_devices": sum(1 for r in self.devices.values() if r.state != D_EXCLUDED),
                "model": self.spec.model, "versions": {p: b.get("version") for p, b in self.spec.bundles.items()},
                "target": self.spec.target, "reason": self.reason, "breach": self.breach,
                "created_at": self.spec.created_at, "updated_at": self.updated_at, "devices_by_state": counts,
                "health": self.health}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "spec": asdict(self.spec), "stage_counts": self.stage_counts, "then": self.then,
                "revision": self.revision,
                "stage_index": self.stage, "stage_started_at": self.stage_started_at,
                "soak_started_at": self.soak_started_at,
                "devices": [r.to_dict() for r in sorted(self.devices.values(), key=lambda r: r.order)],
                "history": self.history}


def model_label(args: dict[str, Any]) -> str:
    """How telemetry names a model version (``digits v2``), as the store labels it."""
    return f"{args.get('name')} v{args.get('version')}"


def state_from_dict(doc: dict[str, Any]) -> RolloutState:
    """The inverse of :meth:`RolloutState.to_dict`."""
    return RolloutState(RolloutSpec(**doc["spec"]), state=doc["state"], stage=doc["stage_index"],
                        stage_counts=list(doc["stage_counts"]), stage_started_at=doc.get("stage_started_at"),
                        soak_started_at=doc.get("soak_started_at"), reason=doc.get("reason", ""),
                        updated_at=doc.get("updated_at", 0.0), breach=doc.get("breach", ""), then=doc.get("then", ""),
                        devices={d["device_id"]: DeviceRecord.from_dict(d) for d in doc.get("devices", [])},
                        history=list(doc.get("history", [])), revision=int(doc.get("revision", 0)),
                        health=dict(doc.get("health") or {}))


def order_key(rollout_id: str, device_id: str) -> str:
    return hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).hexdigest()


def command_id_for(rollout_id: str, device_id: str, action: str, attempt: int) -> str:
    """Deterministic, unique per (rollout, device, action, attempt): 32 hex digits like make_command's."""
    return hashlib.sha256(f"{rollout_id}\0{device_id}\0{action}\0{attempt}".encode()).hexdigest()[:32]


def plan(spec: RolloutSpec, targets: list[DeviceObs], busy: dict[str, str], now: float) -> RolloutState:
    """A new rollout's state: the target set frozen, in stable order, with exclusions and reasons."""
    spec.check()
    spec.created_at = spec.created_at or now
    state = RolloutState(spec, updated_at=now)
    for obs in targets:
        record = DeviceRecord(obs.device_id, obs.profile, order_key(spec.id, obs.device_id))
        if obs.device_id in busy:
            record.state, record.reason = D_EXCLUDED, f"already in active rollout {busy[obs.device_id]}"
        elif obs.profile not in spec.bundles:
            record.state, record.reason = D_EXCLUDED, (f"no bundle for its profile {obs.profile!r} (bundles for "
                                                       f"{', '.join(sorted(spec.bundles))})")
        state.devices[obs.device_id] = record
    eligible = sum(1 for r in state.devices.values() if r.state != D_EXCLUDED)
    state.stage_counts = resolve_stages(parse_stages(spec.stages), eligible)
    excluded = len(state.devices) - eligible
    if eligible == 0:
        state.state = ABORTED
        state.reason = (f"no device to update: {len(targets)} device(s) match {spec.target}"
                        + (f", all {excluded} excluded" if excluded else ""))
    else:
        state.reason = (f"planned: {eligible} device(s) in {len(state.stage_counts)} stage(s) "
                        f"{state.stage_counts}" + (f"; {excluded} excluded" if excluded else ""))
    state.history.append({"ts": now, "state": state.state, "reason": state.reason})
    return state


# --- actions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """``deploy`` / ``rollback`` / ``cancel`` (clear a deploy not yet taken) for one device."""

    kind: str
    device_id: str
    command_id: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


@dataclass
class StepResult:
    actions: list[Action]
    changed: bool
    reason: str


# --- health evaluation ------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled figures of samples: medians of the latency percentiles and cpu, the summed error rate."""
    out: dict[str, Any] = {"samples": 0}
    with_traffic = [s for s in samples if (s.get("count") or 0) > 0]
    out["samples"] = len(with_traffic)
    for key in ("p50", "p95", "p99"):
        out[key] = _median([float(s[key]) for s in with_traffic if s.get(key) is not None])
    out["cpu"] = _median([float(s["cpu"]) for s in samples if s.get("cpu") is not None])
    total = sum(int(s.get("count") or 0) for s in samples)
    out["requests"] = total
    out["error_rate"] = (sum(int(s.get("errors") or 0) for s in samples) / total) if total else None
    out["drift"] = _median([float(s["drift"]) for s in samples if s.get("drift") is not None])
    # Feedback counts are cumulative per device and model version: the latest sample of each device counts.
    latest: dict[Any, tuple[int, int]] = {}
    for s in samples:
        if s.get("fb_labels") is not None and s.get("fb_correct") is not None:
            latest[s.get("device")] = (int(s["fb_labels"]), int(s["fb_correct"]))
    labels = sum(n for n, _ in latest.values())
    out["field_labels"] = labels
    out["field_accuracy"] = (sum(c for _, c in latest.values()) / labels) if labels >= FIELD_MIN_LABELS else None
    return out


def _compact(sample: Sample, device: str | None = None) -> dict[str, Any]:
    doc = {"p50": sample.p50, "p95": sample.p95, "p99": sample.p99, "count": sample.count,
           "errors": sample.errors, "cpu": sample.cpu}
    if sample.drift is not None or sample.fb_labels is not None:
        doc.update(drift=sample.drift, fb_labels=sample.fb_labels, fb_correct=sample.fb_correct, device=device)
    return doc


@dataclass(frozen=True)
class HealthVerdict:
    judged: bool              # enough samples to judge every clause that could be judged
    violations: tuple[str, ...]
    notes: tuple[str, ...]
    post: dict[str, Any]
    baseline: dict[str, Any]


def evaluate_health(rule: HealthRule, post: list[dict[str, Any]], baseline: list[dict[str, Any]],
                    min_samples: int) -> HealthVerdict:
    """Judge ``rule`` on pooled post-update samples against pooled baseline samples."""
    p, b = _figures(post), _figures(baseline)
    if not rule.clauses:
        return HealthVerdict(True, (), ("no health rule",), p, b)
    if p["samples"] < min_samples:
        return HealthVerdict(False, (), (f"{p['samples']} telemetry sample(s) with traffic, fewer than "
                                         f"{min_samples}: health not judged yet",), p, b)
    violations, notes = [], []
    for clause in rule.clauses:
        key = METRICS[clause.metric]
        observed, base = p.get(key), b.get(key)
        if observed is None:
            if key == "field_accuracy" and p.get("field_labels"):
                notes.append(f"{clause.text}: {p['field_labels']} feedback label(s), fewer than {FIELD_MIN_LABELS}: "
                             f"not judged yet")
            else:
                notes.append(f"{clause.text}: no {clause.metric} reported")
            continue
        ok = clause.holds(observed, base)
        fmt = ((lambda v: f"{v:.2%}") if key in FRACTIONS else (lambda v: f"{v:.3f}") if key == "drift"
               else (lambda v: f"{v:.1f}"))
        if ok is None:
            notes.append(f"{clause.text}: no baseline {clause.metric} (too little telemetry before the update)")
            continue
        bound = clause.bound(base)
        assert bound is not None
        shift = (f" {'+' if clause.offset > 0 else '-'} {fmt(abs(clause.offset))}" if clause.offset else "")
        where = (f"{clause.factor:g} x baseline {fmt(base)}{shift} = {fmt(bound)}" if clause.factor is not None
                 else fmt(bound))
        text = f"{clause.metric} {fmt(observed)} (over {p['samples']} samples) {clause.op} {where}"
        if ok:
            notes.append(text)
        else:
            violations.append(f"{clause.metric} {fmt(observed)} (over {p['samples']} samples) violates "
                              f"{clause.op} {where}")
    return HealthVerdict(True, tuple(violations), tuple(notes), p, b)


# --- the machine -------------------------------------------------------------------------------------


class RolloutMachine:
    """Steps one rollout. ``state`` is mutated in place; ``step`` returns the commands to send."""

    def __init__(self, state: RolloutState) -> None:
        self.state = state
        spec = state.spec
        self.spec = spec
        self.bound = parse_failure_bound(spec.max_failures)
        self.rule = parse_health(spec.health)
        self._changed = False

    # operator requests ----------------------------------------------------------------

    def pause(self, now: float, reason: str = "paused by the operator") -> None:
        s = self.state
        if s.state not in (PENDING, DEPLOYING, SOAKING):
            raise RolloutError(f"rollout {s.id} is {s.state}; only a pending, deploying or soaking rollout "
                               f"can be paused")
        self._set(PAUSED, reason, now)

    def resume(self, now: float) -> None:
        s = self.state
        if s.state != PAUSED:
            raise RolloutError(f"rollout {s.id} is {s.state}; only a paused rollout can be resumed")
        s.breach = ""
        s.soak_started_at = None
        for r in s.devices.values():      # redeploy what the breach undid; they count in this stage
            if r.stage is not None and r.state in (D_FAILED, D_ROLLED_BACK, D_CANCELLED):
                r.state, r.stage, r.reason = D_WAITING, None, ""
        self._set(DEPLOYING, f"resumed by the operator at stage {s.stage + 1}", now)
        s.stage_started_at = now

    def abort(self, now: float, reason: str = "aborted by the operator") -> None:
        s = self.state
        if s.state in FINAL_STATES:
            raise RolloutError(f"rollout {s.id} is already {s.state}")
        self._roll_back_all(now, reason, final=ABORTED)

    # the step -----------------------------------------------------------------------------

    def step(self, obs: Observations) -> StepResult:
        """Advance as far as the observations allow; return the commands owed to devices."""
        self._changed = False
        now = obs.now
        s = self.state
        self._absorb_outcomes(obs)
        if s.state == PENDING:
            s.stage, s.stage_started_at = 0, now
            self._set(DEPLOYING, f"stage 1 of {len(s.stage_counts)}: deploying to {s.stage_counts[0]} device(s)", now)
        if s.state == DEPLOYING:
            self._deploying(obs)
        if s.state == SOAKING:
            self._soaking(obs)
        if s.state == ROLLING_BACK:
            self._rolling_back(obs)
        if self._changed:
            s.updated_at = now
        return StepResult(self.owed(), self._changed, s.reason)

    def owed(self) -> list[Action]:
        """Commands decided but not yet acknowledged as sent (re-sent after a crash)."""
        out = []
        for r in sorted(self.state.devices.values(), key=lambda r: r.order):
            if r.unsent == "deploy":
                out.append(Action("deploy", r.device_id, r.command_id, dict(self.spec.bundles[r.profile]),
                                  f"rollout {self.state.id} stage {(r.stage or 0) + 1}"))
            elif r.unsent == "rollback":
                bundle = self.spec.bundles[r.profile]
                out.append(Action("rollback", r.device_id, r.rollback_command_id,
                                  {"reason": r.reason or f"rollout {self.state.id} rolled back",
                                   "if_active": {"name": bundle.get("name"), "version": bundle.get("version")}},
                                  r.reason))
            elif r.unsent == "cancel":
                out.append(Action("cancel", r.device_id, r.command_id, {}, r.reason))
        return out

    def mark_sent(self, action: Action) -> None:
        record = self.state.devices[action.device_id]
        if record.unsent == action.kind:
            record.unsent = ""

    # states ---------------------------------------------------------------------------------

    def _stage_records(self, stage: int | None = None) -> list[DeviceRecord]:
        stage = self.state.stage if stage is None else stage
        return [r for r in self.state.devices.values() if r.stage == stage and r.state != D_EXCLUDED]

    def _deploying(self, obs: Observations) -> None:
        s, now = self.state, obs.now
        eligible = sorted((r for r in s.devices.values() if r.state != D_EXCLUDED), key=lambda r: r.order)
        wanted = eligible[:s.stage_counts[s.stage]]
        for record in wanted:
            if record.stage is None:
                record.stage = s.stage
            if record.state == D_WAITING:
                self._deploy(record, obs)
        stage = self._stage_records()
        self._check_timeouts(stage, obs)
        failed = [r for r in stage if r.state == D_FAILED]
        if self.bound.exceeded(len(failed), len(stage)):
            self._breach(self._failure_text(failed, stage), now)
            return
        if all(r.state in (D_INSTALLED, D_FAILED) for r in stage):
            s.soak_started_at = now
            installed = sum(r.state == D_INSTALLED for r in stage)
            self._set(SOAKING, f"stage {s.stage + 1}: {installed} of {len(stage)} device(s) installed"
                               + (f", {len(failed)} failed (within --max-failures {self.bound})" if failed else "")
                               + f"; soaking for {self.spec.soak_s:g} s", now)

    def _deploy(self, record: DeviceRecord, obs: Observations) -> None:
        record.attempts += 1
        record.command_id = command_id_for(self.state.id, record.device_id, "deploy", record.attempts)
        record.state, record.unsent = D_DEPLOYING, "deploy"
        record.deployed_at, record.installed_at, record.reason = obs.now, None, ""
        record.rollback_command_id, record.rollback_at = "", None
        start = obs.now - self.spec.baseline_window_s
        target = model_label(self.spec.bundles[record.profile])
        record.baseline = [_compact(x, record.device_id) for x in obs.telemetry.get(record.device_id, [])
                           if start <= x.ts < obs.now and x.model_version != target][-60:]
        self._changed = True

    def _check_timeouts(self, records: list[DeviceRecord], obs: Observations) -> None:
        for r in records:
            if r.state == D_DEPLOYING and r.deployed_at is not None \
                    and obs.elapsed(r.deployed_at) > self.spec.install_timeout_s:
                r.state = D_FAILED
                r.reason = f"no answer to the deploy within {self.spec.install_timeout_s:g} s"
                self._changed = True

    def _failure_text(self, failed: list[DeviceRecord], stage: list[DeviceRecord]) -> str:
        listed = "; ".join(f"{r.device_id}: {r.reason}" for r in failed[:5])
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        return (f"stage {self.state.stage + 1}: {len(failed)} of {len(stage)} device(s) failed, over "
                f"--max-failures {self.bound} ({listed}{more})")

    def _soaking(self, obs: Observations) -> None:
        s, now = self.state, obs.now
        stage = self._stage_records()
        updated = [r for r in stage if r.state == D_INSTALLED]
        failed = [r for r in stage if r.state == D_FAILED]
        # devices that stopped reporting, or went back to another model on their own
        for r in updated:
            seen = obs.devices.get(r.device_id)
            target = self.spec.bundles[r.profile].get("version")
            problem = ""
            if seen is None or not seen.online:
                problem = "went offline during the soak"
            elif seen.last_seen is not None and obs.elapsed(seen.last_seen) > self.spec.stale_after_s:
                problem = f"stopped reporting ({obs.elapsed(seen.last_seen):.0f} s silent)"
            elif seen.model_version is not None and seen.model_version != target and (
                    (seen.model_ts is not None and r.installed_at is not None and seen.model_ts > r.installed_at)
                    or obs.elapsed(r.installed_at or now) > self.spec.stale_after_s):
                problem = f"now runs v{seen.model_version}, not v{target} (rolled back on the device?)"
            if problem:
                r.state, r.reason = D_FAILED, problem
                failed.append(r)
                self._changed = True
        if self.bound.exceeded(len(failed), len(stage)):
            self._breach(self._failure_text(failed, stage), now)
            return
        verdict = self._health(obs, [r for r in stage if r.state == D_INSTALLED])
        self._record_health(verdict)
        if verdict.violations:
            self._breach(f"stage {s.stage + 1}: health rule {self.rule} violated: " + "; ".join(verdict.violations),
                         now)
            return
        if s.soak_started_at is None:
            s.soak_started_at = now
        if now - s.soak_started_at < self.spec.soak_s:
            return
        if obs.watching_since is not None and any(
                (seen := obs.devices.get(r.device_id)) is not None and seen.last_seen is not None
                and seen.last_seen < obs.watching_since for r in stage if r.state == D_INSTALLED):
            return      # back after a gap: end the soak once every updated device was heard since
        health = "; ".join(verdict.notes)
        if s.stage + 1 >= len(s.stage_counts):
            done = sum(1 for r in s.devices.values() if r.state == D_INSTALLED)
            self._set(COMPLETED, f"completed: {done} device(s) updated; last stage healthy ({health})", now)
            return
        s.stage += 1
        s.stage_started_at, s.soak_started_at = now, None
        self._set(DEPLOYING, f"stage {s.stage} healthy after {self.spec.soak_s:g} s soak ({health}); stage "
                             f"{s.stage + 1} of {len(s.stage_counts)}: deploying to {s.stage_counts[s.stage]} "
                             f"device(s) in all", now)
        self._deploying(obs)

    def _health(self, obs: Observations, updated: list[DeviceRecord]) -> HealthVerdict:
        post: list[dict[str, Any]] = []
        baseline: list[dict[str, Any]] = []
        for r in updated:
            target = model_label(self.spec.bundles[r.profile])
            since = r.installed_at if r.installed_at is not None else (r.deployed_at or 0.0)
            post += [_compact(x, r.device_id) for x in obs.telemetry.get(r.device_id, [])
                     if x.ts >= since and x.model_version == target]
            baseline += r.baseline
        return evaluate_health(self.rule, post, baseline, self.spec.min_samples)

    def _record_health(self, verdict: HealthVerdict) -> None:
        """Keep the stage's verdict (pooled figures of its updated devices vs their baseline) for status views."""
        health = {"stage": self.state.stage + 1, "rule": self.rule.text, "judged": verdict.judged,
                  "post": verdict.post, "baseline": verdict.baseline, "notes": list(verdict.notes),
                  "violations": list(verdict.violations)}
        if health != self.state.health:
            self.state.health = health
            self._changed = True

    def _breach(self, text: str, now: float) -> None:
        self.state.breach = text
        final = PAUSED if self.spec.on_breach == "pause" else ABORTED
        self._roll_back_all(now, f"breach: {text}", final=final)

    def _roll_back_all(self, now: float, reason: str, *, final: str) -> None:
        s = self.state
        for r in s.devices.values():
            # A device that installed and then failed (went silent, offline, or back on its own)
            # may still run the new model: it is asked too, on the condition that it does.
            if r.state == D_INSTALLED or (r.state == D_FAILED and r.installed_at is not None):
                self._rollback(r, reason, now)
            elif r.state == D_DEPLOYING:
                if r.unsent == "deploy":       # never published: nothing to withdraw
                    r.state, r.unsent, r.reason = D_CANCELLED, "", "deploy withdrawn before it was sent"
                else:                          # clear the retained deploy; roll back if it installs anyway
                    r.unsent, r.reason = "cancel", reason
        s.then = final
        self._set(ROLLING_BACK, reason, now)
        self._rolling_back_finish(now)

    def _rollback(self, r: DeviceRecord, reason: str, now: float) -> None:
        r.attempts += 1
        r.rollback_command_id = command_id_for(self.state.id, r.device_id, "rollback", r.attempts)
        r.state, r.unsent, r.rollback_at, r.reason = D_ROLLING_BACK, "rollback", now, reason
        self._changed = True

    def _rolling_back(self, obs: Observations) -> None:
        now = obs.now
        for r in self.state.devices.values():
            if r.state == D_ROLLING_BACK and r.rollback_at is not None \
                    and obs.elapsed(r.rollback_at) > self.spec.install_timeout_s:
                r.state = D_ROLLBACK_FAILED
                r.reason = f"no answer to the rollback within {self.spec.install_timeout_s:g} s"
                self._changed = True
            elif r.state == D_DEPLOYING and r.deployed_at is not None \
                    and obs.elapsed(r.deployed_at) > self.spec.install_timeout_s:
                r.state, r.reason = D_CANCELLED, (f"no answer to the withdrawn deploy within "
                                                  f"{self.spec.install_timeout_s:g} s")
                self._changed = True
        self._rolling_back_finish(now)

    def _rolling_back_finish(self, now: float) -> None:
        s = self.state
        if any(r.state in (D_ROLLING_BACK, D_DEPLOYING) for r in s.devices.values()):
            return
        final = s.then or ABORTED
        back = sum(r.state == D_ROLLED_BACK for r in s.devices.values())
        bad = sorted(r.device_id for r in s.devices.values() if r.state == D_ROLLBACK_FAILED)
        text = f"{final}: {s.reason}; {back} device(s) rolled back" + (
            f"; rollback FAILED on {', '.join(bad)}" if bad else "")
        s.then = ""
        self._set(final, text, now)

    # event handling ---------------------------------------------------------------------------

    def _absorb_outcomes(self, obs: Observations) -> None:
        for r in self.state.devices.values():
            if r.state == D_DEPLOYING and r.command_id in obs.outcomes and r.unsent != "deploy":
                outcome = obs.outcomes[r.command_id]
                if outcome.kind in DEPLOY_OK:
                    r.installed_at = outcome.ts
                    if self.state.state == ROLLING_BACK:   # a withdrawn deploy installed anyway: undo it
                        r.state = D_INSTALLED
                        r.unsent = ""
                        self._rollback(r, r.reason or "rollout rolled back", obs.now)
                    else:
                        r.state, r.reason = D_INSTALLED, outcome.reason
                else:
                    r.state = D_FAILED if self.state.state != ROLLING_BACK else D_CANCELLED
                    r.reason = f"{outcome.kind}" + (f" ({outcome.code})" if outcome.code else "") + \
                        f": {outcome.reason}"
                    if r.unsent == "cancel":
                        r.unsent = ""
                self._changed = True
            elif r.state == D_ROLLING_BACK and r.rollback_command_id in obs.outcomes and r.unsent != "rollback":
                outcome = obs.outcomes[r.rollback_command_id]
                if outcome.kind in ROLLBACK_OK:
                    r.state = D_ROLLED_BACK
                else:
                    r.state = D_ROLLBACK_FAILED
                    r.reason = f"rollback {outcome.kind}: {outcome.reason}"
                self._changed = True

    def _set(self, state: str, reason: str, now: float) -> None:
        s = self.state
        s.state, s.reason, s.updated_at = state, reason, now
        s.history.append({"ts": now, "state": state, "stage": s.stage + 1, "reason": reason})
        self._changed = True

    def commands_of_interest(self) -> dict[str, str]:
        """command id -> action, for the commands whose answers the runner should look up."""
        out = {}
        for r in self.state.devices.values():
            if r.state == D_DEPLOYING and r.command_id:
                out[r.command_id] = "deploy"
            if r.state == D_ROLLING_BACK and r.rollback_command_id:
                out[r.rollback_command_id] = "rollback"
        return out

    def devices_of_interest(self) -> list[str]:
        """Devices whose telemetry the next step needs: the current stage's and the next one's."""
        s = self.state
        if s.state not in (PENDING, DEPLOYING, SOAKING):
            return []
        eligible = sorted((r for r in s.devices.values() if r.state != D_EXCLUDED), key=lambda r: r.order)
        upto = s.stage_counts[min(s.stage + 1, len(s.stage_counts) - 1)] if s.stage_counts else 0
        return [r.device_id for r in eligible[:upto]]


__all__ = [
    "Stage", "parse_stages", "resolve_stages", "FailureBound", "parse_failure_bound", "Clause", "HealthRule",
    "parse_health", "evaluate_health", "DeviceObs", "Outcome", "Sample", "Observations", "outcome_from_events",
    "RolloutSpec", "DeviceRecord", "RolloutState", "state_from_dict", "model_label", "plan", "order_key",
    "command_id_for", "Action",
    "StepResult", "RolloutMachine", "RolloutError", "PENDING", "DEPLOYING", "SOAKING", "PAUSED",
    "ROLLING_BACK", "ABORTED", "COMPLETED", "ACTIVE_STATES", "OWNING_STATES", "FINAL_STATES",
]
