"""A real `litefleet server` process SIGKILLed in the middle of a staged rollout, then started again.

Three real agent processes run digits v1 against a real mosquitto. `litefleet server` runs as a
child process with the operator key, so its rollout runner drives the rollout; `litefleet rollout
start` (a real CLI process) creates a three-stage rollout of v2 with a soak. While stage 1 soaks
the server is killed (SIGKILL: no shutdown, no goodbye to the broker) and stays down longer than
the rollout's --stale-after while the devices keep reporting; a new server process is then started
on the same data directory, port and SQLite store. It is killed again while stage 2 deploys, and
once more as stage 2 starts its soak, each time started again at once. The rollout must carry on from the stage it was in: stage 1's device is not sent
its deploy again, the soak is not cut short, the server's outage is not taken for devices that
stopped reporting, the later servers send only the deploys of stages 2 and 3 (a deploy owed at a
crash is re-sent under its own command id), and the rollout completes with every device on v2.

The last tests drive the pure state machine through the same situations with made-up clocks.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace

import pytest

from agent.mqtt import MqttLink
from agent.protocol.topics import Topics
from fleet import rollout as ro
from fleet.rollout import Observations
from tests.conftest import run_cli
from tests.support.agents import wait_for
from tests.support.broker import Mosquitto
from tests.support.bundles import make_bundle
from tests.support.rollouts import ServerProcess, active_version, start_agents
from tests.test_rollout_logic import Fleet, new_rollout

FLEET = "rr"
GROUP = "line-r"
DEVICES = [f"rr-{i}" for i in range(3)]
SOAK_S = 6.0
STALE_S = 4.0
TELEMETRY_S = 0.5


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, keys_dir, release_key, digits_tflite_float):
    root = tmp_path_factory.mktemp("rollout-restart")
    broker = Mosquitto(workdir=root / "broker").start()
    bundles = {v: make_bundle(root / f"v{v}.lfb", digits_tflite_float, release_key, version=v) for v in (1, 2)}
    agents, telemetry = [], None
    server = ServerProcess(root / "server", keys_dir, broker.url, FLEET)
    try:
        telemetry = TelemetryCounter(broker.url)
        agents = start_agents(root, keys_dir, broker.url, bundles[1], DEVICES, fleet=FLEET, groups=(GROUP,),
                              telemetry_interval_s=TELEMETRY_S)
        yield {"root": root, "broker": broker, "bundles": bundles, "agents": {a.device.device_id: a for a in agents},
               "server": server, "keys_dir": keys_dir, "telemetry": telemetry}
    finally:
        server.stop()
        if telemetry is not None:
            telemetry.close()
        for agent in agents:
            agent.stop()
        broker.close()


class TelemetryCounter:
    """A raw subscriber noting when each device last reported: proof the devices kept reporting."""

    def __init__(self, broker_url: str) -> None:
        self.last: dict[str, float] = {}
        self.lock = threading.Lock()
        self.link = MqttLink(broker_url, "rr-observer", clean_start=True)
        self.link.start()
        assert self.link.wait_connected(10)
        assert self.link.subscribe(Topics(FLEET).all_devices("telemetry"), self._on, qos=0).wait(10)

    def _on(self, message) -> None:
        device = message.topic.split("/")[-2]
        with self.lock:
            self.last[device] = time.time()

    def last_report(self) -> dict[str, float]:
        """device id -> when its latest telemetry arrived here."""
        with self.lock:
            return dict(self.last)

    def close(self) -> None:
        self.link.stop(2)


def sent_deploys(log: str) -> list[tuple[str, str]]:
    """(device, command id) of each deploy a server's log says it sent, in order."""
    return re.findall(r"rollout restart: sent deploy to (\S+) \(command (\w+)\)", log)


@pytest.mark.slow
def test_server_killed_between_stages_carries_on_from_that_stage(fleet):
    server: ServerProcess = fleet["server"]
    server.start()
    wait_for(lambda: len([d for d in server.get("/api/v1/devices")["devices"] if d["online"]]) == len(DEVICES),
             30, "every agent online in the server's store")
    out = run_cli("rollout", "start", str(fleet["bundles"][2]), "--target", f"group:{GROUP}",
                  "--stages", "1,50%,100%", "--soak", f"{SOAK_S:g}s", "--max-failures", "0", "--health", "",
                  "--install-timeout", "60s", "--stale-after", f"{STALE_S:g}s", "--id", "restart",
                  "--repo", str(server.repo), "--trust", str(fleet["keys_dir"]),
                  "--server", server.url, "--token-file", str(server.token_file))
    assert out.returncode == 0, out.stderr + out.stdout

    def soaking_stage_1():
        rollout = server.rollout("restart")
        assert rollout["state"] in ("pending", "deploying", "soaking"), rollout["reason"]
        return rollout if rollout["state"] == "soaking" else None
    before = wait_for(soaking_stage_1, 60, "stage 1 to install and soak", interval=0.05)
    assert before["stage"] == 1 and before["stages"] == 3
    (canary,) = [d for d in before["devices"] if d["state"] == "installed"]

    # Crash during the soak, and stay away longer than --stale-after while the devices keep reporting:
    # the new server must not take its own absence for devices that stopped reporting.
    server.kill()
    killed_at = time.time()

    def reported_through_the_outage():
        last = fleet["telemetry"].last_report()
        return all(last.get(d, 0) > killed_at + STALE_S + 1 for d in DEVICES)
    wait_for(reported_through_the_outage, 60, f"every device to report more than {STALE_S + 1:g} s after the crash")
    server.start()

    # Crash again while stage 2 deploys: the install finishes against the third server.
    def deploying_stage_2():
        rollout = server.rollout("restart")
        assert rollout["state"] != "aborted", rollout["reason"]
        return rollout if (rollout["state"], rollout["stage"]) == ("deploying", 2) else None
    wait_for(deploying_stage_2, 60, "stage 2 to start deploying", interval=0.02)
    server.kill()
    server.start()

    # And once more as stage 2 starts its soak, with a quick restart: the soak goes on where it was.
    def soaking_stage_2():
        rollout = server.rollout("restart")
        assert rollout["state"] != "aborted", rollout["reason"]
        return rollout if (rollout["state"], rollout["stage"]) == ("soaking", 2) else None
    wait_for(soaking_stage_2, 60, "stage 2 to soak", interval=0.02)
    server.kill()
    server.start()

    done = wait_for(lambda: (r := server.rollout("restart"))["state"] in ("completed", "aborted") and r, 90,
                    "the rollout to end after the restarts", interval=0.2)
    assert done["state"] == "completed", done["reason"]
    assert {active_version(a) for a in fleet["agents"].values()} == {2}

    (listed,) = server.get("/api/v1/rollouts")["rollouts"]
    assert (listed["state"], listed["stage"], listed["stages"], listed["stage_counts"]) == ("completed", 3, 3, [1, 2, 3])
    assert listed["devices_by_state"] == {"installed": 3} and listed["versions"] == {"x86-cpu": 2}

    # Each stage ran once: one deploy command and one install per device, never repeated.
    steps = [(h["state"], h.get("stage")) for h in done["history"]]
    assert steps == [("pending", None), ("deploying", 1), ("soaking", 1), ("deploying", 2), ("soaking", 2),
                     ("deploying", 3), ("soaking", 3), ("completed", 3)], steps
    for device in done["devices"]:
        assert device["state"] == "installed" and device["attempts"] == 1, device
        events = server.get(f"/api/v1/events?device={device['device_id']}&kind=installed,deploy_accepted")["events"]
        assert {e["command_id"] for e in events} == {device["command_id"]}, events
        assert sum(e["kind"] == "installed" for e in events) == 1, events
    assert [d["stage"] for d in done["devices"] if d["device_id"] == canary["device_id"]] == [0]
    logs = [sent_deploys(server.log(run)) for run in (1, 2, 3, 4)]
    assert logs[0] == [(canary["device_id"], canary["command_id"])], logs
    later = {pair for log in logs[1:] for pair in log}      # a deploy owed at the crash is re-sent with its id
    assert later == {(d["device_id"], d["command_id"]) for d in done["devices"] if d["stage"] in (1, 2)}, logs

    # No soak was cut short by a crash; the second server took the rollout on from stage 1's soak and
    # the fourth from stage 2's (it came back within that soak, so it had to wait out the rest).
    at = {(h["state"], h.get("stage")): h["ts"] for h in done["history"]}
    for stage in (1, 2, 3):
        following = ("deploying", stage + 1) if stage < 3 else ("completed", 3)
        assert at[following] >= at[("soaking", stage)] + SOAK_S, (stage, done["history"])
    assert at[("deploying", 2)] > killed_at
    assert "soaking -> deploying" not in server.log(1)
    assert "rollout restart: soaking -> deploying: stage 2 healthy" in server.log(4)


# The machine's side of a restart, with made-up clocks (no processes) -------------------------------

class WatchedFleet(Fleet):
    """A made-up fleet observed by a server that has been listening since ``watching_since``."""

    watching_since: float | None = None

    def obs(self) -> Observations:
        return replace(super().obs(), watching_since=self.watching_since)


def test_a_server_back_after_a_long_outage_does_not_blame_the_devices_for_its_silence():
    fleet = WatchedFleet(4)
    m = new_rollout(fleet, stages="1,100%", max_failures="0", soak_s=60, stale_after_s=30, health="")
    fleet.step(m)
    (canary,) = fleet.last("deploy")
    fleet.answer(canary, "installed")
    fleet.step(m)
    assert m.state.state == ro.SOAKING
    fleet.advance(300)                       # the server was down for 5 minutes; its store heard nothing
    fleet.watching_since = fleet.now
    fleet.step(m)
    assert (m.state.state, m.state.stage) == (ro.SOAKING, 0), m.state.reason
    assert m.state.devices[canary.device_id].state == "installed"
    fleet.advance(1)                         # the soak is over, but nothing heard since the restart yet
    fleet.step(m)
    assert m.state.state == ro.SOAKING
    fleet.report(10.0)                       # the broker redelivers; the device is heard again
    fleet.step(m)
    assert (m.state.state, m.state.stage) == (ro.DEPLOYING, 1), m.state.reason
    # Once listening, silence counts again.
    fleet.advance(5)
    for action in fleet.last("deploy")[1:]:
        fleet.answer(action, "installed")
    fleet.step(m)
    fleet.advance(40)
    fleet.step(m)
    assert m.state.state in (ro.ROLLING_BACK, ro.ABORTED) and "stopped reporting" in m.state.breach


def test_an_install_answered_while_the_server_was_down_is_not_late():
    fleet = WatchedFleet(2)
    m = new_rollout(fleet, stages="1,100%", max_failures="0", install_timeout_s=120, health="")
    fleet.step(m)
    (canary,) = fleet.last("deploy")
    fleet.advance(600)                       # down longer than --install-timeout
    fleet.watching_since = fleet.now
    fleet.step(m)
    assert m.state.devices[canary.device_id].state == "deploying", m.state.reason
    fleet.answer(canary, "installed")        # the event queued for the server's session arrives
    fleet.step(m)
    assert m.state.state == ro.SOAKING and m.state.devices[canary.device_id].state == "installed"


def test_an_install_that_never_answers_still_times_out_after_the_restart():
    fleet = WatchedFleet(2)
    m = new_rollout(fleet, stages="1,100%", max_failures="0", install_timeout_s=120, health="")
    fleet.step(m)
    fleet.advance(600)
    fleet.watching_since = fleet.now
    fleet.step(m)
    fleet.advance(121)
    fleet.step(m)
    assert m.state.state in (ro.ROLLING_BACK, ro.ABORTED) and "no answer to the deploy within 120 s" in m.state.breach
