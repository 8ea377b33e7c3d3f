"""Benchmark: an idle agent with a model loaded, CPU and memory, beside two idle baselines.

Three real processes are sampled with psutil over the same window (60 s; --quick: 5 s):

* the agent: ``litefleet-agent run --config FILE`` (agent/daemon.py) on a device directory in
  a temp dir, standalone (no broker), serving MobileNetV2 full int8 installed from a signed
  bundle with ``litefleet-agent install-bundle``; one predict is made before the window so
  its interpreters have run;
* raw interpreter idle: a Python process that loaded the same model file in ai-edge-litert
  (2 threads), invoked it once and sleeps;
* bare Python sleeping.

CPU is (user + system time used in the window) / wall time, in percent of one core. Goal: the
agent below 1%.

    .venv/bin/python -m bench.agent_idle [--quick] [--json]
"""

from __future__ import annotations

import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import FULL, ROOT, SMALL, Report, fmt_ratio, log, mobilenet, parse_args, ratio

MAX_CPU_PERCENT = 1.0
MODEL_NAME = "mobilenet"

_BARE = "import time; print('ready', flush=True); time.sleep(10**6)"
_RAW = """
import sys, time
import numpy as np
from ai_edge_litert.interpreter import Interpreter
interp = Interpreter(model_path=sys.argv[1], num_threads=2)
interp.allocate_tensors()
d = interp.get_input_details()[0]
interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
interp.invoke()
print("ready", flush=True)
time.sleep(10**6)
"""


def start_ready(argv: list[str]) -> subprocess.Popen:
    """Start a baseline process and wait for its 'ready' line."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"{argv[:3]} did not start (said {line!r}, exit {proc.poll()})")
    return proc


def predict_once(sock_path: Path, shape: list[int]) -> int:
    """One predict over the agent's Unix socket; returns the HTTP status."""
    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(60)
            self.sock.connect(str(sock_path))
    from agent.api import encode_npy
    conn = Conn("localhost")
    body = encode_npy(np.zeros(shape, np.float32))
    conn.request("POST", f"/v1/models/{MODEL_NAME}:predict", body=body,
                 headers={"Content-Type": "application/x-npy"})
    status = conn.getresponse().status
    conn.close()
    return status


def start_agent(tmp: Path, model: bytes):
    """A device directory, a signed bundle installed with install-bundle, then ``litefleet-agent run``."""
    from agent.protocol import keys
    from tests.support.agents import AgentProcess, make_device
    from tests.support.bundles import make_bundle
    keys_dir = tmp / "keys"
    keys_dir.mkdir()
    for role in keys.ROLES:
        keys.generate(role, keys_dir)
    device = make_device(tmp / "device", keys_dir, telemetry_interval_s=30.0)
    bundle = make_bundle(tmp / "mobilenet.lfb", model, keys.load_private(keys_dir / "release.key"),
                         name=MODEL_NAME, mode="int8", profile="x86-cpu")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "agent.cli", "install-bundle", str(bundle), "--config",
                           str(device.config)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"install-bundle failed ({done.returncode}): {done.stdout}{done.stderr}")
    agent = AgentProcess(device)
    status = agent.wait_serving(timeout=120)
    return agent, device, status


def sample(procs: dict[str, psutil.Process], seconds: float) -> dict[str, dict[str, Any]]:
    """CPU used and RSS of each process over the same window (RSS read every 0.5 s)."""
    start_cpu = {n: p.cpu_times() for n, p in procs.items()}
    rss: dict[str, list[int]] = {n: [] for n in procs}
    t0 = time.monotonic()
    deadline = t0 + seconds
    while True:
        for n, p in procs.items():
            rss[n].append(p.memory_info().rss)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(0.5, left))   # the sampling period of a measurement, not synchronisation
    wall = time.monotonic() - t0
    out = {}
    for n, p in procs.items():
        end = p.cpu_times()
        used = (end.user - start_cpu[n].user) + (end.system - start_cpu[n].system)
        try:
            uss = p.memory_full_info().uss
        except (psutil.AccessDenied, AttributeError):
            uss = None
        out[n] = {"cpu_percent": 100.0 * used / wall, "cpu_s": used, "wall_s": wall,
                  "rss_mb_median": statistics.median(rss[n]) / 1e6, "rss_mb_max": max(rss[n]) / 1e6,
                  "uss_mb": None if uss is None else uss / 1e6, "threads": p.num_threads()}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    spec = SMALL if args.quick else FULL
    seconds = 5.0 if args.quick else 60.0
    path, _ = mobilenet(spec, "int8", progress=log)
    model = path.read_bytes()

    started: list[subprocess.Popen] = []
    agent = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp_name:
            tmp = Path(tmp_name)
            log("starting the agent (install-bundle, then run)")
            agent, device, status = start_agent(tmp, model)
            interp_shape = [1, spec.size, spec.size, 3]
            code = predict_once(device.socket, interp_shape)
            if code != 200:
                raise RuntimeError(f"the agent answered {code} to a predict:\n{agent.log()[-2000:]}")
            started.append(start_ready([sys.executable, "-c", _RAW, str(path)]))
            started.append(start_ready([sys.executable, "-c", _BARE]))
            procs = {"agent": psutil.Process(agent.proc.pid), "raw": psutil.Process(started[0].pid),
                     "bare": psutil.Process(started[1].pid)}
            log(f"sampling for {seconds:g} s")
            result = sample(procs, seconds)
            alive = agent.proc.poll() is None
            agent.stop()
            agent = None
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
        if agent is not None:
            agent.kill()

    report = Report(f"idle agent serving {spec.label} full int8, {seconds:g} s window",
                    ["process", "CPU % of a core", "CPU s", "RSS MB (median)", "RSS MB (max)", "USS MB", "threads",
                     "RSS vs raw", "CPU vs raw (points)"])
    rows = (("agent", "litefleet-agent run (daemon, model loaded)"),
            ("raw", "raw interpreter loaded, idle (baseline)"), ("bare", "bare Python sleeping (baseline)"))
    raw = result["raw"]
    for key, label in rows:
        r = result[key]
        report.add(label, r["cpu_percent"], r["cpu_s"], r["rss_mb_median"], r["rss_mb_max"], r["uss_mb"],
                   r["threads"], fmt_ratio(ratio(r["rss_mb_median"], raw["rss_mb_median"])),
                   f"{r['cpu_percent'] - raw['cpu_percent']:+.3f}")
    model_doc = status.get("model") if isinstance(status.get("model"), dict) else {}
    served = f"{model_doc.get('name', MODEL_NAME)} v{model_doc.get('version', '?')}"
    a = result["agent"]
    report.verdict("idle agent CPU", a["cpu_percent"] < MAX_CPU_PERCENT and alive,
                   f"{a['cpu_percent']:.3f}% of one core over {a['wall_s']:.1f} s (goal < {MAX_CPU_PERCENT:g}%)"
                   + ("" if alive else "; the agent died during the window"))
    report.notes.append(f"agent: standalone (no broker), telemetry every 30 s, api workers 2, profile x86-cpu; "
                        f"state dir in a temp dir; served {served}; one predict before the window")
    report.notes.append("the three processes are sampled over the same window; CPU = (user+system) / wall")
    report.data["results"] = result
    report.print(args.json)
    return 0 if all(p for _, p, _ in report.verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
