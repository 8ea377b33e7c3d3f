"""Benchmark: the agent's inference path on MobileNetV2 full int8 against a raw Interpreter.invoke().

Three comparisons, each against the raw figure measured in the same run:

1. In process: ``LoadedModel.predict_raw`` (int8 in and out) and ``LoadedModel.predict`` (float
   in, quantized by the agent; output dequantized) vs a raw set_tensor/invoke/get_tensor loop
   on the very interpreter the agent loaded (same runtime, same 2 threads). The three are run
   in alternating rounds, rotating the order, so drift in the machine hits all of them.
   Target: at most 5% overhead. Beside them, what the inference API adds after the model ran:
   ``predict`` + the drift statistics (``agent.drift.DriftMonitor.observe`` against a data
   profile of the model) + remembering the prediction for field labels, and ``observe`` alone.
2. Over HTTP: ``agent.api.InferenceServer`` round trips (JSON and binary .npy bodies) on one
   keep-alive ``http.client`` connection, over TCP and over the Unix socket.
3. Runtime choice: ``agent.runtime.select_runtime()`` picks ai-edge-litert in this environment;
   its latency vs tflite-runtime 2.14 (its own numpy<2 environment, subprocess) on the same file.

    .venv/bin/python -m bench.agent_inference [--quick] [--json]
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (FULL, SMALL, THREADS, Report, Tflite214Rounds, fmt_ratio, log, mobilenet, parse_args, ratio,
                          summary, time_calls)

MAX_OVERHEAD = 0.05
MAX_DRIFT_OVERHEAD = MAX_OVERHEAD   # the drift statistics per inference, against a raw invoke
MODEL_NAME = "mobilenet"
TOKEN = "bench-token-0123456789abcdef"


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (keep-alive like the TCP one)."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def load_agent_model(model: bytes):
    """The model as the agent loads it: a manifest built from the model, profile x86-cpu (2 threads)."""
    from agent.engine import load_model
    from agent.protocol.manifest import Manifest
    from agent.protocol.profiles import load_profile
    from agent.runtime import select_runtime
    from tests.support.bundles import manifest_for
    profile = load_profile("x86-cpu")
    runtime = select_runtime(profile.runtime.get("allowed"))
    manifest = Manifest.from_dict(manifest_for(model, name=MODEL_NAME, mode="int8", profile=profile.name))
    return load_model(model, manifest, profile, runtime=runtime, workers=1), runtime, profile


def agent_interpreter(loaded) -> Any:
    """The interpreter inside the agent's pool, for the raw loop (same instance, same threads)."""
    worker = loaded._pool.get()
    loaded._pool.put(worker)
    return worker.interpreter


def alternate(contestants: dict[str, Callable[[], Any]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Run each contestant ``per_round`` times per round, rotating the order each round."""
    names = list(contestants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        time_calls(contestants[name], 0, 5)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name] += time_calls(contestants[name], per_round, 0)
    return samples


def http_caller(conn: http.client.HTTPConnection, body: bytes, content_type: str, accept: str) -> Callable[[], bytes]:
    path = f"/v1/models/{MODEL_NAME}:predict"
    headers = {"Content-Type": content_type, "Accept": accept, "Content-Length": str(len(body))}
    if not isinstance(conn, UnixHTTPConnection):
        headers["Authorization"] = f"Bearer {TOKEN}"    # the TCP listener needs a bearer token

    def call() -> bytes:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"predict answered {response.status}: {data[:300]!r}")
        return data
    return call


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    spec = SMALL if args.quick else FULL
    rounds, per_round = (6, 10) if args.quick else (20, 50)
    http_rounds, http_per_round = (2, 5) if args.quick else (5, 20)
    rounds_214, repeats_214 = (2, 10) if args.quick else (10, 100)

    path, _ = mobilenet(spec, "int8", progress=log)
    model = path.read_bytes()
    loaded, runtime, profile = load_agent_model(model)
    interp = agent_interpreter(loaded)
    in_spec, out_spec = loaded.input_specs[0], loaded.output_specs[0]
    rng = np.random.default_rng(0)
    x_float = rng.uniform(-1, 1, size=in_spec.shape).astype(np.float32)
    x_int8 = in_spec.quantize(x_float)
    inp_index, out_index = in_spec.index, out_spec.index

    def raw() -> Any:
        interp.set_tensor(inp_index, x_int8)
        interp.invoke()
        return interp.get_tensor(out_index)

    # What an application would write itself around a raw interpreter to get real values:
    # quantize the float input and dequantize the output (float32 numpy). The fair baseline for predict().
    in_scale, in_zero = np.float32(in_spec.scale.reshape(-1)[0]), np.float32(in_spec.zero_point.reshape(-1)[0])
    out_scale, out_zero = np.float32(out_spec.scale.reshape(-1)[0]), np.float32(out_spec.zero_point.reshape(-1)[0])

    def raw_real() -> Any:
        q = np.clip(np.rint(x_float / in_scale + in_zero), -128, 127).astype(np.int8)
        interp.set_tensor(inp_index, q)
        interp.invoke()
        return (interp.get_tensor(out_index).astype(np.float32) - out_zero) * out_scale

    # the agent answers what the raw loop answers
    np.testing.assert_array_equal(loaded.predict_raw([x_int8])[0], raw())

    # what the inference API does after the model ran: drift statistics and the prediction's id
    from agent.drift import DriftMonitor
    from agent.feedback import FeedbackBook
    from converter import datastats as host
    log("data profile of the model on 16 random frames (what `litefleet convert` records)")
    profile = host.profile(model, rng.uniform(-1, 1, size=(16, *in_spec.shape[1:])).astype(np.float32))
    monitor = DriftMonitor(profile, [in_spec.shape], [out_spec.shape], window=1000)
    book = FeedbackBook()
    classes = out_spec.shape[-1]
    def predict_drift() -> Any:
        outputs = loaded.predict([x_float])
        monitor.observe([x_float], outputs)
        return book.remember(MODEL_NAME, 1, classes, outputs[0].reshape(-1, classes).argmax(axis=1).tolist())

    def observe_after_predict(n: int) -> list[float]:
        """observe() timed on its own, right after each inference (the frame no longer in the cache)."""
        samples = []
        for _ in range(n):
            outputs = loaded.predict([x_float])
            started = time.perf_counter()
            monitor.observe([x_float], outputs)
            samples.append((time.perf_counter() - started) * 1000.0)
        return samples

    log(f"in-process: {rounds} rounds x {per_round} calls each, alternating")
    inproc = alternate({"raw": raw, "predict_raw": lambda: loaded.predict_raw([x_int8]),
                        "raw_real": raw_real, "predict": lambda: loaded.predict([x_float]),
                        "predict_drift": predict_drift}, rounds, per_round)
    observe_ms = summary(observe_after_predict(rounds * per_round))
    assert monitor.report() is not None
    stats = {name: summary(s) for name, s in inproc.items()}
    raw_ms = stats["raw"]["median_ms"]

    # HTTP round trips, interleaved with raw rounds too
    from agent.access import TokenSet
    from agent.api import InferenceServer, encode_npy
    from agent.model_slot import ModelSlot
    json_body = json.dumps({"instances": x_float.tolist()}).encode()
    npy_body = encode_npy(x_float)
    npy_int8_body = encode_npy(x_int8)
    slot = ModelSlot(loaded)
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        sock_path = str(Path(tmp) / "api.sock")
        server = InferenceServer(slot, tcp=("127.0.0.1", 0), unix_socket=sock_path,
                                 tokens=TokenSet.parse(f"bench {TOKEN}", "<bench>"))
        server.start()
        try:
            host, port = server.tcp_address
            tcp, unix = http.client.HTTPConnection(host, port, timeout=60), UnixHTTPConnection(sock_path)
            calls = {
                "raw": raw,
                "HTTP JSON / TCP": http_caller(tcp, json_body, "application/json", "application/json"),
                "HTTP .npy float32 / TCP": http_caller(tcp, npy_body, "application/x-npy", "application/x-npy"),
                "HTTP JSON / Unix": http_caller(unix, json_body, "application/json", "application/json"),
                "HTTP .npy float32 / Unix": http_caller(unix, npy_body, "application/x-npy", "application/x-npy"),
                "HTTP .npy int8 / Unix": http_caller(unix, npy_int8_body, "application/x-npy", "application/x-npy"),
            }
            # the .npy answer is the model's dequantized output
            answer = np.load(io.BytesIO(calls["HTTP .npy int8 / Unix"]()), allow_pickle=False)
            np.testing.assert_allclose(answer, out_spec.dequantize(raw()), rtol=0, atol=1e-6)
            log(f"HTTP: {http_rounds} rounds x {http_per_round} calls each, alternating with raw")
            http_samples = alternate(calls, http_rounds, http_per_round)
            tcp.close()
            unix.close()
        finally:
            server.stop()
    http_stats = {name: summary(s) for name, s in http_samples.items()}
    http_raw_ms = http_stats.pop("raw")["median_ms"]

    log("tflite-runtime 2.14 on the same file, alternating rounds with the raw loop")
    old_rounds = Tflite214Rounds(path)
    pick_samples: list[float] = []
    old_samples: list[float] = []
    try:
        for _ in range(rounds_214):
            pick_samples += time_calls(raw, per_round, 0)
            if old_rounds.ok:
                old_samples += old_rounds.round(repeats_214 // rounds_214)
    finally:
        old_rounds.close()
    old = ({"ok": True, "version": old_rounds.version, **summary(old_samples)} if old_samples
           else {"ok": False, "version": old_rounds.version, "error": old_rounds.error})
    pick = summary(pick_samples)
    loaded.close()

    report = Report(f"agent inference, {spec.label} full int8, {runtime.name} {runtime.version}, {THREADS} threads",
                    ["path", "median ms", "p90 ms", "raw median ms", "ratio vs raw", "overhead"])
    report.add("raw Interpreter.invoke (baseline)", raw_ms, stats["raw"]["p90_ms"], raw_ms, fmt_ratio(1.0), "-")
    verdicts = []
    r = stats["predict_raw"]["median_ms"] / raw_ms
    report.add("LoadedModel.predict_raw (int8 in/out)", stats["predict_raw"]["median_ms"],
               stats["predict_raw"]["p90_ms"], raw_ms, fmt_ratio(r), f"{100 * (r - 1):+.1f}%")
    verdicts.append(("LoadedModel.predict_raw overhead vs raw invoke", r - 1 <= MAX_OVERHEAD,
                     f"{100 * (r - 1):+.1f}% (limit {100 * MAX_OVERHEAD:.0f}%)"))
    real_ms = stats["raw_real"]["median_ms"]
    report.add("raw invoke + numpy (de)quantize (baseline for predict)", real_ms, stats["raw_real"]["p90_ms"],
               raw_ms, fmt_ratio(real_ms / raw_ms), f"{100 * (real_ms / raw_ms - 1):+.1f}%")
    r_raw, r_real = stats["predict"]["median_ms"] / raw_ms, stats["predict"]["median_ms"] / real_ms
    report.add("LoadedModel.predict (float in/out)", stats["predict"]["median_ms"], stats["predict"]["p90_ms"],
               raw_ms, fmt_ratio(r_raw), f"{100 * (r_raw - 1):+.1f}% ({100 * (r_real - 1):+.1f}% vs raw+numpy)")
    verdicts.append(("LoadedModel.predict overhead vs raw invoke", r_raw - 1 <= MAX_OVERHEAD,
                     f"{100 * (r_raw - 1):+.1f}% (limit {100 * MAX_OVERHEAD:.0f}%); it includes quantizing the "
                     "float input, which the raw loop does not do"))
    verdicts.append(("LoadedModel.predict overhead vs raw invoke + numpy (de)quantize", r_real - 1 <= MAX_OVERHEAD,
                     f"{100 * (r_real - 1):+.1f}% (limit {100 * MAX_OVERHEAD:.0f}%)"))
    drift_ms = stats["predict_drift"]["median_ms"]
    r_drift, r_vs_predict = drift_ms / raw_ms, drift_ms / stats["predict"]["median_ms"]
    report.add("LoadedModel.predict + drift statistics + prediction id", drift_ms, stats["predict_drift"]["p90_ms"],
               raw_ms, fmt_ratio(r_drift), f"{100 * (r_drift - 1):+.1f}% ({100 * (r_vs_predict - 1):+.1f}% vs predict)")
    obs = observe_ms["median_ms"]
    report.add("drift statistics alone (DriftMonitor.observe after predict)", obs, observe_ms["p90_ms"], raw_ms,
               fmt_ratio(obs / raw_ms), f"{1000 * obs:.0f} us = {100 * obs / raw_ms:.2f}% of a raw invoke")
    verdicts.append(("drift statistics per inference vs raw invoke", obs / raw_ms <= MAX_DRIFT_OVERHEAD,
                     f"{1000 * obs:.0f} us, {100 * obs / raw_ms:.2f}% of the raw invoke (limit "
                     f"{100 * MAX_DRIFT_OVERHEAD:.0f}%)"))
    for name, s in http_stats.items():
        r = s["median_ms"] / http_raw_ms
        report.add(name, s["median_ms"], s["p90_ms"], http_raw_ms, fmt_ratio(r),
                   f"{s['median_ms'] - http_raw_ms:+.2f} ms")
    old_ms = old.get("median_ms") if old.get("ok") else None
    pick_ms = pick["median_ms"]
    report.add(f"select_runtime() -> {runtime.name} (raw, rounds vs 2.14)", pick_ms, pick["p90_ms"], pick_ms,
               fmt_ratio(1.0), "-")
    report.add(f"tflite-runtime {old.get('version') or '2.14'} (raw, subprocess)", old_ms,
               old.get("p90_ms") if old.get("ok") else None, pick_ms, fmt_ratio(ratio(old_ms, pick_ms)),
               "-" if old_ms is None else f"speed-up of the pick: {old_ms / pick_ms:.1f}x")
    for v in verdicts:
        report.verdict(*v)
    report.verdict("select_runtime() picks ai-edge-litert", runtime.name == "ai-edge-litert",
                   f"picked {runtime.name} {runtime.version}" + (f"; {old_ms / pick_ms:.1f}x faster than tflite-runtime "
                                                               f"2.14 on this model" if old_ms else
                                                               f"; tflite-runtime 2.14: {old.get('error')}"))
    report.notes.append(f"in-process: {rounds} rounds x {per_round} calls, order rotated each round; raw = "
                        "set_tensor/invoke/get_tensor on the interpreter inside the agent's pool")
    report.notes.append("predict takes float32 and quantizes it, returns dequantized float32; predict_raw is int8 in/out; "
                        "'raw + numpy (de)quantize' does the same conversions in float32 numpy around the raw loop")
    report.notes.append(f"drift statistics: DriftMonitor over a window of 1000 inferences, {in_spec.shape[-1]} input "
                        f"channels of {int(np.prod(in_spec.shape[1:-1]))} values each read at "
                        f"{monitor._inputs[0].positions or 'all'} positions, "
                        f"{classes} output classes; 'alone' is observe() timed on its own right after each of "
                        f"{rounds * per_round} predicts; the prediction id is FeedbackBook.remember (uuid4 + argmax)")
    report.notes.append(f"HTTP: one keep-alive http.client connection per transport, request bodies encoded "
                        f"once beforehand ({len(json_body) / 1e6:.2f} MB JSON, {len(npy_body) / 1e6:.2f} MB .npy "
                        f"float32), response read but not decoded; raw median in the same rounds "
                        f"{http_raw_ms:.2f} ms; overhead column = ms added to the raw invoke")
    report.data.update(inproc=stats, http=http_stats, http_raw_ms=http_raw_ms, tflite214=old, drift_observe=observe_ms,
                       runtime={"name": runtime.name, "version": runtime.version}, pick=pick,
                       engine=loaded.report.to_dict())
    report.print(args.json)
    return 0 if all(v[1] for v in verdicts) and runtime.name == "ai-edge-litert" else 1


if __name__ == "__main__":
    raise SystemExit(main())
