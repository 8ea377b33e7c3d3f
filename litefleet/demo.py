"""``litefleet demo``: a whole fleet on this machine, no root, no network, nothing else installed.

Starts a broker of its own (mosquitto with the project's generated TLS + ACL configuration when
mosquitto is installed, else amqtt, pure Python), makes keys, trains the digits CNN, converts it
for three device profiles, starts six agents as real processes, starts the fleet server, rolls
out v2 stage by stage with a live fleet table, injects a slow v3 that the rollout stops at its
first stage and rolls back, runs inferences through a device's local API, and ends with a
summary and the dashboard's address. Without ``--keep`` everything it started is stopped and
checked gone; with ``--keep`` it stays up until ``litefleet demo --stop``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("demo-out")
PROFILES = ["x86-cpu", "rpi4-cpu", "rpi-zero2w-cpu"]
HEALTH = "p95_latency_ms<=5*baseline,error_rate<1%"   # the slow v3 is ~30x; digits under install load ~1-3x


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="a fleet of six local devices: train, convert, staged rollout, bad model rolled back",
        description="Run a whole fleet on this machine: a broker of its own (mosquitto with the generated "
                    "TLS/ACL configuration when installed, else amqtt), keys, the digits CNN trained and "
                    "converted for three profiles, six agent processes, the fleet server, a staged rollout "
                    "of v2 with a live fleet table, a slow v3 that the rollout stops and rolls back, inferences "
                    "through a device's local API, and a summary with the dashboard's address.")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT,
                   help="working folder; trained models and bundles are cached there (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs of v1 (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="remove the working folder first (retrain, reconvert)")
    p.add_argument("--broker", metavar="URL", help="use this plain mqtt:// broker instead of starting one")
    p.add_argument("--broker-kind", choices=("auto", "mosquitto", "amqtt"), default="auto",
                   help="which broker to start: auto = mosquitto when installed, else amqtt (default: %(default)s)")
    p.add_argument("--soak", type=float, default=8.0, metavar="S",
                   help="seconds each stage of the good rollout stays healthy before the next (default: %(default)s)")
    p.add_argument("--keep", action="store_true",
                   help="leave the broker, server and agents running; stop them with `litefleet demo --stop`")
    p.add_argument("--stop", action="store_true", help="stop what `litefleet demo --keep` left running in --output")
    p.set_defaults(func=_demo)


class Steps:
    """Step headers with the elapsed time, and each step's duration for the summary."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.started = time.monotonic()
        self.durations: list[tuple[str, float]] = []
        self._current: tuple[str, float] | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, title: str) -> None:
        self.done()
        self._current = (title, time.monotonic())
        self.console.print(f"\n[bold cyan][{self.elapsed():5.1f}s] ==> {title}[/]")

    def note(self, text: str) -> None:
        self.console.print(f"  {text}", highlight=False)

    def done(self) -> None:
        if self._current is not None:
            self.durations.append((self._current[0], time.monotonic() - self._current[1]))
            self._current = None


def _console() -> Any:
    from rich.console import Console
    interactive = sys.stdout.isatty()
    return Console(width=shutil.get_terminal_size((120, 24)).columns if interactive else 140, highlight=False,
                   force_terminal=interactive or None)


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out: Path = args.output.resolve()
    console = _console()
    if args.stop:
        return stop_kept(out, console)
    run = Run(out, args, console)
    try:
        return run.main()
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: stopping everything[/]")
        run.keep = False
        return 130
    finally:
        run.shutdown()


# --stop ---------------------------------------------------------------------------------------

def pids_file(out: Path) -> Path:
    return out / "run" / "pids.json"


def read_pids(out: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads(pids_file(out).read_text()).items()}
    except (OSError, ValueError):
        return {}


def alive_pids(out: Path) -> dict[str, int]:
    """Recorded processes still running *and* still ours (their command line names OUT)."""
    import psutil
    alive = {}
    for name, pid in read_pids(out).items():
        try:
            if str(out) in " ".join(psutil.Process(pid).cmdline()):
                alive[name] = pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return alive


def leftovers(out: Path) -> list[str]:
    """Every process on this machine whose command line names OUT (none once the demo is stopped)."""
    import psutil
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if proc.info["pid"] != me and str(out / "run") in cmd:
            found.append(f"{proc.info['pid']}: {cmd[:160]}")
    return found


def stop_kept(out: Path, console: Any) -> int:
    from litefleet.demo_fleet import stop_pids
    alive = alive_pids(out)
    if not alive:
        console.print(f"nothing from a demo in {out} is running")
        return 0
    order = [n for n in alive if n.startswith("agent:")] + [n for n in ("server", "broker") if n in alive]
    for name in order:
        stop_pids([alive[name]])
        console.print(f"stopped {name} (pid {alive[name]})")
    left = leftovers(out)
    if left:
        console.print("[red]still running:[/]\n  " + "\n  ".join(left))
        return 1
    console.print("everything stopped")
    return 0


# the run ----------------------------------------------------------------------------------------

class Run:
    def __init__(self, out: Path, args: argparse.Namespace, console: Any) -> None:
        self.out = out
        self.args = args
        self.console = console
        self.keep = args.keep
        self.step = Steps(console)
        self.pids: dict[str, int] = {}
        self.broker: Any = None
        self.server: Any = None
        self.agents: dict[str, Any] = {}     # device id -> Popen
        self.devices: list[Any] = []
        self.load: Any = None
        self.results: dict[str, Any] = {}
        self.ok = False
        # a broker someone else runs may hold retained commands of an earlier demo: a fleet name of our own
        self.fleet = f"demo-{os.urandom(3).hex()}" if args.broker else "demo"

    # bookkeeping ---------------------------------------------------------------------------

    def record(self, name: str, pid: int | None) -> None:
        if pid:
            self.pids[name] = pid
            pids_file(self.out).write_text(json.dumps(self.pids, indent=1))

    def prepare_dirs(self) -> None:
        if self.args.fresh and self.out.exists():
            alive = alive_pids(self.out)
            if alive:
                raise SystemExit(f"a demo in {self.out} is still running (pids {sorted(alive.values())}); "
                                 f"stop it first: litefleet demo --stop -o {self.out}")
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        run = self.out / "run"
        alive = alive_pids(self.out)
        if alive:
            raise SystemExit(f"a demo in {self.out} is still running (pids {sorted(alive.values())}); "
                             f"stop it first: litefleet demo --stop -o {self.out}")
        shutil.rmtree(run, ignore_errors=True)   # the fleet's state is per run; models and bundles are cached
        run.mkdir(parents=True)

    # main ----------------------------------------------------------------------------------------

    def main(self) -> int:
        from litefleet import demo_models
        from litefleet.demo_broker import start_broker
        from litefleet.demo_fleet import DEVICES, GROUP

        step, note = self.step, self.step.note
        self.prepare_dirs()
        self.console.print(f"[bold]litefleet demo[/] in {self.out}: six devices, three profiles, two rollouts")

        step("keys: release signs bundles, operator signs commands, root signs key lists")
        key_dir = self.make_keys()

        step("models: digits v1 and v2 trained, converted and signed for " + ", ".join(PROFILES) +
             "; v3 the bad release")
        models = demo_models.prepare(self.out, PROFILES, epochs=self.args.epochs, key_dir=key_dir, progress=note)

        step("broker")
        self.broker = start_broker(self.args.broker_kind, self.args.broker, self.out / "run" / "broker", self.fleet,
                                   [(d, (GROUP,), p) for d, p in DEVICES])
        self.record("broker", self.broker.pid)
        note(f"{self.broker.url}: {self.broker.note}; fleet {self.fleet!r} (topics lf/v1/{self.fleet}/...)")

        step("devices: six agents as real processes, each with its own state, keys, config and socket")
        self.start_devices(models, key_dir)

        step("fleet server: repository, telemetry ingest, API and dashboard, rollouts")
        self.start_server(key_dir)

        step(f"rollout 1: digits v2, stages 1 -> 50% -> 100%, {self.args.soak:g} s soak, health {HEALTH}")
        good = self.rollout("digits-v2", models.bundles[2], soak=self.args.soak)
        self.results["good"] = good
        versions = self.versions()
        if good["state"] != "completed" or set(versions.values()) != {2}:
            raise RuntimeError(f"rollout 1 ended {good['state']}: {good.get('reason')}; versions {versions}")
        note(f"[green]completed: {len(versions)} of {len(versions)} devices on v2[/]")

        step("rollout 2: digits v3, a wide CNN, ~30x slower here (signed, passes its smoke test)")
        bad = self.rollout("digits-v3-slow", models.bundles[3], soak=max(20.0, self.args.soak))
        self.results["bad"] = bad
        if bad["state"] != "aborted":
            raise RuntimeError(f"rollout 2 was expected to stop, it ended {bad['state']}: {bad.get('reason')}")
        rolled = [d for d in bad["devices"] if d["state"] == "rolled_back"]
        note(f"[red]stopped at stage {bad['stage']}:[/] {bad.get('breach') or bad.get('reason')}")
        from litefleet.demo_fleet import wait_until
        wait_until(lambda: set(self.versions().values()) == {2}, 60, "every device back on v2")
        note(f"[green]rolled back: {', '.join(d['device_id'] for d in rolled) or '-'} -> v2; "
             f"the other {len(self.devices) - len(rolled)} device(s) never received v3; all six serve v2[/]")

        step("inference through a device's local API")
        self.predict(models.evaluation)

        step("summary")
        self.summary(models)
        self.ok = True
        return 0

    def make_keys(self) -> Path:
        from agent.protocol import keys
        key_dir = self.out / "keys"
        for role in keys.ROLES:
            if not (key_dir / f"{role}.key").exists():
                keys.generate(role, key_dir)
            self.step.note(f"{role:8s} {keys.load_public(key_dir / f'{role}.pub').key_id}  {key_dir / (role + '.key')}")
        return key_dir

    def start_devices(self, models: Any, key_dir: Path) -> None:
        import numpy as np

        from litefleet.demo_fleet import DEVICES, Load, agent_serving, install_locally, start_agent, wait_until, \
            write_device
        root = self.out / "run" / "devices"
        for device_id, profile in DEVICES:
            device = write_device(root / device_id, device_id, profile, key_dir, self.broker, self.fleet)
            install_locally(device, models.bundles[1][profile], key_dir)
            self.devices.append(device)
        self.step.note(f"v1 installed on each (as provisioning would); configs in {root}/*/agent.toml")
        for device in self.devices:
            proc = start_agent(device)
            self.agents[device.device_id] = proc
            self.record(f"agent:{device.device_id}", proc.pid)
        for device in self.devices:
            wait_until(lambda d=device: agent_serving(d, self.agents[d.device_id]), 60,
                       f"agent {device.device_id} to serve")
            self.step.note(f"{device.device_id:7s} {device.profile:15s} pid {self.agents[device.device_id].pid:<7d} "
                           f"socket {device.socket}")
        sample = np.load(models.evaluation)["x"][0].reshape(8, 8, 1).tolist()
        self.load = Load(self.devices, sample)
        self.step.note("a local application on each device sends ~20 inference requests/s to its agent")

    def start_server(self, key_dir: Path) -> None:
        from litefleet.demo_fleet import Server, wait_until
        self.server = Server(self.out / "run" / "server", key_dir, self.broker, self.fleet).start()
        self.record("server", self.server.proc.pid)
        self.step.note(f"API {self.server.url} (pid {self.server.proc.pid}), log {self.server.log}")
        since = time.time()

        def reporting() -> bool:
            devices = {d["device_id"]: d for d in self.server.devices()}
            if len(devices) < len(self.devices) or not all(d.get("online") for d in devices.values()):
                return False
            for device in self.devices:   # a baseline: telemetry with traffic since the server started
                rows = self.server.get(f"/api/v1/devices/{device.device_id}/telemetry?since={since}"
                                       f"&resolution=raw").get("telemetry", [])
                if sum(1 for r in rows if (r.get("count") or 0) > 0) < 4:
                    return False
            return True
        wait_until(reporting, 90, "all six devices online with telemetry", interval=0.5)
        self.step.note("all six devices online, on v1, reporting telemetry every 0.5 s")

    def versions(self) -> dict[str, Any]:
        return {d["device_id"]: (d.get("model") or {}).get("version") for d in self.server.devices()}

    def rollout(self, rollout_id: str, bundles: dict[str, Path], *, soak: float) -> dict[str, Any]:
        from litefleet.demo_fleet import GROUP
        spec = {"id": rollout_id, "target": f"group:{GROUP}", "stages": "1,50%,100%", "soak_s": soak,
                "max_failures": "0", "health": HEALTH, "on_breach": "abort", "install_timeout_s": 90.0,
                "stale_after_s": 30.0, "min_samples": 6, "baseline_window_s": 60.0, "command_ttl_s": 900.0}
        self.step.note(f"litefleet rollout start {' '.join(p.name for p in bundles.values())} --target group:{GROUP} "
                       f"--stages 1,50%,100% --soak {soak:g}s --max-failures 0 --health '{HEALTH}' --on-breach abort")
        created = self.server.start_rollout(list(bundles.values()), **spec)
        self.step.note(f"created: {created['reason']}")
        return self.follow(rollout_id, timeout=150)

    def follow(self, rollout_id: str, timeout: float) -> dict[str, Any]:
        """A live fleet table until the rollout ends; each change of state or stage also as a line."""
        from rich.live import Live
        deadline = time.monotonic() + timeout
        last = None
        rollout = self.server.rollout(rollout_id)
        with Live(self.table(rollout), console=self.console, refresh_per_second=4, transient=False) as live:
            while True:
                rollout = self.server.rollout(rollout_id)
                key = (rollout["state"], rollout.get("stage"))
                if key != last:
                    last = key
                    live.console.print(f"  [{self.step.elapsed():5.1f}s] {rollout_id}: {rollout['state']} stage "
                                       f"{rollout.get('stage') or 0}/{rollout.get('stages')}: "
                                       f"{rollout.get('reason')}", highlight=False)
                live.update(self.table(rollout))
                if rollout["state"] in ("completed", "aborted", "paused"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollout {rollout_id} did not end within {timeout:g} s: {rollout['reason']}")
                time.sleep(0.5)   # the table's refresh period
        self.console.print()
        return rollout

    def table(self, rollout: dict[str, Any]) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text
        try:
            devices = {d["device_id"]: d for d in self.server.devices()}
        except Exception:  # noqa: BLE001 - a slow answer: show the last rollout state anyway
            devices = {}
        in_rollout = {d["device_id"]: d for d in rollout.get("devices") or []}
        versions = rollout.get("versions") or {}
        title = (f"{rollout['id']}: {rollout['state'].upper()} - stage {rollout.get('stage') or 0}/"
                 f"{rollout.get('stages')} (up to {rollout.get('stage_target')} of {rollout.get('target_devices')} "
                 f"devices) - {rollout.get('model')} v" + "/".join(sorted({str(v) for v in versions.values()})))
        table = Table(title=title, title_justify="left", header_style="bold")
        for column, justify in (("device", "left"), ("profile", "left"), ("online", "left"), ("model", "left"),
                                ("delegate", "left"), ("p95 ms", "right"), ("inf/s", "right"),
                                ("rollout stage", "right"), ("rollout state", "left")):
            table.add_column(column, justify=justify)
        for device in self.devices:
            d = devices.get(device.device_id, {})
            r = in_rollout.get(device.device_id, {})
            model = d.get("model") or {}
            state = r.get("state") or "-"
            style = {"installed": "green", "rolled_back": "yellow", "failed": "red", "deploying": "cyan",
                     "rolling_back": "yellow"}.get(state, "")
            p95, rate = d.get("p95_ms"), d.get("inferences_per_s")
            table.add_row(device.device_id, device.profile,
                          Text("online", style="green") if d.get("online") else Text("offline", style="red"),
                          f"{model.get('name', '-')} v{model.get('version', '?')}", str(d.get("delegate") or "-"),
                          f"{p95:.2f}" if isinstance(p95, (int, float)) else "-",
                          f"{rate:.1f}" if isinstance(rate, (int, float)) else "-",
                          "" if r.get("stage") is None else str(r["stage"] + 1), Text(state, style=style))
        parts = [table]
        if rollout.get("breach"):
            parts.append(Text(f"breach: {rollout['breach']}", style="bold red"))
        return Group(*parts)

    def predict(self, evaluation: Path) -> None:
        import numpy as np

        from agent.commands.predict import ApiClient
        device = self.devices[0]
        data = np.load(evaluation)
        x, y = data["x"][:12], data["y"][:12]
        client = ApiClient(unix_socket=str(device.socket))
        started = time.monotonic()
        answer: dict[str, Any] = {}
        preds = []
        for i in range(len(x)):    # one request per digit, as an application would send them
            body = json.dumps({"instances": [x[i].reshape(8, 8, 1).tolist()]}).encode()
            answer = client.json("POST", "/v1/models/digits:predict", body, {"Content-Type": "application/json"})
            preds.append(int(np.argmax(np.asarray(answer["predictions"][0]))))
        ms = (time.monotonic() - started) * 1000 / len(x)
        right = sum(int(p == t) for p, t in zip(preds, y))
        self.results["predictions"] = {"right": right, "total": len(x)}
        model = answer.get("model_version") or "?"
        self.step.note(f"POST /v1/models/digits:predict on {device.device_id} ({device.socket}), "
                       f"digits v{model}, {ms:.1f} ms per request:")
        self.step.note("label      " + " ".join(f"{int(t)}" for t in y))
        self.step.note("predicted  " + " ".join(f"{p}" for p in preds) + f"   ({right}/{len(x)} right)")
        self.step.note(f"the same from a shell: litefleet-agent predict --socket {device.socket} "
                       f"--data '{{\"instances\": [...]}}'")

    def summary(self, models: Any) -> None:
        from rich.table import Table
        good, bad = self.results["good"], self.results["bad"]
        self.step.done()
        table = Table(title="what ran", title_justify="left", header_style="bold", show_header=False)
        table.add_column("step")
        table.add_column("time", justify="right")
        for title, seconds in self.step.durations:
            table.add_row(title.split(":")[0], f"{seconds:5.1f} s")
        table.add_row("total so far", f"{self.step.elapsed():5.1f} s")
        self.console.print(table)
        note = self.step.note
        note(f"rollout 1 {good['id']}: {good['state']} - {good['reason']}")
        note(f"rollout 2 {bad['id']}: {bad['state']} at stage {bad['stage']} - {bad.get('breach') or bad['reason']}")
        note(f"load: {self.load.requests} local inference requests served, {self.load.errors} failed")
        note(f"broker:  {self.broker.url} ({self.broker.kind})")
        note(f"server:  {self.server.url}, data {self.server.data_dir}, log {self.server.log}")
        note(f"devices: {self.out / 'run' / 'devices'} (agent.toml, state/, agent.log, api.sock)")
        note(f"bundles: {self.out / 'bundles'}; keys: {self.out / 'keys'}")
        self.console.print(f"\n[bold]dashboard:[/] {self.server.dashboard_url()}", highlight=False, soft_wrap=True)
        self.console.print(f"fleet table: litefleet fleet status --server {self.server.url} "
                           f"--token-file {self.server.data_dir / 'api-token'}", highlight=False, soft_wrap=True)

    # shutdown --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        from litefleet.demo_fleet import stop_pids
        if self.load is not None:
            self.load.stop()
        total = self.step.elapsed()
        if self.keep and self.ok:
            self.console.print(f"\n[bold]--keep:[/] broker, server and six agents stay up (pids "
                               f"{', '.join(str(p) for p in self.pids.values())}).\n"
                               f"(the demo's inference load stopped with it)\n"
                               f"stop them with: litefleet demo --stop -o {self.out}")
            self.console.print(f"demo finished in {total:.0f} s")
            return
        self.console.print(f"\n[{self.step.elapsed():5.1f}s] stopping: agents, server, broker")
        stop_pids([p.pid for p in self.agents.values()])
        if self.server is not None and self.server.proc is not None:
            stop_pids([self.server.proc.pid])
        if self.broker is not None and self.broker.stop is not None:
            self.broker.stop()
        import psutil
        children = psutil.Process().children(recursive=True)
        left = leftovers(self.out)
        if children or left:
            self.console.print("[red]still running after stop:[/] " + "; ".join(
                [f"{c.pid} {' '.join(c.cmdline())[:120]}" for c in children] + left))
        else:
            self.console.print("stopped; nothing left running")
        self.console.print(f"demo {'finished' if self.ok else 'FAILED'} in {total:.0f} s")


if __name__ == "__main__":
    sys.exit(0)
