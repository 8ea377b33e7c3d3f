"""The rollout's pure decisions: stages, failure bounds, health rules and the state machine,
driven with made-up clocks, devices, events and telemetry (no I/O, no sleeps)."""

from __future__ import annotations

import json

import pytest

from fleet import rollout as ro
from fleet.rollout import (DeviceObs, Observations, Outcome, RolloutError, RolloutMachine, RolloutSpec, Sample,
                           parse_failure_bound, parse_health, parse_stages, plan, resolve_stages)

# --- parsing --------------------------------------------------------------------------------------


def test_stages_resolve_counts_and_percentages_of_the_target_set():
    stages = parse_stages("1,10%,50%,100%")
    assert [str(s) for s in stages] == ["1", "10%", "50%", "100%"]
    assert resolve_stages(stages, 40) == [1, 4, 20, 40]
    assert resolve_stages(stages, 5) == [1, 3, 5]          # 10% of 5 rounds up to 1: that stage adds nobody
    assert resolve_stages(stages, 1) == [1]
    assert resolve_stages(parse_stages("2,5,100%"), 3) == [2, 3]


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("1,10%,50%", "last stage must be 100%"),
    ("10%,5%,100%", "must grow"),
    ("3,2,100%", "must grow"),
    ("0,100%", "at least 1 device"),
    ("10%,5,100%", "cannot follow a percentage"),
    ("1,ten%,100%", "stage 2 ('ten%')"),
    ("1,150%", "at most 100%"),
    ("1,x,100%", "not a device count"),
])
def test_bad_stages_say_which_stage_is_wrong(text, fragment):
    with pytest.raises(RolloutError, match=None) as err:
        parse_stages(text)
    assert fragment in str(err.value)


def test_failure_bound_percent_or_count():
    five = parse_failure_bound("5%")
    assert not five.exceeded(0, 1) and five.exceeded(1, 1) and not five.exceeded(1, 20) and five.exceeded(2, 20)
    two = parse_failure_bound("2")
    assert not two.exceeded(2, 3) and two.exceeded(3, 100)
    zero = parse_failure_bound("0")
    assert zero.exceeded(1, 1000)
    for bad in ("x", "-1", "150%"):
        with pytest.raises(RolloutError, match="--max-failures"):
            parse_failure_bound(bad)


def test_health_rule_relative_and_absolute_clauses():
    rule = parse_health("p95_latency_ms<=1.2*baseline, error_rate<1%")
    assert [(c.metric, c.op, c.value, c.factor) for c in rule.clauses] == [
        ("p95_latency_ms", "<=", None, 1.2), ("error_rate", "<", 0.01, None)]
    rule = parse_health("p95_latency_ms<=50,p99_latency_ms<baseline*2,cpu_percent<=90%,error_rate<=0.02")
    assert [(c.value, c.factor) for c in rule.clauses] == [(50.0, None), (None, 2.0), (90.0, None), (0.02, None)]
    assert parse_health("").clauses == ()


@pytest.mark.parametrize("text, fragment", [
    ("p95_latency<=50", "unknown metric 'p95_latency'"),
    ("p95_latency_ms<=1.2*baselin", "'p95_latency_ms<=1.2*baselin'"),
    ("p95_latency_ms=50", "expected METRIC OP BOUND"),
    ("p95_latency_ms<=50,,error_rate<1%", "empty clause"),
    ("p95_latency_ms<=5%", "not a rate"),
    ("error_rate<3", "fraction"),
    ("p95_latency_ms<=50,error_rate<lots", "'error_rate<lots'"),
])
def test_bad_health_rule_names_the_clause(text, fragment):
    with pytest.raises(RolloutError) as err:
        parse_health(text)
    assert fragment in str(err.value)


def test_evaluate_health_against_the_baseline():
    rule = parse_health("p95_latency_ms<=1.2*baseline,error_rate<1%")
    base = [{"p95": 10.0, "count": 100, "errors": 0}] * 5
    fast = [{"p95": 11.0, "count": 100, "errors": 0}] * 3
    slow = [{"p95": 40.0, "count": 100, "errors": 0}] * 3
    ok = ro.evaluate_health(rule, fast, base, 3)
    assert ok.judged and not ok.violations
    bad = ro.evaluate_health(rule, slow, base, 3)
    assert len(bad.violations) == 1 and "p95_latency_ms 40.0" in bad.violations[0] and "1.2 x baseline 10.0 = 12.0" \
        in bad.violations[0]
    errs = ro.evaluate_health(rule, [{"p95": 10.0, "count": 100, "errors": 5}] * 3, base, 3)
    assert errs.violations and "error_rate 5.00%" in errs.violations[0]
    early = ro.evaluate_health(rule, slow[:2], base, 3)
    assert not early.judged and not early.violations
    no_base = ro.evaluate_health(rule, slow, [], 3)
    assert not no_base.violations and any("no baseline" in n for n in no_base.notes)
    idle = ro.evaluate_health(rule, [{"p95": None, "count": 0, "errors": 0}] * 9, base, 3)
    assert not idle.judged


def test_device_order_is_stable_and_depends_on_the_rollout():
    ids = [f"d{i}" for i in range(50)]
    a = sorted(ids, key=lambda d: ro.order_key("r1", d))
    assert a == sorted(reversed(ids), key=lambda d: ro.order_key("r1", d))
    assert a != sorted(ids, key=lambda d: ro.order_key("r2", d))


# --- the machine ------------------------------------------------------------------------------------

BUNDLES = {"x86-cpu": {"blob": "a" * 64, "name": "digits", "version": 2, "profile": "x86-cpu"},
           "rpi4": {"blob": "b" * 64, "name": "digits", "version": 2, "profile": "rpi4"}}


class Fleet:
    """A made-up fleet: devices answer commands and report telemetry as the test says."""

    def __init__(self, n: int = 10, profile: str = "x86-cpu") -> None:
        self.now = 1000.0
        self.devices = {f"dev-{i:02d}": DeviceObs(f"dev-{i:02d}", profile, True, self.now, "digits", 1)
                        for i in range(n)}
        self.outcomes: dict[str, Outcome] = {}
        self.telemetry: dict[str, list[Sample]] = {d: [] for d in self.devices}
        self.sent: list[ro.Action] = []
        for t in range(0, 300, 10):      # pre-rollout telemetry on v1: p95 10 ms
            for d in self.devices:
                self.telemetry[d].append(Sample(self.now - 300 + t, "digits v1", 5.0, 10.0, 12.0, 100, 0))

    def obs(self) -> Observations:
        return Observations(self.now, dict(self.devices), dict(self.outcomes),
                            {d: list(v) for d, v in self.telemetry.items()})

    def step(self, machine: RolloutMachine) -> ro.StepResult:
        result = machine.step(self.obs())
        for action in result.actions:
            self.sent.append(action)
            machine.mark_sent(action)
        return result

    def answer(self, action: ro.Action, kind: str, reason: str = "", code: str = "") -> None:
        self.outcomes[action.command_id] = Outcome(kind, self.now, reason, code)
        if kind == "installed":
            old = self.devices[action.device_id]
            self.devices[action.device_id] = DeviceObs(old.device_id, old.profile, True, self.now, "digits", 2,
                                                       self.now)
        if kind == "rolled_back":
            old = self.devices[action.device_id]
            self.devices[action.device_id] = DeviceObs(old.device_id, old.profile, True, self.now, "digits", 1,
                                                       self.now)

    def report(self, p95: float, version: int = 2, errors: int = 0) -> None:
        for d, obs in self.devices.items():
            self.devices[d] = DeviceObs(d, obs.profile, obs.online, self.now, obs.model_name, obs.model_version,
                                        obs.model_ts)
            if obs.model_version == version:
                self.telemetry[d].append(Sample(self.now, f"digits v{version}", p95 / 2, p95, p95 * 1.2, 100, errors))

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def last(self, kind: str) -> list[ro.Action]:
        return [a for a in self.sent if a.kind == kind]


def new_rollout(fleet: Fleet, **kwargs) -> RolloutMachine:
    spec = RolloutSpec(id="r1", fleet="f", target="all", bundles=kwargs.pop("bundles", BUNDLES),
                       **{"stages": "1,10%,50%,100%", "soak_s": 60, "max_failures": "5%",
                          "health": "p95_latency_ms<=1.2*baseline,error_rate<1%", "install_timeout_s": 120,
                          **kwargs})
    return RolloutMachine(plan(spec, list(fleet.devices.values()), kwargs.get("busy", {}), fleet.now))


def run_stage(fleet: Fleet, machine: RolloutMachine, p95: float = 10.5) -> list[ro.Action]:
    """Answer every new deploy with 'installed', report telemetry through the soak."""
    fleet.step(machine)
    deploys = [a for a in fleet.sent if a.kind == "deploy" and a.command_id not in fleet.outcomes]
    fleet.advance(5)
    for action in deploys:
        fleet.answer(action, "installed")
    fleet.step(machine)
    for _ in range(7):
        fleet.advance(10)
        fleet.report(p95)
        fleet.step(machine)
    return deploys


def test_good_model_widens_stage_by_stage_to_completion():
    fleet = Fleet(20)
    m = new_rollout(fleet)
    sizes = []
    while m.state.state not in ro.FINAL_STATES:
        sizes.append(len(run_stage(fleet, m)))
        assert len(sizes) < 10
    assert m.state.state == ro.COMPLETED, m.state.reason
    assert sizes == [1, 1, 8, 10]       # 1, 10% of 20 = 2 (1 more), 50% = 10, 100% = 20
    assert "completed: 20 device(s) updated" in m.state.reason
    assert not fleet.last("rollback")
    # every device got exactly one deploy carrying its profile's bundle, in the stable order
    deploys = fleet.last("deploy")
    assert len({a.device_id for a in deploys}) == 20 == len(deploys)
    assert [a.device_id for a in deploys] == sorted(fleet.devices, key=lambda d: ro.order_key("r1", d))
    assert all(a.args["version"] == 2 and a.args["profile"] == "x86-cpu" for a in deploys)


def test_slow_model_stops_at_first_stage_and_rolls_back():
    fleet = Fleet(10)
    m = new_rollout(fleet)
    deploys = run_stage(fleet, m, p95=40.0)
    assert len(deploys) == 1
    assert m.state.state == ro.ROLLING_BACK
    assert "p95_latency_ms 40.0" in m.state.reason and "1.2 x baseline 10.0" in m.state.reason
    rollbacks = fleet.last("rollback")
    assert [a.device_id for a in rollbacks] == [deploys[0].device_id]
    assert "breach" in rollbacks[0].args["reason"]
    fleet.advance(2)
    fleet.answer(rollbacks[0], "rolled_back")
    fleet.step(m)
    assert m.state.state == ro.ABORTED
    assert "1 device(s) rolled back" in m.state.reason and "p95_latency_ms" in m.state.breach
    # nothing more is ever sent
    n = len(fleet.sent)
    fleet.advance(1000)
    fleet.step(m)
    assert len(fleet.sent) == n


def test_install_failures_over_the_bound_stop_before_any_soak_and_roll_back_nothing_that_failed():
    fleet = Fleet(10)
    m = new_rollout(fleet, stages="2,100%", max_failures="1")
    fleet.step(m)
    a, b = fleet.last("deploy")
    fleet.answer(a, "install_failed", "digits v2 failed its smoke test", "smoke_test_failed")
    fleet.step(m)
    assert m.state.state == ro.DEPLOYING          # 1 failure is within the bound of 1
    fleet.answer(b, "install_failed", "digits v2 failed its smoke test", "smoke_test_failed")
    fleet.step(m)
    assert m.state.state == ro.ABORTED
    assert "2 of 2 device(s) failed, over --max-failures 1" in m.state.reason
    assert "smoke_test_failed" in m.state.reason
    assert not fleet.last("rollback")             # they never activated: nothing to roll back
    assert len(fleet.last("deploy")) == 2


def test_pause_on_breach_then_resume_redeploys_the_stage():
    fleet = Fleet(10)
    m = new_rollout(fleet, on_breach="pause")
    deploys = run_stage(fleet, m, p95=40.0)
    (rb,) = fleet.last("rollback")
    fleet.answer(rb, "rolled_back")
    fleet.step(m)
    assert m.state.state == ro.PAUSED and m.state.breach
    m.resume(fleet.now)
    with pytest.raises(RolloutError, match="only a paused rollout can be resumed"):
        m.resume(fleet.now)
    redeploy = run_stage(fleet, m, p95=10.0)
    assert [a.device_id for a in redeploy] == [deploys[0].device_id]
    assert redeploy[0].command_id != deploys[0].command_id
    assert m.state.state == ro.DEPLOYING and m.state.stage == 1


def test_operator_pause_freezes_and_abort_rolls_back_every_updated_device():
    fleet = Fleet(10)
    m = new_rollout(fleet, stages="1,50%,100%")
    run_stage(fleet, m)
    assert m.state.stage == 1
    fleet.step(m)
    m.pause(fleet.now)
    n = len(fleet.sent)
    fleet.advance(50)
    fleet.step(m)
    assert m.state.state == ro.PAUSED and len(fleet.sent) == n
    m.resume(fleet.now)
    fleet.step(m)
    stage2 = [a for a in fleet.last("deploy")][1:]
    for action in stage2[:3]:
        fleet.answer(action, "installed")
    fleet.step(m)
    m.abort(fleet.now)
    result = fleet.step(m)
    kinds = sorted(a.kind for a in result.actions) if result.actions else []
    rollbacks = {a.device_id for a in fleet.last("rollback")}
    cancels = {a.device_id for a in fleet.last("cancel")}
    assert len(rollbacks) == 4 and len(cancels) == 1, (kinds, m.state.reason)
    assert m.state.state == ro.ROLLING_BACK
    # the withdrawn deploy installs anyway: it gets rolled back too
    late = next(a for a in stage2 if a.device_id in cancels)
    fleet.answer(late, "installed")
    fleet.step(m)
    assert late.device_id in {a.device_id for a in fleet.last("rollback")}
    for action in fleet.last("rollback"):
        fleet.answer(action, "rolled_back")
    fleet.step(m)
    assert m.state.state == ro.ABORTED and "5 device(s) rolled back" in m.state.reason
    with pytest.raises(RolloutError, match="already aborted"):
        m.abort(fleet.now)


def test_devices_that_go_silent_or_offline_during_the_soak_are_a_breach():
    fleet = Fleet(4)
    m = new_rollout(fleet, stages="2,100%", max_failures="0", stale_after_s=30)
    fleet.step(m)
    for action in fleet.last("deploy"):
        fleet.answer(action, "installed")
    fleet.step(m)
    assert m.state.state == ro.SOAKING
    quiet = fleet.last("deploy")[0].device_id
    for _ in range(4):
        fleet.advance(10)
        fleet.report(10.0)
        fleet.devices[quiet] = DeviceObs(quiet, "x86-cpu", True, fleet.now - 45, "digits", 2, None)
        fleet.step(m)
    assert m.state.state in (ro.ROLLING_BACK, ro.ABORTED)
    assert f"{quiet}: stopped reporting" in m.state.breach


def test_a_device_that_went_silent_after_installing_is_asked_to_roll_back_only_from_the_new_model():
    fleet = Fleet(4)
    m = new_rollout(fleet, stages="2,100%", max_failures="0", stale_after_s=30)
    fleet.step(m)
    for action in fleet.last("deploy"):
        fleet.answer(action, "installed")
    fleet.step(m)
    quiet, talking = (a.device_id for a in fleet.last("deploy"))
    for _ in range(4):
        fleet.advance(10)
        fleet.report(10.0)
        fleet.devices[quiet] = DeviceObs(quiet, "x86-cpu", True, fleet.now - 45, "digits", 2, None)
        fleet.step(m)
    rollbacks = {a.device_id: a for a in fleet.last("rollback")}
    assert set(rollbacks) == {quiet, talking}       # the silent one may still run v2
    assert all(a.args["if_active"] == {"name": "digits", "version": 2} for a in rollbacks.values())
    fleet.answer(rollbacks[talking], "rolled_back")
    fleet.advance(5)                                 # the silent device comes back already on v1
    fleet.outcomes[rollbacks[quiet].command_id] = Outcome("rollback_skipped", fleet.now,
                                                          "rollback not needed: the active model is digits v1")
    fleet.step(m)
    assert m.state.state == ro.ABORTED and "rollback FAILED" not in m.state.reason
    assert m.state.devices[quiet].state == ro.D_ROLLED_BACK


def test_a_device_that_reverted_on_its_own_counts_as_failed():
    fleet = Fleet(2)
    m = new_rollout(fleet, stages="1,100%", max_failures="0")
    fleet.step(m)
    (a,) = fleet.last("deploy")
    fleet.answer(a, "installed")
    fleet.step(m)
    fleet.advance(5)
    fleet.devices[a.device_id] = DeviceObs(a.device_id, "x86-cpu", True, fleet.now, "digits", 1, fleet.now)
    fleet.step(m)
    assert "now runs v1, not v2" in m.state.breach


def test_no_answer_within_the_install_timeout_is_a_failure():
    fleet = Fleet(3)
    m = new_rollout(fleet, stages="1,100%", install_timeout_s=60, max_failures="0")
    fleet.step(m)
    fleet.advance(61)
    fleet.step(m)
    assert m.state.state == ro.ROLLING_BACK or m.state.state == ro.ABORTED
    assert "no answer to the deploy within 60 s" in m.state.breach


def test_exclusions_busy_devices_and_profiles_without_a_bundle():
    fleet = Fleet(4)
    fleet.devices["pi-1"] = DeviceObs("pi-1", "rpi4", True, fleet.now)
    fleet.devices["jet-1"] = DeviceObs("jet-1", "jetson", True, fleet.now)
    spec = RolloutSpec(id="r2", fleet="f", target="all", bundles=BUNDLES, stages="100%", soak_s=0, health="")
    state = plan(spec, list(fleet.devices.values()), {"dev-00": "r1"}, fleet.now)
    assert state.devices["dev-00"].state == ro.D_EXCLUDED and "active rollout r1" in state.devices["dev-00"].reason
    assert "no bundle for its profile 'jetson'" in state.devices["jet-1"].reason
    assert "dev-00" not in state.owned_devices() and "pi-1" in state.owned_devices()
    m = RolloutMachine(state)
    fleet.step(m)
    deploys = {a.device_id: a.args for a in fleet.last("deploy")}
    assert set(deploys) == {"dev-01", "dev-02", "dev-03", "pi-1"}
    assert deploys["pi-1"]["blob"] == "b" * 64 and deploys["dev-01"]["blob"] == "a" * 64


def test_nothing_to_update_aborts_at_once_with_a_reason():
    state = plan(RolloutSpec(id="r", fleet="f", target="group:none", bundles=BUNDLES), [], {}, 1.0)
    assert state.state == ro.ABORTED and "no device to update" in state.reason


def test_spec_checks_name_the_field():
    with pytest.raises(RolloutError, match="on-breach"):
        plan(RolloutSpec(id="r", fleet="f", target="all", bundles=BUNDLES, on_breach="explode"), [], {}, 1.0)
    mixed = {"x86-cpu": BUNDLES["x86-cpu"], "rpi4": {**BUNDLES["rpi4"], "name": "other"}}
    with pytest.raises(RolloutError, match="one model"):
        plan(RolloutSpec(id="r", fleet="f", target="all", bundles=mixed), [], {}, 1.0)


def test_state_round_trips_through_json_and_resumes_where_it_was():
    """What the store keeps is enough: a machine rebuilt from it carries on, re-sending owed commands."""
    fleet = Fleet(10)
    m = new_rollout(fleet)
    run_stage(fleet, m)
    for action in fleet.last("deploy"):
        if action.command_id not in fleet.outcomes:
            fleet.answer(action, "installed")
    fleet.step(m)
    for _ in range(7):
        fleet.advance(10)
        fleet.report(10.0)
        result = m.step(fleet.obs())      # stage 3's deploys decided; the server "crashes" before sending them
        if result.actions:
            break
    owed = [a for a in result.actions if a.kind == "deploy"]
    assert len(owed) == 5 and m.state.stage == 2
    doc = json.loads(json.dumps(m.state.to_dict()))
    m2 = RolloutMachine(ro.state_from_dict(doc))
    assert m2.state.to_dict() == m.state.to_dict()
    again = [a for a in m2.step(fleet.obs()).actions if a.kind == "deploy"]
    assert [(a.device_id, a.command_id) for a in again] == [(a.device_id, a.command_id) for a in owed]


def test_outcome_from_events_ignores_progress_and_our_own_replays():
    events = [{"kind": "deploy_accepted", "ts": 1}, {"kind": "deploy_rejected", "ts": 2,
                                                     "details": {"code": "replayed"}},
              {"kind": "deploy_progress", "ts": 3}, {"kind": "installed", "ts": 4, "reason": "ok"}]
    assert ro.outcome_from_events(events, "deploy") == Outcome("installed", 4.0, "ok", "")
    assert ro.outcome_from_events(events[:3], "deploy") is None
    assert ro.outcome_from_events([{"kind": "rolled_back", "ts": 5}], "rollback").kind == "rolled_back"
    failed = ro.outcome_from_events([{"kind": "install_failed", "ts": 5, "details": {"code": "smoke_test_failed"}}],
                                    "deploy")
    assert failed.code == "smoke_test_failed"
