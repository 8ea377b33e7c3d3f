"""Shared parts of the benchmarks: arguments, timing, the cached MobileNetV2, the 2.14 subprocess, output.

Every benchmark measures our figure and the raw baseline in the same process run, so the
ratio is not spoiled by a machine that got busier between two runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
TFLITE214_PYTHON = Path(os.environ.get("LITEFLEET_TFLITE214_PYTHON", ROOT / ".venv-tflite214" / "bin" / "python"))
THREADS = 2
START_LOAD = os.getloadavg()[0]   # the machine's 1-minute load when the benchmark started
MODES = ("float32", "float16", "dynamic", "int8")
RUNTIME_MIN_VERSION = "2.14"   # so tflite-runtime 2.14 can load every mode (converter's runtime-compat retry)


# --------------------------------------------------------------------------- arguments and output

def parse_args(description: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer repetitions, smaller inputs")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON document")
    if extra:
        extra(parser)
    return parser.parse_args(argv)


def machine() -> dict[str, Any]:
    """Where and when: the figures mean nothing without it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": os.cpu_count(), "gpu": "none", "python": platform.python_version(),
            "load_1m_start": round(START_LOAD, 2), "load_1m_end": round(os.getloadavg()[0], 2), "numpy": np.__version__, "tensorflow": tf_version(), "ai_edge_litert": dist_version("ai-edge-litert")}


def dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def tf_version() -> str:
    """TensorFlow's version without importing it (the cache key of converted models)."""
    for name in ("tensorflow-cpu", "tensorflow"):
        version = dist_version(name)
        if version != "absent":
            return version
    return "absent"


@dataclass
class Report:
    """A titled table with notes and verdicts, printed with rich and optionally as JSON."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verdicts: list[tuple[str, bool, str]] = field(default_factory=list)   # (name, passed, detail)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, *cells: Any) -> None:
        self.rows.append(list(cells))

    def verdict(self, name: str, passed: bool, detail: str) -> None:
        self.verdicts.append((name, passed, detail))

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "machine": machine(), "columns": self.columns,
                "rows": [[_plain(c) for c in row] for row in self.rows], "notes": self.notes,
                "verdicts": [{"name": n, "passed": p, "detail": d} for n, p, d in self.verdicts], **self.data}

    def print(self, as_json: bool = False) -> None:
        from rich.console import Console
        from rich.table import Table
        console = Console(width=160, highlight=False, soft_wrap=True)
        info = machine()
        caption = (f"{info['date']} · {info['cpu']} · {info['cores']} cores, no GPU · "
                   f"load {info['load_1m_start']} -> {info['load_1m_end']} · TF {info['tensorflow']} · "
                   f"ai-edge-litert {info['ai_edge_litert']}")
        table = Table(title=self.title, caption=caption)
        for i, column in enumerate(self.columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in self.rows:
            table.add_row(*(_cell(c) for c in row))
        console.print(table)
        for note in self.notes:
            console.print(f"note: {note}")
        for name, passed, detail in self.verdicts:
            console.print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}")
        if as_json:
            print(json.dumps(self.to_dict(), indent=2, default=_plain))


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def ratio(ours: float | None, raw: float | None) -> float | None:
    """ours / raw, or None when either is missing."""
    if ours is None or raw is None or raw == 0:
        return None
    return ours / raw


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x" if value < 10 else f"{value:.1f}x"


# --------------------------------------------------------------------------- timing

def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> list[float]:
    """Milliseconds per call, ``repeats`` calls after ``warmup`` unrecorded ones."""
    for _ in range(warmup):
        fn()
    out = []
    clock = time.perf_counter
    for _ in range(repeats):
        start = clock()
        fn()
        out.append((clock() - start) * 1000.0)
    return out


def summary(samples_ms: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_ms": statistics.median(ordered), "p90_ms": p90, "min_ms": ordered[0], "n": len(ordered)}


def litert_interpreter(model: bytes, threads: int = THREADS):
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=model, num_threads=threads)
    interp.allocate_tensors()
    return interp


def sample_input(detail: dict[str, Any], seed: int = 0) -> np.ndarray:
    """A random input in the tensor's own dtype (real values in [-1, 1] for float tensors)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(detail["dtype"])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=detail["shape"], dtype=dtype, endpoint=True)
    return rng.uniform(-1, 1, size=detail["shape"]).astype(dtype)


def raw_invoke(interp, x: np.ndarray) -> Callable[[], Any]:
    """The raw baseline: set_tensor, invoke, get_tensor, nothing else."""
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]
    set_tensor, invoke, get_tensor = interp.set_tensor, interp.invoke, interp.get_tensor

    def call() -> Any:
        set_tensor(inp, x)
        invoke()
        return get_tensor(out)
    return call


def litert_latency(model: bytes, repeats: int, warmup: int = 5, threads: int = THREADS) -> dict[str, float]:
    interp = litert_interpreter(model, threads)
    x = sample_input(interp.get_input_details()[0])
    return summary(time_calls(raw_invoke(interp, x), repeats, warmup))


# --------------------------------------------------------------------------- tflite-runtime 2.14 (own venv)

# Runs in .venv-tflite214 (numpy<2): same raw loop as raw_invoke(), prints one JSON line.
_TIMING_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np
from importlib import metadata
version = metadata.version("tflite-runtime")
path, threads, repeats, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
try:
    from tflite_runtime.interpreter import Interpreter
    interp = Interpreter(model_path=path, num_threads=threads)
    interp.allocate_tensors()
except Exception as exc:
    print(json.dumps({"ok": False, "version": version, "error": " ".join(str(exc).split()) or type(exc).__name__}))
    sys.exit(0)
d = interp.get_input_details()[0]
rng = np.random.default_rng(0)
dtype = np.dtype(d["dtype"])
if dtype.kind in "iu":
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, size=d["shape"], dtype=dtype, endpoint=True)
else:
    x = rng.uniform(-1, 1, size=d["shape"]).astype(dtype)
inp, out = d["index"], interp.get_output_details()[0]["index"]
samples = []
for i in range(warmup + repeats):
    t = time.perf_counter()
    interp.set_tensor(inp, x); interp.invoke(); interp.get_tensor(out)
    if i >= warmup:
        samples.append((time.perf_counter() - t) * 1000.0)
samples.sort()
print(json.dumps({"ok": True, "version": version, "median_ms": statistics.median(samples),
                  "p90_ms": samples[min(len(samples) - 1, int(round(0.9 * (len(samples) - 1))))],
                  "min_ms": samples[0], "n": len(samples)}))
"""


# Same loop, but serving rounds: reads a count per line on stdin, answers that many timings (ms) as JSON.
_ROUNDS_SCRIPT = _TIMING_SCRIPT.split("samples = []")[0] + r"""
print(json.dumps({"ok": True, "version": version}), flush=True)
for line in sys.stdin:
    res = []
    for i in range(int(line)):
        t = time.perf_counter()
        interp.set_tensor(inp, x); interp.invoke(); interp.get_tensor(out)
        res.append((time.perf_counter() - t) * 1000.0)
    print(json.dumps(res), flush=True)
"""


class Tflite214Rounds:
    """tflite-runtime 2.14 kept running in its own environment, timing rounds on request.

    Lets a benchmark alternate rounds between ai-edge-litert (in process) and 2.14, so both
    see the same machine load.
    """

    def __init__(self, model_path: Path, threads: int = THREADS, warmup: int = 3) -> None:
        self.error = ""
        self.version = ""
        self.proc: subprocess.Popen | None = None
        if not TFLITE214_PYTHON.exists():
            self.error = f"{TFLITE214_PYTHON} missing: run scripts/setup"
            return
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        self.proc = subprocess.Popen([str(TFLITE214_PYTHON), "-c", _ROUNDS_SCRIPT, str(model_path), str(threads),
                                      "0", str(warmup)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        first = self.proc.stdout.readline()
        try:
            hello = json.loads(first)
        except json.JSONDecodeError:
            hello = {"ok": False, "error": f"exit {self.proc.poll()}: {' '.join(self.proc.stderr.read().split()[-30:])}"}
        self.version = hello.get("version", "")
        if not hello.get("ok"):
            self.error = hello.get("error", "failed")
            self.close()
        else:
            self.round(warmup)

    @property
    def ok(self) -> bool:
        return self.proc is not None and not self.error

    def round(self, n: int) -> list[float]:
        assert self.proc is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


# --------------------------------------------------------------------------- MobileNetV2, converted once

@dataclass(frozen=True)
class MobileNetSpec:
    """Which MobileNetV2 to build: the real one (224x224, alpha 1.0) or a small one for --quick."""

    size: int = 224
    alpha: float = 1.0
    calibration_samples: int = 8

    @property
    def label(self) -> str:
        return f"MobileNetV2 {self.size}x{self.size} alpha {self.alpha:g}"

    @property
    def key(self) -> str:
        return f"mobilenetv2-{self.size}-a{self.alpha:g}"


FULL = MobileNetSpec()
SMALL = MobileNetSpec(size=96, alpha=0.35, calibration_samples=4)


def mobilenet_path(spec: MobileNetSpec, mode: str, runtime_min_version: str = RUNTIME_MIN_VERSION) -> Path:
    """The cached model file, keyed by model, mode, TF version and the runtime it must fit."""
    return CACHE / f"{spec.key}-{mode}-tf{tf_version()}-rt{runtime_min_version}.tflite"


def mobilenet(spec: MobileNetSpec, mode: str, progress: Callable[[str], None] = lambda _: None,
              runtime_min_version: str = RUNTIME_MIN_VERSION) -> tuple[Path, dict]:
    """MobileNetV2 (random weights: latency does not depend on them) converted by litefleet's converter.

    Returns (model file, conversion info). Converted once per (model, mode, TF version), then
    read from bench/.cache/.
    """
    path = mobilenet_path(spec, mode, runtime_min_version)
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        return path, json.loads(info_path.read_text())
    CACHE.mkdir(parents=True, exist_ok=True)
    from converter.data import Dataset
    from converter.models import load_source
    from converter.quantize import convert
    keras_path = CACHE / f"{spec.key}-tf{tf_version()}.keras"
    if not keras_path.exists():
        progress(f"building {spec.label} (random weights)")
        import keras
        keras.utils.set_random_seed(0)
        model = keras.applications.MobileNetV2(weights=None, input_shape=(spec.size, spec.size, 3), alpha=spec.alpha)
        tmp = keras_path.with_suffix(".tmp.keras")
        model.save(tmp)
        os.replace(tmp, keras_path)
    source = load_source(keras_path)
    rng = np.random.default_rng(0)
    calibration = Dataset(x=rng.uniform(-1, 1, size=(spec.calibration_samples, spec.size, spec.size, 3))
                          .astype(np.float32), y=None, source="random images in [-1, 1]",
                          total=spec.calibration_samples)
    io = "int8" if mode == "int8" else "float32"
    start = time.perf_counter()
    progress(f"converting {spec.label} ({mode}, runtime >= {runtime_min_version}); cached in bench/.cache/")
    conversion = convert(source, mode=mode, input_type=io, output_type=io,
                         calibration=calibration if mode == "int8" else None,
                         runtime_min_version=runtime_min_version, progress=progress)
    info = {"mode": mode, "runtime_min_version": runtime_min_version, "settings": conversion.settings, "convert_s": round(time.perf_counter() - start, 1),
            "ops": [f"{o.name} v{o.version}" for o in conversion.ops], "runtime_notes": conversion.runtime_notes,
            "bytes": len(conversion.tflite)}
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(conversion.tflite)
    os.replace(tmp, path)
    info_path.write_text(json.dumps(info, indent=1, default=str))
    return path, info


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the table (and the JSON)."""
    print(message, file=sys.stderr, flush=True)
