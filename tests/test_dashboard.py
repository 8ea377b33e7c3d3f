"""The web dashboard in a real headless chromium, over the real data path.

Simulated devices are real processes (``DEVICE_SIM`` below): each connects to a real mosquitto
with ``agent.mqtt.MqttLink`` and the agent's last will, publishes a retained birth and telemetry
documents made by the agent's own ``agent.telemetry.collect()`` from a real ``InferenceMetrics``,
and publishes events the test asks for on its stdin. The fleet side is the real ingest
(``fleet.ingest.Ingestor``) writing a real SQLite store, the real alert engine, and the real HTTP
API (``fleet.api.ApiServer`` on a free port) serving the dashboard's files. What is simulated:
the inference latencies (recorded into the real metrics object) and the temperature (this
machine has no thermal sensor), so the charts show known values.

The browser is Debian's chromium driven by playwright (``.ci/run`` installs it; playwright's own
browser downloads are not used). Screenshots of every page go to the test's tmp dir, or to
``$LITEFLEET_SCREENSHOTS`` when set.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import mosquitto_factory  # noqa: F401 (fixture)

from playwright import sync_api as playwright_api   # in litefleet[dev]; uses the system chromium

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("LITEFLEET_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
FLEET = "plant"
TOKEN = "dashboard-test-token-5f1c"
REPO = Path(__file__).resolve().parents[1]
WAIT_MS = 20_000            # page-side waits: ingest flush + one poll period, with a wide margin

DIGITS_V2 = {"name": "digits", "version": 2, "sha256": "2a" * 32}
DIGITS_V3 = {"name": "digits", "version": 3, "sha256": "3b" * 32}
DIGITS_V4 = {"name": "digits", "version": 4, "sha256": "4c" * 32}

# A device process. argv[1]: JSON config. stdin: one JSON object per line:
#   {"event": {"kind", "reason", "command_id", "details"}}  publish an event
#   {"model": {...} | null, "engine": {...}?}                 switch model, publish a new birth
#   {"p95": ms} / {"temperature": C}                          change what the next telemetry reports
#   {"extra": {...}}                                          merged into every telemetry document from now
#                                                             (drift and feedback reports, docs/quality.md)
# Prints "ready" once its birth is acknowledged, "ack <seq>" after each event's PUBACK.
DEVICE_SIM = r'''
import json, random, sys, tempfile, threading, time
from agent.metrics import InferenceMetrics
from agent.mqtt import MqttLink, Will
from agent.protocol import messages
from agent.protocol.topics import Topics
from agent.telemetry import collect

cfg = json.loads(sys.argv[1])
me, topics = cfg["device_id"], Topics(cfg["fleet"])
state = {"model": cfg["model"], "engine": cfg["engine"], "p95": cfg["p95"], "temperature": cfg["temperature"]}
lock = threading.Lock()
seq = [0]
started = time.time()
state_dir = tempfile.mkdtemp(prefix="lf-sim-")
metrics = InferenceMetrics(seed=1)

def offline(reason):
    return {"v": 1, "state": "offline", "device_id": me, "ts": time.time(), "reason": reason, "fleet": cfg["fleet"],
            "groups": cfg["groups"], "profile": cfg["profile"]}

def birth():
    engine = state["engine"]
    return {"v": 1, "state": "online", "device_id": me, "ts": time.time(), "fleet": cfg["fleet"],
            "groups": cfg["groups"], "labels": {"site": "hall-2"}, "profile": cfg["profile"], "agent_version": "0.1.0",
            "runtime": {"name": engine["runtime"], "version": engine["runtime_version"]},
            "delegates_available": [a["kind"] for a in engine["attempts"] if a["outcome"] == "used"],
            "engine": engine, "active_model": state["model"],
            "hardware": {"machine": "aarch64", "cores": 4, "system": "Linux", "release": "6.1.0"}}

def next_seq():
    with lock:
        seq[0] += 1
        return seq[0]

link = MqttLink(cfg["url"], me, clean_start=True, session_expiry_s=0, keepalive_s=5,
                will=Will(str(topics.status(me)), messages.encode(offline("connection lost")), qos=1, retain=True))
link.start()
if not link.wait_connected(15):
    sys.exit("device sim: cannot connect to " + cfg["url"])
link.publish(str(topics.status(me)), messages.encode(birth()), qos=1, retain=True).wait(10)
print("ready", flush=True)

def commands():
    for line in sys.stdin:
        cmd = json.loads(line)
        if "event" in cmd:
            ev, s = cmd["event"], next_seq()
            msg = {"v": 1, "device_id": me, "seq": s, "ts": time.time(), "kind": ev["kind"], "reason": ev["reason"],
                   "command_id": ev.get("command_id", ""), "details": ev.get("details", {})}
            link.publish(str(topics.events(me)), messages.encode(msg), qos=1).wait(10)
            print("ack", s, flush=True)
        if "model" in cmd:
            state["model"] = cmd["model"]
            state["engine"] = cmd.get("engine", state["engine"])
            link.publish(str(topics.status(me)), messages.encode(birth()), qos=1, retain=True).wait(10)
            print("ack birth", flush=True)
        for key in ("p95", "temperature", "extra"):
            if key in cmd:
                state[key] = cmd[key]
                print("ack", key, flush=True)
threading.Thread(target=commands, daemon=True).start()

rng = random.Random(me)
while True:
    time.sleep(cfg["period"])        # the device's telemetry interval, not test synchronisation
    # 55 inferences per interval; the slowest 10 take exactly "p95" ms, so that is the p95 reported
    for _ in range(45):
        metrics.record(state["p95"] * rng.uniform(0.5, 0.9), True)
    for _ in range(10):
        metrics.record(state["p95"], True)
    doc = collect(metrics, state["model"], state["engine"] if state["model"] else None,
                  state_dir=state_dir, started_at=started)
    doc["system"]["temperature_c"] = state["temperature"]        # no thermal sensor here
    doc.update(state.get("extra") or {})
    s = next_seq()
    msg = {"v": 1, "device_id": me, "seq": s, "ts": time.time(), "data": doc}
    link.publish(str(topics.telemetry(me)), messages.encode(msg), qos=1)
'''


def engine_report(delegate: str, attempts: list[dict[str, str]]) -> dict[str, Any]:
    """An ``EngineReport.to_dict()`` as agent/engine.py makes it."""
    return {"runtime": "ai-edge-litert", "runtime_version": "2.3.0", "delegate": delegate, "threads": 2,
            "workers": 1, "delegated_nodes": 31 if delegate != "xnnpack" else None,
            "total_nodes": 31 if delegate != "xnnpack" else None, "full_graph": True if delegate != "xnnpack" else None,
            "attempts": attempts}


CPU_ONLY = engine_report("xnnpack", [{"kind": "xnnpack", "library": "", "outcome": "used",
                                      "reason": "XNNPACK on 2 threads"}])
GPU_FALLBACK = engine_report("xnnpack", [
    {"kind": "gpu", "library": "libtensorflowlite_gpu_delegate.so", "outcome": "missing",
     "reason": "libtensorflowlite_gpu_delegate.so not found (OSError): install the GPU delegate for this JetPack"},
    {"kind": "xnnpack", "library": "", "outcome": "used", "reason": "fell back to XNNPACK on 2 threads"}])


class Device:
    """One simulated device process."""

    def __init__(self, broker_url: str, device_id: str, *, profile: str = "rpi4-cpu", groups: tuple[str, ...] = ("lab",),
                 model: dict | None = DIGITS_V2, engine: dict = CPU_ONLY, p95: float = 5.0, temperature: float = 55.0,
                 period: float = 0.5) -> None:
        self.device_id = device_id
        cfg = {"url": broker_url, "fleet": FLEET, "device_id": device_id, "profile": profile, "groups": list(groups),
               "model": model, "engine": engine, "p95": p95, "temperature": temperature, "period": period}
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", DEVICE_SIM, json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self._expect("ready", 30)

    def _expect(self, prefix: str, timeout: float) -> str:
        """The next stdout line, which must start with ``prefix`` (readline returns when the line is there)."""
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = result[0] if result else ""
        if not line.startswith(prefix):
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.poll() is not None or not reader.is_alive() else ""
            raise AssertionError(f"device {self.device_id}: expected {prefix!r}, got {line!r}\n{err[-3000:]}")
        return line

    def send(self, **command: Any) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        self._expect("ack", 15)

    def event(self, kind: str, reason: str, command_id: str = "", **details: Any) -> None:
        self.send(event={"kind": kind, "reason": reason, "command_id": command_id, "details": details})

    def crash(self) -> None:
        """SIGKILL: the broker publishes the device's last will (retained, state offline)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


class FleetEnv:
    def __init__(self, broker: Any, store: Any, api_url: str, db_url: str) -> None:
        self.broker, self.store, self.api_url, self.db_url = broker, store, api_url, db_url
        self.devices: list[Device] = []

    def device(self, device_id: str, **kwargs: Any) -> Device:
        dev = Device(self.broker.url, device_id, **kwargs)
        self.devices.append(dev)
        return dev

    def url(self, path: str = "/", token: str = TOKEN, refresh: float = 1, window: int = 900) -> str:
        """The dashboard URL as the server prints it, polling every ``refresh`` s, charts over ``window`` s."""
        return f"{self.api_url}{path}?refresh={refresh:g}&window={window}#token={token}"


@pytest.fixture
def fleet_env(mosquitto_factory, tmp_path) -> Iterator[FleetEnv]:  # noqa: F811 (fixture)
    from agent.mqtt import MqttLink
    from fleet.alerts import AlertEngine
    from fleet.api import ApiServer, ServerApi
    from fleet.api_rollouts import MountedApi, RolloutApi
    from fleet.ingest import Ingestor
    from fleet.store import open_store

    broker = mosquitto_factory()
    store = open_store(str(tmp_path / "fleet.db"))
    store.migrate()
    link = MqttLink(broker.url, "litefleet-server-test", clean_start=False, manual_ack=True, backoff=(0.1, 1.0))
    ingest = Ingestor(link, store, FLEET, flush_ms=100)
    ingest.start()
    link.start()
    assert link.wait_connected(15), f"ingest cannot connect to {broker.url}: {link.last_error}"
    alerts = AlertEngine(store, max_temperatures={"rpi4-cpu": 80.0, "jetson-gpu": 90.0})
    alerts.start(interval_s=0.5)
    # the API as `litefleet server` composes it: the fleet's routes and the rollouts'
    server = ApiServer(MountedApi(ServerApi(store, TOKEN, ingest_stats=ingest.stats),
                                  RolloutApi(store, fleet=FLEET)), port=0).start()
    env = FleetEnv(broker, store, server.url, str(tmp_path / "fleet.db"))
    try:
        yield env
    finally:
        for dev in env.devices:
            dev.close()
        server.stop()
        alerts.stop()
        ingest.stop()
        link.stop()
        store.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (.ci/run does)")
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    out = Path(os.environ.get("LITEFLEET_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


class Console:
    """Console errors and uncaught exceptions of a page."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))


def new_page(browser: Any, **context: Any) -> tuple[Any, Any, Console]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, **context)
    page = ctx.new_page()
    page.set_default_timeout(WAIT_MS)
    return ctx, page, Console(page)


def wait_for(page: Any, js: str, arg: Any = None) -> Any:
    """Wait until the JS expression (a function of ``arg``) is truthy in the page; its value."""
    return page.wait_for_function(js, arg=arg, timeout=WAIT_MS).json_value()


def row(page: Any, device_id: str) -> Any:
    return page.locator(f'#device-rows tr[data-device-id="{device_id}"]')


# Tests ---------------------------------------------------------------------------------------

def test_overview_shows_the_ingested_fleet_and_follows_it_live(fleet_env, browser, shots):
    env = fleet_env
    cam1 = env.device("cam-1", model=DIGITS_V2, p95=5.0, temperature=55.0)
    cam2 = env.device("cam-2", model=DIGITS_V2, p95=5.5, temperature=60.0)
    env.device("jet-1", profile="jetson-gpu", groups=("field",), model=DIGITS_V3, engine=GPU_FALLBACK, p95=3.0,
               temperature=70.0)
    ctx, page, console = new_page(browser)
    page.goto(env.url("/"))

    # The token moved from the URL into this tab's sessionStorage.
    page.wait_for_selector('#device-rows tr[data-device-id="jet-1"]')
    assert "token" not in page.url
    assert page.evaluate("sessionStorage.getItem('litefleet.token')") == TOKEN

    # Every device with its model and delegate; all online.
    assert row(page, "cam-1").locator("td.model").inner_text() == "digits v2"
    assert row(page, "jet-1").locator("td.model").inner_text() == "digits v3"
    assert "xnnpack" in row(page, "jet-1").inner_text()
    for dev in ("cam-1", "cam-2", "jet-1"):
        assert row(page, dev).get_attribute("data-state") == "online"
    wait_for(page, "() => document.getElementById('n-online').textContent === '3'")
    assert page.locator("#n-total").inner_text() == "3"

    # Charts drawn from the series API: one line per model version, with data points.
    wait_for(page, "() => document.querySelectorAll('#p95-chart svg g.series path.line').length === 2")
    wait_for(page, "() => document.querySelectorAll('#ips-chart svg g.series path.line').length === 2")
    labels = page.locator("#p95-chart g.series").evaluate_all("els => els.map(e => e.dataset.label)")
    assert labels == ["digits v2", "digits v3"]
    points = page.locator("#p95-chart path.line").evaluate_all("els => els.map(e => +e.dataset.points)")
    assert all(n >= 1 for n in points), points
    bars = page.locator("#models-chart g.bar").evaluate_all("els => els.map(e => [e.dataset.label, +e.dataset.value])")
    assert bars == [["digits v2", 2], ["digits v3", 1]]
    assert page.locator("#updated").inner_text().startswith("updated")
    page.screenshot(path=str(shots / "overview.png"), full_page=True)

    # New telemetry: the table follows without a reload.
    loads_before = int(page.evaluate("document.body.dataset.loads"))
    cam1.send(p95=42.0)
    wait_for(page, "() => document.querySelector('#device-rows tr[data-device-id=\"cam-1\"] td.p95')"
                   "?.textContent.trim() === '42.00'")
    assert int(page.evaluate("document.body.dataset.loads")) > loads_before
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1   # updated in place

    # Too hot for its profile (rpi4-cpu: 80 °C): the alert engine opens an alert, the page shows it.
    cam2.send(temperature=84.5)
    page.wait_for_selector('#alerts li[data-kind="temperature"][data-device="cam-2"]')
    assert "temperature" in page.locator("#alerts").inner_text()

    # A deployment as it progresses: accepted, 50 %, then one installed and one failed.
    cam1.event("deploy_accepted", "deploy of digits v4 accepted; fetching blob 4c4c4c4c4c4c", "cmd-7f3a", blob="4c" * 32)
    cam2.event("deploy_accepted", "deploy of digits v4 accepted; fetching blob 4c4c4c4c4c4c", "cmd-7f3a", blob="4c" * 32)
    cam1.event("deploy_progress", "chunk 8 of 16 verified", "cmd-7f3a", name="digits", version=4, percent=50.0)
    deploy = page.locator('#deploys li[data-command="cmd-7f3a"]')
    deploy.wait_for()
    wait_for(page, "() => document.querySelector('#deploys li[data-command=\"cmd-7f3a\"]')?.dataset.pending === '2'")
    assert "digits v4" in deploy.inner_text()
    assert "deploying digits v4 · 50%" in row(page, "cam-1").inner_text()
    page.screenshot(path=str(shots / "overview-deploying.png"), full_page=True)
    cam1.event("installed", "digits v4 active", "cmd-7f3a", name="digits", version=4, sha256="4c" * 32)
    cam2.event("install_failed", "smoke test failed: output differs from the expected sample", "cmd-7f3a",
               code="smoke_failed", name="digits", version=4)
    wait_for(page, "() => { const li = document.querySelector('#deploys li[data-command=\"cmd-7f3a\"]');"
                   " return li && li.dataset.installed === '1' && li.dataset.failed === '1' && li.dataset.pending === '0'; }")
    widths = deploy.locator(".progress span").evaluate_all("els => els.map(e => [e.className, e.style.width])")
    assert widths == [["installed", "50%"], ["failed", "50%"]]

    # A new device appears by itself.
    env.device("cam-3", model=DIGITS_V2)
    row(page, "cam-3").wait_for()
    wait_for(page, "() => document.getElementById('n-total').textContent === '4'")

    # A device that dies: its last will marks it offline.
    cam2.crash()
    wait_for(page, "() => document.querySelector('#device-rows tr[data-device-id=\"cam-2\"]')?.dataset.state === 'offline'")
    assert "offline" in row(page, "cam-2").inner_text()
    assert page.locator("#n-offline").inner_text() == "1"
    page.screenshot(path=str(shots / "overview-final.png"), full_page=True)

    assert console.errors == [], console.errors
    ctx.close()


def test_device_page_opens_from_the_table_and_shows_engine_history_and_changes(fleet_env, browser, shots):
    env = fleet_env
    env.device("cam-1", model=DIGITS_V2)
    jet = env.device("jet-1", profile="jetson-gpu", groups=("field",), model=DIGITS_V3, engine=GPU_FALLBACK, p95=3.0,
                     temperature=70.0)
    jet.event("delegate_fallback", "GPU delegate missing; running on XNNPACK", "", delegate="gpu")
    ctx, page, console = new_page(browser)
    page.goto(env.url("/"))
    page.locator('#device-rows a[href^="/devices/jet-1?"]').click()
    page.wait_for_url(re.compile(r"/devices/jet-1\?refresh=1&window=900$"))     # same refresh and window
    assert page.locator("#device-title").inner_text() == "jet-1"

    # Identity, model, and the delegate chain with the reason the GPU was not used.
    wait_for(page, "() => document.getElementById('v-model').textContent.startsWith('digits v3')")
    assert page.locator("#v-state").inner_text() == "online"
    identity = page.locator("#identity").inner_text()
    assert "jetson-gpu" in identity and "field" in identity
    attempts = page.locator("#attempts tbody tr")
    assert attempts.count() == 2
    assert attempts.nth(0).get_attribute("data-outcome") == "missing"
    assert "install the GPU delegate" in attempts.nth(0).inner_text()
    page.wait_for_selector('#events li[data-kind="delegate_fallback"]')

    # Its own charts: raw telemetry every 0.5 s, several points per line.
    for chart in ("p95", "ips", "cpu", "temp"):
        wait_for(page, f"() => +(document.querySelector('#chart-{chart} path.line')?.dataset.points || 0) >= 3")
    assert page.locator("#chart-temp .legend").inner_text().startswith("temperature")

    # A new model version: the charts mark the change, the summary follows.
    jet.event("installed", "digits v4 active", "cmd-9b1c", name="digits", version=4, sha256="4c" * 32)
    jet.send(model=DIGITS_V4, p95=2.0)
    page.wait_for_selector("#chart-p95 g.marker")
    wait_for(page, "() => document.getElementById('v-model').textContent.startsWith('digits v4')")
    assert "digits v4" in page.locator("#chart-p95 g.marker").first.inner_html()
    wait_for(page, "() => document.querySelectorAll('#chart-p95 g.series').length === 2")
    page.wait_for_selector('#events li[data-kind="installed"]')
    page.screenshot(path=str(shots / "device.png"), full_page=True)

    # The device dies: the page says so.
    jet.crash()
    wait_for(page, "() => document.body.dataset.state === 'offline'")
    assert page.locator("#v-state").inner_text().startswith("offline")
    page.screenshot(path=str(shots / "device-offline.png"), full_page=True)

    # Phone-sized and dark: still one readable column.
    page.set_viewport_size({"width": 390, "height": 844})
    page.emulate_media(color_scheme="dark")
    assert page.evaluate("document.documentElement.scrollWidth") <= 392
    page.screenshot(path=str(shots / "device-phone-dark.png"), full_page=True)

    assert console.errors == [], console.errors
    ctx.close()


API_SERVER = r'''
import sys, threading
from fleet.api import ApiServer, ServerApi
from fleet.store import open_store
server = ApiServer(ServerApi(open_store(sys.argv[1]), sys.argv[2]), port=0).start()
print(server.url, flush=True)
threading.Event().wait()
'''


def test_wrong_token_and_unreachable_server_show_a_banner(fleet_env, browser, shots):
    env = fleet_env
    env.device("cam-1")
    ctx, page, _console = new_page(browser)     # 401s and refused connections are logged as errors here
    page.goto(env.url("/", token="not-the-token"))
    banner = page.locator("#banner")
    banner.wait_for(state="visible")
    assert banner.get_attribute("data-kind") == "token"
    assert "refused the token" in banner.inner_text()
    assert row(page, "cam-1").count() == 0                 # no data shown without the right token
    assert page.locator("#updated").inner_text() == "not authorised"
    page.screenshot(path=str(shots / "wrong-token.png"), full_page=True)

    # Pasting the right token into the banner's form recovers without the URL.
    page.fill("#banner input[name=token]", TOKEN)
    page.click("#banner button[type=submit]")
    row(page, "cam-1").wait_for()
    assert banner.is_hidden()
    ctx.close()

    # A server process that dies: the banner says so and the last figures stay on screen.
    # (A process, not ApiServer.stop(): the browser's keep-alive connection outlives the
    # listening socket, and a crash is what an operator meets.)
    server = subprocess.Popen([sys.executable, "-c", API_SERVER, env.db_url, TOKEN], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        ctx, page, _console = new_page(browser)
        page.goto(f"{url}/?refresh=1#token={TOKEN}")
        row(page, "cam-1").wait_for()
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        server.stdout.close()
    banner = page.locator("#banner")
    banner.wait_for(state="visible")
    assert banner.get_attribute("data-kind") == "network"
    assert "cannot be reached" in banner.inner_text()
    assert row(page, "cam-1").count() == 1
    page.screenshot(path=str(shots / "unreachable.png"), full_page=True)
    ctx.close()


# Rollouts ------------------------------------------------------------------------------------------

def api_post(env: FleetEnv, path: str, doc: dict) -> dict:
    import urllib.request
    request = urllib.request.Request(env.api_url + path, data=json.dumps(doc).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def rollout_item(rollout_id: str) -> str:
    return f'#rollout-list li[data-rollout="{rollout_id}"]'


def test_rollouts_show_their_stage_health_and_why_they_stopped_live(fleet_env, browser, shots, keys_dir):
    """A rollout created through the API and driven by the real runner (signed commands over the real
    broker; the simulated devices answer with the events a real agent sends) appears with its stage
    and progress, shows health against the baseline while soaking, and, once aborted with a reason,
    shows that reason: all without reloading the page."""
    from agent.mqtt import MqttLink
    from agent.protocol import keys
    from fleet.rollout_runner import RolloutRunner
    from fleet.rollout_store import RolloutStore
    from tests.support.agents import wait_for as wait_until

    env = fleet_env
    devices = {d: env.device(d, model=DIGITS_V2, p95=5.0) for d in ("cam-1", "cam-2", "cam-3")}
    link = MqttLink(env.broker.url, "rollout-runner-test", backoff=(0.1, 1.0))
    link.start()
    assert link.wait_connected(15)
    runner = RolloutRunner(env.store, link, FLEET, keys.load_private(keys_dir / "operator.key"),
                           interval_s=0.2).start()
    rollouts = RolloutStore(env.store)
    ctx, page, console = new_page(browser)
    try:
        page.goto(env.url("/"))
        page.locator("#rollout-list li.empty", has_text="No rollouts yet").wait_for()  # not the "loading…" line
        row(page, "cam-3").wait_for()                     # every device is in the store: the target is whole
        # Each device's baseline is its telemetry in the store when it is deployed to: have some first.
        wait_until(lambda: all(len([t for t in env.store.telemetry(d, since=0, resolution="raw") if t.get("count")])
                                    >= 2 for d in devices), 20, "two telemetry samples with traffic from every device")

        created = api_post(env, "/api/v1/rollouts", {
            "id": "ro-digits-v4", "target": "group:lab", "stages": "1,100%", "soak_s": 600,
            "health": "p95_latency_ms<=3*baseline", "min_samples": 2, "baseline_window_s": 120,
            "max_failures": "0", "install_timeout_s": 120, "stale_after_s": 60,
            "bundles": {"rpi4-cpu": {"blob": "4c" * 32, "name": "digits", "version": 4, "profile": "rpi4-cpu",
                                     "model_sha256": "4c" * 32}}})["rollout"]
        assert created["stages"] == 2 and created["target_devices"] == 3
        item = page.locator(rollout_item("ro-digits-v4"))
        wait_for(page, "() => document.querySelector('#rollout-list li[data-rollout=\"ro-digits-v4\"]')"
                       "?.dataset.state === 'deploying'")
        assert item.get_attribute("data-stage") == "1" and item.get_attribute("data-stages") == "2"
        text = item.inner_text()
        assert "digits v4" in text and "target group:lab" in text and "stage 1 of 2" in text
        assert "0 installed / 1 in stage / 3 devices" in text
        edges = item.locator(".rollout-bar i.edge").evaluate_all("els => els.map(e => [e.className, e.style.left])")
        assert edges == [["edge current", "33.3333%"]]                # stage 1 ends at 1 of 3 devices

        # The canary installs (as an agent reports it); the rollout soaks and judges its health.
        state = wait_for_state(rollouts, "ro-digits-v4", lambda s: all(not r.unsent for r in s.devices.values()
                                                                     if r.command_id))
        (canary,) = [r for r in state.devices.values() if r.command_id]
        dev = devices[canary.device_id]
        dev.send(model=DIGITS_V4)
        dev.event("installed", "digits v4 active", canary.command_id, name="digits", version=4, sha256="4c" * 32)
        wait_for(page, "() => { const li = document.querySelector('#rollout-list li[data-rollout=\"ro-digits-v4\"]');"
                       " return li && li.dataset.state === 'soaking' && li.dataset.installed === '1'"
                       " && /p95 5\\.00 ms vs baseline 5\\.00 ms .* within p95_latency_ms<=3\\*baseline/"
                       ".test(li.querySelector('.rollout-health')?.textContent); }")
        text = item.inner_text()
        assert "1 installed / 1 in stage / 3 devices" in text and "soaking" in text
        assert "of 600 s" in text
        widths = item.locator(".rollout-bar span").evaluate_all("els => els.map(e => [e.className, e.style.width])")
        assert widths == [["installed", "33.3333%"]]
        page.screenshot(path=str(shots / "rollout-soaking.png"), full_page=True)

        # The operator aborts it with a reason: the page says why, and follows the rollback.
        api_post(env, "/api/v1/rollouts/ro-digits-v4/abort", {"reason": "labels look wrong on line 2"})
        wait_for(page, "() => { const li = document.querySelector('#rollout-list li[data-rollout=\"ro-digits-v4\"]');"
                       " return li && li.dataset.state === 'rolling_back'; }")
        assert "labels look wrong on line 2" in item.locator(".rollout-reason").inner_text()
        state = wait_for_state(rollouts, "ro-digits-v4",
                               lambda s: s.devices[canary.device_id].rollback_command_id
                               and not s.devices[canary.device_id].unsent)
        dev.send(model=DIGITS_V2)
        dev.event("rolled_back", "rolled back from v4 to digits v2: labels look wrong on line 2",
                  state.devices[canary.device_id].rollback_command_id, name="digits", version=2)
        wait_for(page, "() => document.querySelector('#rollout-list li[data-rollout=\"ro-digits-v4\"]')"
                       "?.dataset.state === 'aborted'")
        reason = item.locator(".rollout-reason").inner_text()
        assert reason.startswith("Stopped:") and "labels look wrong on line 2" in reason
        assert "1 device(s) rolled back" in reason
        assert "1 rolled back" in item.inner_text() and "aborted" in item.locator(".tag.state").inner_text()
        assert item.get_attribute("class") == "stopped"
        assert page.evaluate("performance.getEntriesByType('navigation').length") == 1   # updated in place
        page.screenshot(path=str(shots / "rollout-aborted.png"), full_page=True)
        assert console.errors == [], console.errors
    finally:
        ctx.close()
        runner.stop()
        link.stop()


def wait_for_state(rollouts: Any, rollout_id: str, condition: Any) -> Any:
    """The stored rollout once ``condition(state)`` holds (the runner saved and sent what it decided)."""
    from tests.support.agents import wait_for as wait_until

    def reached() -> Any:
        state = rollouts.load(rollout_id)
        return state if condition(state) else None
    return wait_until(reached, WAIT_MS / 1000, f"rollout {rollout_id} in the store to reach the expected state",
                      interval=0.05)


# Model quality (docs/quality.md) ---------------------------------------------------------------

def drift_report(score: float, version: int = 2) -> dict[str, Any]:
    """The ``drift`` part of an agent's telemetry (docs/quality.md)."""
    return {"method": "psi", "score": score, "inputs": score, "outputs": score / 2, "window": 1000,
            "model": {"name": "digits", "version": version}}


def test_a_drifting_device_is_flagged_in_the_table_the_quality_panel_alerts_and_its_page(fleet_env, browser, shots):
    env = fleet_env
    feedback = {"model": {"name": "digits", "version": 2}, "labels": 40, "unmatched": 1, "classes": 2,
                "confusion": [[18, 2], [4, 16]]}
    steady = env.device("cam-s", model=DIGITS_V2)
    steady.send(extra={"drift": drift_report(0.03), "feedback": feedback})
    shifted = env.device("cam-d", model=DIGITS_V2)
    ctx, page, console = new_page(browser)
    try:
        page.goto(env.url("/"))
        wait_for(page, "() => document.querySelector('#device-rows tr[data-device-id=\"cam-s\"] td.drift')"
                       "?.textContent.trim() === '0.03'")
        assert row(page, "cam-s").locator("[data-drifting='1']").count() == 0
        assert page.locator("#n-drifting").inner_text() == "0"

        # cam-d starts seeing data unlike the calibration data: PSI 0.45, over the default 0.2.
        shifted.send(extra={"drift": drift_report(0.45)})
        wait_for(page, "() => document.querySelector('#device-rows tr[data-device-id=\"cam-d\"] "
                       "[data-drifting=\"1\"]') !== null")
        assert row(page, "cam-d").locator("td.drift").inner_text().split() == ["0.45", "drift"]
        wait_for(page, "() => document.getElementById('n-drifting').textContent === '1'")
        assert "bad" in page.locator("#n-drifting").evaluate("e => e.parentElement.className")

        # The quality panel: digits v2 with one drifting device, and the field accuracy of cam-s's labels.
        quality = page.locator('#quality-rows tr[data-model="digits v2"]')
        wait_for(page, "() => /1 drifting/.test(document.querySelector('#quality-rows tr[data-model=\"digits v2\"]')"
                       "?.textContent || '')")
        assert "cam-d" in quality.locator("td.drifting").inner_text()
        assert quality.locator("td.field-accuracy").inner_text() == "85.0%"        # (18 + 16) / 40

        # The alert engine opened a drift alert naming the device and the score.
        page.wait_for_selector('#alerts li[data-kind="drift"][data-device="cam-d"]')
        assert "data drift 0.45 (PSI) on digits v2" in page.locator('#alerts li[data-kind="drift"]').inner_text()
        page.screenshot(path=str(shots / "overview-drift.png"), full_page=True)

        # The device's own page flags it too.
        page.locator('#device-rows tr[data-device-id="cam-d"] th a').click()
        page.wait_for_url(re.compile(r"/devices/cam-d"))
        wait_for(page, "() => document.getElementById('card-drift').classList.contains('bad')")
        assert page.locator("#v-drift").inner_text().split() == ["0.45", "drift"]
        assert "digits v2" in page.locator('#quality-rows tr[data-model="digits v2"]').inner_text()
        page.screenshot(path=str(shots / "device-drift.png"), full_page=True)
        assert console.errors == [], console.errors
    finally:
        ctx.close()
